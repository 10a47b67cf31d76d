"""Run the choices of one API request on the engine and merge their outputs.

Each choice's engine generator is driven by its own task so the choices of an n > 1
request interleave as they are produced (a single choice's is iterated directly). Whatever
ends the merge (done, error, client gone, cancellation), every engine generator is closed before
it returns: that aborts unfinished requests and frees their KV blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import anyio

from lmserve.request import RequestOutput
from lmserve.server.requests.plan import ChoicePlan, GenerationPlan

if TYPE_CHECKING:
    from lmserve.engine.async_engine import AsyncEngine

_DONE = object()  # a pump's last queue item


async def merge_outputs(
    engine: AsyncEngine, plan: GenerationPlan
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Yield (choice index, output) for all choices of `plan` as the engine produces them.

    Use it under `contextlib.aclosing` so an early exit closes the engine generators at once.
    An exception raised by the engine is re-raised here.
    """
    if len(plan.choices) == 1:  # nothing to interleave: no pump task, one wake-up less per token
        choice = plan.choices[0]
        async with aclosing(_generate(engine, plan, choice)) as outputs:
            async for output in outputs:
                yield choice.index, output
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    pumps = [
        asyncio.create_task(_pump(choice.index, _generate(engine, plan, choice), queue)) for choice in plan.choices
    ]
    try:
        num_running = len(pumps)
        while num_running:
            index, item = await queue.get()
            if item is _DONE:
                num_running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        await stop_tasks(pumps)


def _generate(engine: AsyncEngine, plan: GenerationPlan, choice: ChoicePlan) -> AsyncIterator[RequestOutput]:
    return engine.generate(choice.request_id, plan.prompts[choice.prompt_index], choice.params)


async def _pump(index: int, outputs: AsyncIterator[RequestOutput], queue: asyncio.Queue) -> None:
    try:
        async for output in outputs:
            queue.put_nowait((index, output))
    except Exception as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
        queue.put_nowait((index, exc))
    finally:
        await outputs.aclose()  # cancelled mid-request: the engine aborts it here
        queue.put_nowait((index, _DONE))


async def stop_tasks(tasks: list[asyncio.Task]) -> None:
    """Cancel `tasks` and wait until they have ended."""
    for task in tasks:
        task.cancel()
    # Shielded: when the client disconnects, the caller runs inside a cancelled scope.
    with anyio.CancelScope(shield=True):
        await asyncio.gather(*tasks, return_exceptions=True)

