"""Model family name -> class."""

from __future__ import annotations

import torch

from lmserve.model.config import ModelConfig
from lmserve.model.llama import LlamaForCausalLM

MODEL_FAMILIES = {"llama": LlamaForCausalLM, "qwen2": LlamaForCausalLM}


def build_model(config: ModelConfig, max_positions: int, rope_freq_factors: torch.Tensor | None = None):
    """An unfilled model on the meta device, for the loader to assign real tensors; its rotary
    tables are computed, on the CPU."""
    with torch.device("meta"):
        return MODEL_FAMILIES[config.family](config, max_positions, rope_freq_factors)
