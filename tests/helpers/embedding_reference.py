"""What sentence-transformers computes for the packaged all-MiniLM-L6-v2, rebuilt from
transformers: its modules.json says Transformer -> Pooling (mean) -> Normalize."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lmserve.cli import default_embedding_model_path


def minilm_reference(sentences: list[str]) -> tuple[list[list[int]], np.ndarray]:
    """(token ids per sentence, (N, 384) float32 unit vectors) from transformers' tokenizer and
    BertModel, mean pooling over the attention mask, L2 normalisation."""
    import transformers

    folder = default_embedding_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.BertModel.from_pretrained(folder).eval()
    encoded = tokenizer(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state  # (N, L, 384)
    weights = encoded["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    mask = encoded["attention_mask"].bool()
    ids = [row[keep].tolist() for row, keep in zip(encoded["input_ids"], mask)]
    return ids, F.normalize(pooled, p=2, dim=1).numpy()
