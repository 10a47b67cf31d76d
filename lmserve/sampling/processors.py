"""Logits processors: repetition, presence and frequency penalties, logit bias and bans.

Each function edits some rows of a contiguous (B, V) float32 logits tensor in place and
touches only the token ids it is given (gather, compute, scatter back), so the cost grows
with the number of ids, not with B * V. Rows not listed are left alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class RowTokens:
    """Token ids of some rows of a (B, V) logits tensor, padded into a rectangle.

    Padding repeats the row's last id, so a scatter that writes the same value for every copy
    of an id stays exact on the padding.
    """

    rows: torch.Tensor  # (n,) int64 batch row of each entry
    ids: torch.Tensor  # (n, L) int64 token ids
    valid: torch.Tensor  # (n, L) bool, False on padding

    @classmethod
    def build(cls, rows: list[int], id_lists: list[Sequence[int]], device: torch.device) -> RowTokens:
        """Pad `id_lists[i]` (the ids of batch row `rows[i]`, non-empty) into tensors on `device`."""
        lengths = np.array([len(ids) for ids in id_lists], dtype=np.int64)  # (n,)
        assert lengths.min(initial=1) > 0, "rows without token ids should be left out"
        # One C-level pass over all ids: torch.tensor on nested lists is ~7x slower.
        flat = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int64, count=lengths.sum())
        width = max(1, int(lengths.max(initial=1)))
        positions = np.minimum(np.arange(width)[None, :], lengths[:, None] - 1)  # (n, L)
        starts = np.cumsum(lengths) - lengths  # (n,)
        return cls(
            rows=torch.tensor(rows, dtype=torch.int64, device=device),
            ids=torch.from_numpy(flat[starts[:, None] + positions]).to(device),
            valid=torch.from_numpy(np.arange(width)[None, :] < lengths[:, None]).to(device),
        )

    def flat_index(self, vocab_size: int) -> torch.Tensor:
        """(n, L) positions of the ids in the flattened (B * V) logits."""
        return self.rows[:, None] * vocab_size + self.ids

    def counts(self, vocab_size: int) -> torch.Tensor:
        """(n, V) float32 occurrences of each token id in each listed row; padding counts 0."""
        counts = torch.zeros(self.ids.shape[0], vocab_size, device=self.ids.device)  # (n, V)
        return counts.scatter_add_(1, self.ids, self.valid.to(counts.dtype))


def apply_repetition_penalty(logits: torch.Tensor, tokens: RowTokens, penalties: list[float]) -> None:
    """HF/vLLM repetition penalty, in place.

    For every id in `tokens` (the row's prompt and output), the logit is divided by the row's
    penalty if positive and multiplied by it otherwise. `penalties[i]` belongs to `tokens.rows[i]`.
    """
    flat, index = logits.view(-1), tokens.flat_index(logits.shape[1])
    penalty = torch.tensor(penalties, dtype=logits.dtype, device=logits.device)[:, None]  # (n, 1)
    values = flat.take(index)  # (n, L)
    flat.put_(index, torch.where(values > 0, values / penalty, values * penalty))


def apply_presence_frequency_penalties(
    logits: torch.Tensor, tokens: RowTokens, presence: list[float], frequency: list[float]
) -> None:
    """OpenAI presence/frequency penalties over generated tokens, in place.

    A token occurring `count` times in the row's output loses
    `frequency * count + presence * (count > 0)`. `presence[i]`, `frequency[i]` belong to
    `tokens.rows[i]`.
    """
    flat, index = logits.view(-1), tokens.flat_index(logits.shape[1])
    counts = tokens.counts(logits.shape[1]).gather(1, tokens.ids)  # (n, L)
    presence_t = torch.tensor(presence, dtype=logits.dtype, device=logits.device)[:, None]
    frequency_t = torch.tensor(frequency, dtype=logits.dtype, device=logits.device)[:, None]
    # Every copy of an id (padding included) reads the same count, so duplicate writes agree.
    delta = counts * frequency_t + presence_t  # (n, L); every listed id occurs at least once
    flat.put_(index, flat.take(index) - delta)


def apply_logit_bias(logits: torch.Tensor, rows: list[int], biases: list[BiasTensors]) -> None:
    """Add OpenAI logit_bias (token id -> bias in [-100, 100]) to the listed rows, in place.

    Raises ValueError for a token id outside the logits' vocabulary; the server should have
    rejected it already, so reaching this is a conversion bug rather than a user error.
    """
    vocab_size = logits.shape[1]
    bad = [token_id for bias in biases if bias.max_id >= vocab_size or bias.min_id < 0
           for token_id in bias.token_ids.tolist() if not 0 <= token_id < vocab_size]
    if bad:
        raise ValueError(f"logit_bias token ids {bad} are outside the vocabulary ({vocab_size})")
    listed = [(row, bias) for row, bias in zip(rows, biases) if len(bias.token_ids)]
    if not listed:
        return
    counts = torch.tensor([len(bias.token_ids) for _, bias in listed])
    index = (torch.repeat_interleave(torch.tensor([row for row, _ in listed]), counts).to(logits.device),
             torch.cat([bias.token_ids for _, bias in listed]).to(logits.device))
    values = torch.cat([bias.values for _, bias in listed]).to(logits.device, logits.dtype)
    logits.index_put_(index, values, accumulate=True)  # accumulate: a repeated id adds up


@dataclass(frozen=True)
class BiasTensors:
    """A request's logit_bias as tensors. The engine makes them once per request (LiveRequest)
    rather than at every step: 1,024 biases on 16 rows cost ~45 ms a step to convert afresh."""

    token_ids: torch.Tensor  # (n,) int64
    values: torch.Tensor  # (n,) float32
    min_id: int
    max_id: int

    @classmethod
    def of(cls, bias: Sequence[tuple[int, float]]) -> BiasTensors:
        ids = [token_id for token_id, _ in bias]
        return cls(torch.tensor(ids, dtype=torch.int64), torch.tensor([value for _, value in bias], dtype=torch.float32),
                   min(ids, default=0), max(ids, default=-1))


def last_tokens(prompt_ids: Sequence[int], output_ids: Sequence[int], window: int) -> list[int]:
    """The last `window` tokens of prompt + output (all of them for window 0), oldest first,
    without copying more of the prompt than that."""
    if window <= 0:
        return [*prompt_ids, *output_ids]
    if window <= len(output_ids):
        return list(output_ids[-window:])
    return [*prompt_ids[max(0, len(prompt_ids) - (window - len(output_ids))):], *output_ids]


def read_ids(logits: torch.Tensor, tokens: RowTokens) -> torch.Tensor:
    """(n, L) the logits at `tokens`, to write back with `write_ids` after the penalties (ids
    every penalty leaves alone). ValueError for an id outside the vocabulary."""
    vocab_size = logits.shape[1]
    if bool(((tokens.ids < 0) | (tokens.ids >= vocab_size)).any()):
        raise ValueError(f"unpenalized token ids are outside the vocabulary ({vocab_size})")
    return logits.view(-1).take(tokens.flat_index(vocab_size))


def write_ids(logits: torch.Tensor, tokens: RowTokens, values: torch.Tensor) -> None:
    """Put (n, L) `values` back at `tokens`, in place; padding repeats an id with its own value."""
    logits.view(-1).put_(tokens.flat_index(logits.shape[1]), values)


def ban_tokens(logits: torch.Tensor, rows: list[int], id_lists: list[Sequence[int]]) -> None:
    """Set the listed ids of the listed rows to -inf, in place. An id outside the vocabulary
    can never be sampled anyway, so it is skipped."""
    vocab_size = logits.shape[1]
    entries = [(row, token_id) for row, ids in zip(rows, id_lists) for token_id in ids if 0 <= token_id < vocab_size]
    if entries:
        row_ids, token_ids = zip(*entries)
        logits[torch.tensor(row_ids, device=logits.device), torch.tensor(token_ids, device=logits.device)] = -torch.inf
