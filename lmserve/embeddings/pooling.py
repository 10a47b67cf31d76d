"""Token states -> one vector per text, configured as sentence-transformers configures a model.

A sentence-transformers folder says how to pool in its own files: modules.json lists the
pipeline (Transformer, Pooling, optionally Normalize), 1_Pooling/config.json picks the mode,
sentence_bert_config.json caps the input length. This module reads those files and refuses
pipelines it cannot reproduce exactly, rather than approximating them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lmserve.weights.gguf import UnsupportedModelError

POOLING_MODES = ("mean", "cls", "max", "last")
# 1_Pooling/config.json keys -> our mode names
_ST_POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "last",
    "pooling_mode_mean_sqrt_len_tokens": None,  # recognised, not implemented
    "pooling_mode_weightedmean_tokens": None,
}
_ST_MODULES = "sentence_transformers.models."


@dataclass(frozen=True)
class Pooling:
    mode: str  # one of POOLING_MODES
    normalize: bool  # L2-normalise the pooled vector

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise ValueError(f"pooling mode {self.mode!r} is not one of {', '.join(POOLING_MODES)}")

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden (B, L, H), mask (B, L) bool (True for real tokens, padding on the right)
        -> (B, H) float32."""
        pooled = _POOLERS[self.mode](hidden.float(), mask)
        return F.normalize(pooled, p=2, dim=1) if self.normalize else pooled


def _mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    # clamp as sentence-transformers does, so an all-padding row cannot divide by zero
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def _cls(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden[:, 0]


def _max(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)


def _last(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    last = mask.sum(1) - 1  # (B,) index of each row's last real token
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


_POOLERS = {"mean": _mean, "cls": _cls, "max": _max, "last": _last}


@dataclass(frozen=True)
class SentenceTransformerConfig:
    pooling: Pooling
    max_seq_length: int | None  # None: the folder does not say


def read_sentence_transformer_config(folder: str | Path) -> SentenceTransformerConfig:
    """Pooling and length cap from a sentence-transformers folder. A plain HF folder (no
    modules.json) gets mean pooling with L2 normalisation, what most embedding models use."""
    folder = Path(folder)
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return SentenceTransformerConfig(Pooling("mean", normalize=True), None)
    modules = json.loads(modules_file.read_text())
    kinds = [m["type"].removeprefix(_ST_MODULES) for m in modules]
    unsupported = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
    if unsupported or "Pooling" not in kinds:
        raise UnsupportedModelError(f"sentence-transformers modules {unsupported or kinds} are not supported "
                                    "(supported: Transformer, Pooling, Normalize)")
    pooling_path = next(m["path"] for m in modules if m["type"].endswith("Pooling"))
    mode = _pooling_mode(json.loads((folder / pooling_path / "config.json").read_text()))
    bert_config = folder / "sentence_bert_config.json"
    max_len = json.loads(bert_config.read_text()).get("max_seq_length") if bert_config.is_file() else None
    return SentenceTransformerConfig(Pooling(mode, normalize="Normalize" in kinds), max_len)


def _pooling_mode(config: dict) -> str:
    """The one mode a 1_Pooling/config.json turns on (newer files may also say "pooling_mode")."""
    if isinstance(config.get("pooling_mode"), str):
        named = {"mean": "mean", "cls": "cls", "max": "max", "lasttoken": "last"}.get(config["pooling_mode"])
        if named is None:
            raise UnsupportedModelError(f"pooling mode {config['pooling_mode']!r} is not supported")
        return named
    on = [key for key in _ST_POOLING_KEYS if config.get(key)]
    if len(on) != 1 or _ST_POOLING_KEYS[on[0]] is None:
        raise UnsupportedModelError(f"pooling {on or 'none'} is not supported: exactly one of mean, cls, max or "
                                    "last-token pooling")
    return _ST_POOLING_KEYS[on[0]]
