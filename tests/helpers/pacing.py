"""Stand-ins for speculation.Pacer: for tests of what drafts do rather than of when they pay."""

from __future__ import annotations


class AlwaysDraft:
    """A pacer (a draft model's, or the scheduler's for busy steps) that never times plain steps:
    every step that can take the drafts takes them."""

    drafting = True
    probing = False

    def record(self, tokens_per_seq: float, seconds: float, num_seqs: int) -> None:
        pass


class Recorder:
    """A pacer that drafts (or probes) as told and keeps what it is given."""

    def __init__(self, drafting: bool, probing: bool = False):
        self.drafting, self.probing, self.records = drafting, probing, []

    def record(self, tokens_per_seq: float, seconds: float, num_seqs: int) -> None:
        self.records.append((tokens_per_seq, seconds, num_seqs))
