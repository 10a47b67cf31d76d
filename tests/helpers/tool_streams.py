"""Streaming a reply through the tool parsers on every chunking, and what the stream folds into,
for tests checking "streamed == whole" (the parsers' contract, lmserve/parsing/tool_parsers.py)."""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Collection, Iterator

from lmserve.parsing import ContentDelta, ParsedToolOutput, ReplyFormat, ReplyParser, collect_events


def counting_ids():
    """Tool call ids id0, id1, ... (real ids are random)."""
    counter = itertools.count()
    return lambda: f"id{next(counter)}"


def chunkings(text: str, seed: int = 0, num_random: int = 20) -> Iterator[list[int]]:
    """Cut positions: whole, one character at a time, every single cut (a sample of them in long
    texts), and random cuts."""
    yield []
    yield list(range(1, len(text)))
    rng = random.Random(seed)
    single_cuts = range(1, len(text))
    if len(single_cuts) > 150:
        single_cuts = sorted(rng.sample(single_cuts, 60))
    yield from ([cut] for cut in single_cuts)
    for _ in range(num_random if len(text) > 1 else 0):
        yield sorted(rng.sample(range(1, len(text)), k=rng.randint(1, max(1, len(text) // 4))))


def pieces(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def stream(parser_cls, text: str, cuts: list[int], tool_names: Collection[str] | None = None,
           truncated: bool = False) -> list:
    """All events of a fresh parser fed `text` cut at `cuts`, then finished."""
    parser = parser_cls(counting_ids(), tool_names)
    events = [e for piece in pieces(text, cuts) for e in parser.feed(piece)]
    return events + parser.finish(truncated)


def assert_shape(events: list) -> None:
    """OpenAI's streaming shape: a call starts with index, id and name; then fragments only."""
    started = 0
    for event in events:
        if isinstance(event, ContentDelta):
            assert event.text
            continue
        if event.id is not None:
            assert event.index == started and event.name and re.fullmatch(r"id\d+", event.id)
            started += 1
        else:
            assert event.name is None and event.arguments and event.index == started - 1


def without_ids(result: ParsedToolOutput) -> tuple[str, list[tuple[str, str]]]:
    return result.content, [(call.name, call.arguments) for call in result.tool_calls]


def assert_agrees(parser_cls, text: str, content: str, calls: list[tuple[str, str]],
                  tool_names: Collection[str] | None = None, truncated: bool = False, **chunk_kwargs) -> None:
    """parse() gives (content, calls), and so does every chunking of the stream."""
    parsed = parser_cls(counting_ids(), tool_names).parse(text, truncated)
    assert without_ids(parsed) == (content, calls)
    for cuts in chunkings(text, **chunk_kwargs):
        events = stream(parser_cls, text, cuts, tool_names, truncated)
        assert_shape(events)
        assert without_ids(collect_events(events)) == (content, calls), cuts


def streamed_reply(fmt: ReplyFormat, text: str, cuts: list[int],
                   truncated: bool = False) -> tuple[str, str, list[tuple[str, str]]]:
    """(reasoning, content, calls as (name, arguments)) from ReplyParser deltas, as a client
    concatenating a streamed chat reply cut at `cuts` sees it."""
    parser = ReplyParser(fmt)
    chunks = pieces(text, cuts)
    last = len(chunks) - 1
    deltas = [parser.feed(piece, final=i == last, truncated=truncated and i == last) for i, piece in enumerate(chunks)]
    calls = collect_events(call for delta in deltas for call in delta.tool_calls).tool_calls
    assert parser.num_tool_calls == len(calls)
    return ("".join(d.reasoning for d in deltas), "".join(d.content for d in deltas),
            [(call.name, call.arguments) for call in calls])
