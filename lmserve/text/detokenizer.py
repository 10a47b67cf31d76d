"""Incremental detokenization for streaming: UTF-8 safe text deltas with stop strings."""

from __future__ import annotations

import bisect
import codecs
from collections.abc import Sequence

from lmserve.text.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into text deltas, one instance per sequence.

    Contract:
    - A delta never ends inside a multi-byte character: bytes wait until the character completes
      (invalid bytes become U+FFFD, as a plain decode would make them). A character still
      incomplete when the sequence ends (max_tokens cut it) is dropped, not shown as U+FFFD.
    - No delta contains any part of a stop string: the longest tail of the pending text that could
      begin a stop string is held back until it can no longer.
    - Without a stop, the deltas of `add` plus `flush` equal `tokenizer.decode(all_ids,
      skip_special_tokens)` (exactly, for vocabularies whose token bytes are exact), less that
      incomplete last character.
    - When a stop string completes, `add` returns the text before the earliest one (and the stop
      string itself if include_stop_str_in_output) with stopped=True; no `add` may follow.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
        include_stop_str_in_output: bool = False,
    ):
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]  # an empty stop string would match everywhere
        self._sorted_stop = sorted(self._stop)  # a text is a prefix of a stop iff of the first stop >= it
        self._longest_stop = max(map(len, self._stop), default=0)
        self._skip_special_tokens = skip_special_tokens
        self._include_stop = include_stop_str_in_output
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip_space = tokenizer.strip_leading_space  # drop the first byte if it is a space
        self._pending = ""  # decoded, not yet emitted: it may be the start of a stop string
        self._emitted: list[str] = []  # deltas so far; joined on demand (no quadratic +=)
        self.stopped = False
        self.stop_string: str | None = None  # the stop string that ended the text, once one has

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._emitted)

    def add(self, token_ids: list[int]) -> tuple[str, bool]:
        """Feed newly generated ids; returns (text safe to emit now, stopped_by_stop_string)."""
        assert not self.stopped, "add() after a stop string matched"
        self._pending += self._utf8.decode(self._bytes_of(token_ids))
        if not self._stop:
            return self._emit(len(self._pending)), False
        match = self._earliest_stop()
        if match is not None:
            start, stop = match
            self.stopped, self.stop_string = True, stop
            return self._emit(start + len(stop) if self._include_stop else start), True
        return self._emit(len(self._pending) - self._held_back_length()), False

    def flush(self) -> str:
        """At the end of a sequence not stopped by a stop string: everything still held back."""
        if self.stopped:
            return ""
        # The decoder buffers only the bytes of a character that could still complete; the
        # tokens carrying them still count as generated, their half character is not text.
        self._utf8.reset()
        return self._emit(len(self._pending))

    def _bytes_of(self, token_ids: list[int]) -> bytes:
        tok = self._tokenizer
        if self._skip_special_tokens:
            data = b"".join([tok.token_bytes(i) for i in token_ids if not tok.is_special(i)])
        else:
            data = b"".join([tok.token_bytes(i) for i in token_ids])
        if self._strip_space and data:
            # SentencePiece: decode() drops one leading space of the whole text, so do we.
            self._strip_space = False
            if data[:1] == b" ":
                data = data[1:]
        return data

    def _earliest_stop(self) -> tuple[int, str] | None:
        """(start, stop string) of the first stop string in the pending text, if any."""
        best = None
        for stop in self._stop:
            start = self._pending.find(stop)
            if start >= 0 and (best is None or start < best[0]):
                best = (start, stop)
        return best

    def _held_back_length(self) -> int:
        """Length of the longest suffix of the pending text that is a prefix of some stop string:
        a binary search of the sorted stops per length, so 256 stop strings cost what a few do."""
        pending, stops = self._pending, self._sorted_stop
        longest = min(len(pending), self._longest_stop - 1)
        for length in range(longest, 0, -1):
            tail = pending[-length:]
            index = bisect.bisect_left(stops, tail)
            if index < len(stops) and stops[index].startswith(tail):
                return length
        return 0

    def _emit(self, end: int) -> str:
        delta, self._pending = self._pending[:end], self._pending[end:]
        if delta:
            self._emitted.append(delta)
        return delta
