"""Model family name -> class."""

from __future__ import annotations

import torch

from lmserve.model.config import ModelConfig
from lmserve.model.llama import LlamaForCausalLM

MODEL_FAMILIES = {"llama": LlamaForCausalLM, "qwen2": LlamaForCausalLM}


def build_model(config: ModelConfig, max_positions: int, rope_freq_factors: torch.Tensor | None = None):
    """An unfilled model on the meta device; the loader assigns real tensors."""
    with torch.device("meta"):
        model = MODEL_FAMILIES[config.family](config, max_positions, None)
    # Buffers are computed, not loaded: rebuild the rotary tables on the CPU.
    model.rope = type(model.rope)(config, max_positions, rope_freq_factors)
    return model
