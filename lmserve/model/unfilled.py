"""Modules built empty, for the loader to fill."""

from __future__ import annotations

import torch
from torch import nn


def unfilled_embedding(num_embeddings: int, embedding_dim: int) -> nn.Embedding:
    """An nn.Embedding whose weight the loader assigns, built without nn.Embedding's random init.
    On the meta device that init (normal_) runs a Python decomposition which imports torch._dynamo
    and ~900 modules with it, resident for the server's whole life (bench/RESULTS.md, "Figures the
    code cites")."""
    return nn.Embedding(num_embeddings, embedding_dim, _weight=torch.empty(num_embeddings, embedding_dim))
