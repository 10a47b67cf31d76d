"""ReasoningParser: <think> splits, tags cut across deltas, whitespace rules, stream == parse."""

from __future__ import annotations

import itertools
import random

import pytest

from lmserve.parsing.reasoning import ReasoningDelta, ReasoningParser, template_opens_reasoning


def stream(text: str, chunks: list[int], **kwargs) -> tuple[str, str, list[ReasoningDelta]]:
    """Feed `text` cut at `chunks` (sorted cut points); returns (reasoning, content, deltas)."""
    parser = ReasoningParser(**kwargs)
    bounds = [0, *chunks, len(text)]
    deltas = [parser.feed(text[a:b]) for a, b in itertools.pairwise(bounds)]
    deltas.append(parser.finish())
    return "".join(d.reasoning for d in deltas), "".join(d.content for d in deltas), deltas


def chunkings(text: str, seed: int = 0):
    """Whole, one character at a time, every single cut, and random cuts."""
    yield []
    yield list(range(1, len(text)))
    for cut in range(1, len(text)):
        yield [cut]
    rng = random.Random(seed)
    for _ in range(30):
        yield sorted(rng.sample(range(1, len(text)), k=rng.randint(1, max(1, len(text) // 3)))) if len(text) > 1 else []


def assert_agrees(text: str, expected: tuple[str | None, str], **kwargs) -> None:
    assert ReasoningParser(**kwargs).parse(text) == expected
    for cuts in chunkings(text):
        reasoning, content, _ = stream(text, cuts, **kwargs)
        assert (reasoning or None, content) == expected, cuts


CASES = [
    ("<think>Let me see.</think>The answer is 4.", ("Let me see.", "The answer is 4.")),
    ("<think>\nstep 1\nstep 2\n</think>\n\nAnswer", ("step 1\nstep 2", "Answer")),
    ("\n <think>a</think>b", ("a", "b")),
    ("No reasoning at all.", (None, "No reasoning at all.")),
    ("  leading space kept without tags", (None, "  leading space kept without tags")),
    ("<think>unclosed, cut short ", ("unclosed, cut short", "")),
    ("<think></think>just content", (None, "just content")),
    ("<think>  \n </think>  x", (None, "x")),
    ("<think>a < b and </thinking> is not the tag</think>ok", ("a < b and </thinking> is not the tag", "ok")),
    ("<thinking>not a tag</think>", (None, "<thinking>not a tag</think>")),
    ("<thi", (None, "<thi")),
    ("<think>r</think>c <think>later tags are content</think>", ("r", "c <think>later tags are content</think>")),
    ("<think>r</think>", ("r", "")),
    ("<think>r</th", ("r</th", "")),
    ("<think>日本語 😀 </think>\n答え", ("日本語 😀", "答え")),
    ("", (None, "")),
    ("   ", (None, "   ")),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_parse_and_every_chunking_agree(text, expected):
    assert_agrees(text, expected)


STARTS_IN_REASONING = [
    ("step one\n</think>\n\nAnswer", ("step one", "Answer")),
    ("<think>\nrepeated open tag</think>x", ("repeated open tag", "x")),
    ("never closed", ("never closed", "")),
    ("\n\n</think>\n\nonly content", (None, "only content")),
    ("", (None, "")),
]


@pytest.mark.parametrize("text,expected", STARTS_IN_REASONING)
def test_starts_in_reasoning(text, expected):
    assert_agrees(text, expected, starts_in_reasoning=True)


def test_custom_tags():
    assert_agrees("[THINK]hm[/THINK] ok", ("hm", "ok"), start="[THINK]", end="[/THINK]")


def test_deltas_hold_back_only_a_possible_tag():
    parser = ReasoningParser()
    assert parser.feed("<th") == ReasoningDelta("", "")
    assert parser.feed("ink>abc") == ReasoningDelta("abc", "")
    assert parser.feed(" def </thi") == ReasoningDelta(" def", "")  # " </thi" may be the end
    assert parser.feed("nk>\n\n") == ReasoningDelta("", "")  # whitespace after </think> dropped
    assert parser.feed("Hi") == ReasoningDelta("", "Hi")
    assert parser.feed(" <think>") == ReasoningDelta("", " <think>")
    assert parser.finish() == ReasoningDelta("", "")


def test_text_without_tags_streams_without_delay():
    parser = ReasoningParser()
    assert parser.feed("Hello") == ReasoningDelta("", "Hello")
    assert parser.feed(" <think>") == ReasoningDelta("", " <think>")


def test_partial_start_tag_released_at_finish():
    parser = ReasoningParser()
    assert parser.feed("<thin") == ReasoningDelta("", "")
    assert parser.finish() == ReasoningDelta("", "<thin")


def test_not_a_tag_released_as_soon_as_it_cannot_be_one():
    parser = ReasoningParser()
    assert parser.feed("<th") == ReasoningDelta("", "")
    assert parser.feed("e") == ReasoningDelta("", "<the")


def test_partial_end_tag_released_as_reasoning_when_it_is_not_one():
    parser = ReasoningParser()
    parser.feed("<think>x </th")
    assert parser.feed("ree") == ReasoningDelta(" </three", "")


def test_parse_does_not_disturb_streaming_state():
    parser = ReasoningParser()
    parser.feed("<think>a")
    assert parser.parse("plain") == (None, "plain")
    assert parser.feed("</think>b") == ReasoningDelta("", "b")


def test_feed_after_finish_is_a_bug():
    parser = ReasoningParser()
    parser.finish()
    with pytest.raises(AssertionError):
        parser.feed("x")


def test_empty_tags_rejected():
    with pytest.raises(ValueError):
        ReasoningParser(start="")


def test_random_texts_agree_with_parse():
    rng = random.Random(7)
    pieces = ["<think>", "</think>", "<th", "</", "ink>", "a", " ", "\n", "é", "<", ">", "think"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        for starts in (False, True):
            expected = ReasoningParser(starts_in_reasoning=starts).parse(text)
            for _ in range(5):
                cuts = sorted(rng.sample(range(1, len(text)), k=rng.randint(0, len(text) - 1))) if len(text) > 1 else []
                reasoning, content, _ = stream(text, cuts, starts_in_reasoning=starts)
                assert (reasoning or None, content) == expected, (text, cuts)


def test_random_texts_lose_only_tags_and_whitespace():
    rng = random.Random(8)
    pieces = ["<think>", "</think>", "<th", "ink>", "ab", " ", "\n", "<", "x</"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        reasoning, content = ReasoningParser().parse(text)
        kept = ((reasoning or "") + content).replace(" ", "").replace("\n", "")
        original = text.replace(" ", "").replace("\n", "")
        # at most one <think> and one </think> are consumed, nothing else
        assert len(original) - len(kept) in (0, len("<think>"), len("<think></think>"))


@pytest.mark.parametrize(
    "prompt,expected",
    [
        ("<|im_start|>assistant\n<think>\n", True),
        ("<｜Assistant｜><think>", True),
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),  # Qwen3 with thinking disabled
        ("<|im_start|>assistant\n", False),
        ("", False),
    ],
)
def test_template_opens_reasoning(prompt, expected):
    assert template_opens_reasoning(prompt) is expected
