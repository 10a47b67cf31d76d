"""Rotary position embeddings in the HF half-split layout."""

from __future__ import annotations

import math

import torch

from lmserve.model.config import ModelConfig
from lmserve.weights.gguf import UnsupportedModelError


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    # On the CPU even while the model is built on the meta device: the tables are computed, not
    # loaded (and arange on meta runs a Python decomposition that imports torch._dynamo).
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
    scaling = dict(config.rope_scaling or ())
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_scaling(inv_freq, scaling)
    raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported")


def _llama3_scaling(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    # As Llama 3.1 defines it: keep high frequencies, divide low ones, blend in between.
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    middle = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(middle, blended, out)


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin tables indexed by absolute position."""

    def __init__(self, config: ModelConfig, max_positions: int, freq_factors: torch.Tensor | None = None):
        super().__init__()
        inv_freq = inverse_frequencies(config)
        if freq_factors is not None:  # GGUF rope_freqs: per-frequency divisors
            inv_freq = inv_freq / freq_factors.to(torch.float64)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64, device="cpu"), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # (max_positions, head_dim)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for `positions`, each (num_tokens, 1, head_dim), for apply_rotary."""
        # index_select copies whole rows; indexing with a tensor takes ATen's slower generic path
        return self.cos.index_select(0, positions).unsqueeze(1), self.sin.index_select(0, positions).unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (num_tokens, num_heads, head_dim) in the half-split layout."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
