"""llama.cpp's slots over lmserve's engine: a numbered seat per running sequence.

An engine runs up to max_num_seqs sequences at once; each holds one of that many slots while it
runs, the one its request names (`id_slot`, waiting for it to be free) or the first free one.
A slot remembers the tokens of the last sequence it ran (prompt and output), which is what
`POST /slots/{id}?action=save` writes to disk: the KV of those tokens still in the prefix
cache. A sequence that finds no free slot still runs, without one (id_slot -1).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from lmserve.request import RequestOutput, SamplingParams
from lmserve.server.responses.llama_native import generation_settings


@dataclass
class Slot:
    id: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # held while a sequence runs in it
    id_task: int = -1
    params: SamplingParams | None = None
    prompt_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    stopping_word: str = ""

    @property
    def token_ids(self) -> list[int]:
        """The last sequence's tokens: what a save writes."""
        return self.prompt_ids + self.output_ids


class SlotTable:
    """The slots of one loaded engine."""

    def __init__(self, num_slots: int, n_ctx: int, speculative: bool = False):
        self.slots = [Slot(i) for i in range(num_slots)]
        self.n_ctx = n_ctx
        self.speculative = speculative  # the engine drafts tokens (prompt lookup)
        self._task_ids = itertools.count()

    def get(self, id_slot: int) -> Slot:
        """The slot `id_slot`; an IndexError when there is no such slot."""
        if not 0 <= id_slot < len(self.slots):
            raise IndexError(f"there is no slot {id_slot}: slots are 0 to {len(self.slots) - 1}")
        return self.slots[id_slot]

    async def take(self, id_slot: int | None) -> Slot | None:
        """The slot asked for, once it is free; without one asked, the first free one (None if
        every slot is busy)."""
        if id_slot is not None and id_slot >= 0:
            slot = self.get(id_slot)
            await slot.lock.acquire()
            return slot
        for slot in self.slots:
            if not slot.lock.locked():
                await slot.lock.acquire()  # free: returns at once, with no await in between
                return slot
        return None

    def start(self, slot: Slot, prompt_ids: list[int], params: SamplingParams) -> None:
        slot.id_task = next(self._task_ids)
        slot.params, slot.prompt_ids, slot.output_ids, slot.stopping_word = params, list(prompt_ids), [], ""

    def describe(self) -> list[dict[str, Any]]:
        """GET /slots: every slot, in llama.cpp's shape."""
        return [self._describe(slot) for slot in self.slots]

    def _describe(self, slot: Slot) -> dict[str, Any]:
        params = slot.params or SamplingParams()
        busy = slot.lock.locked()
        return {
            "id": slot.id,
            "id_task": slot.id_task if busy else -1,
            "n_ctx": self.n_ctx,
            "speculative": self.speculative,
            "is_processing": busy,
            "params": generation_settings(params, self.n_ctx, model=""),
            "n_prompt_tokens": len(slot.prompt_ids),
            "next_token": {
                "has_next_token": busy,
                "has_new_line": False,
                "n_remain": params.max_tokens - len(slot.output_ids) if busy else -1,
                "n_decoded": len(slot.output_ids),
                "stopping_word": slot.stopping_word,
            },
        }


@dataclass
class SlottedEngine:
    """The engine as one generation request sees it: each of its sequences runs in a slot (the
    one `id_slot` names, for a request of one sequence), and `id_slots` records which, by
    request id, for the answer. Other attributes are the engine's own."""

    engine: Any
    table: SlotTable
    id_slot: int | None
    id_slots: dict[str, int] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        slot = await self.table.take(self.id_slot)
        self.id_slots[request_id] = -1 if slot is None else slot.id
        if slot is not None:
            self.table.start(slot, prompt_ids, params)
        try:
            async with aclosing(self.engine.generate(request_id, prompt_ids, params)) as outputs:
                async for output in outputs:
                    if slot is not None:
                        slot.output_ids += output.new_token_ids
                        slot.stopping_word = output.stop_string or slot.stopping_word
                    yield output
        finally:
            if slot is not None:
                slot.lock.release()
