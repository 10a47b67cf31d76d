"""IncrementalDetokenizer: UTF-8 safety, agreement with decode(), stop strings, special tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmserve.text.detokenizer import IncrementalDetokenizer
from lmserve.text.tokenizer import Tokenizer
from lmserve.weights.gguf import GGUFFile


TEXTS = [
    "The capital of France is Paris.",
    "Emoji 😀👍🏽🇫🇷 and CJK 日本語のテキスト、中文。한국어",
    "def f(x):\n    return x ** 2  # naïve\n\n",
    "   spaces   and\ttabs\n",
]


@pytest.fixture(scope="module")
def tok(default_tokenizer) -> Tokenizer:
    return default_tokenizer


@pytest.fixture(scope="module")
def byte_ids(tok):
    """ids of the single-byte tokens, so a test can cut characters anywhere."""
    table = {tok.token_bytes(i): i for i in range(tok.vocab_size) if not tok.is_special(i)}
    return lambda data: [table[bytes([b])] for b in data]


def run(detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1) -> tuple[list[str], bool]:
    """Feed ids `chunk` at a time until a stop; returns (all deltas incl. flush, stopped)."""
    deltas = []
    for start in range(0, len(ids), chunk):
        delta, stopped = detok.add(ids[start : start + chunk])
        deltas.append(delta)
        if stopped:
            return deltas, True
    deltas.append(detok.flush())
    return deltas, False


# --- UTF-8 and agreement with decode() ---------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_single_byte_tokens_never_yield_replacement_chars(tok, byte_ids, text):
    deltas, stopped = run(IncrementalDetokenizer(tok), byte_ids(text.encode()))
    assert not stopped
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == text


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_deltas_concatenate_to_decode(tok, text, chunk):
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    deltas, _ = run(detok, ids, chunk)
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == tok.decode(ids) == text
    assert detok.text == text


def test_real_tokens_split_emoji(tok):
    ids = tok.encode("😀")
    detok = IncrementalDetokenizer(tok)
    assert [detok.add([i])[0] for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1:]) == ("😀", False)


def test_invalid_bytes_become_replacement_like_decode(tok, byte_ids):
    for data in (
        b"a\x80b",
        b"\xc3(ok",
        b"\xed\xa0\x80z",
        b"x\xf0\x9f\x98y",
        b"ab\x80",
    ):
        ids = byte_ids(data)
        deltas, _ = run(IncrementalDetokenizer(tok), ids)
        assert "".join(deltas) == tok.decode(ids) == data.decode("utf-8", errors="replace")


@pytest.mark.parametrize("data", [b"ab\xe2\x82", b"x\xf0\x9f\x98", "да".encode()[:-1]])
def test_character_cut_by_the_end_of_the_sequence_is_dropped(tok, byte_ids, data):
    # max_tokens can stop generation inside a multi-byte character: no U+FFFD at the end.
    detok = IncrementalDetokenizer(tok)
    text = data.decode("utf-8", errors="ignore")
    assert detok.add(byte_ids(data)) == (text, False)  # the incomplete character waits
    assert detok.flush() == ""
    assert detok.text == text


def test_character_cut_at_the_end_is_dropped_with_real_tokens(tok):
    ids = tok.encode("Ok 😀", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, stop=["zz"])
    deltas, _ = run(detok, ids[:-1])
    assert "".join(deltas) == "Ok " and detok.text == "Ok "


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tok, skip):
    ids = tok.encode("<|im_start|>assistant\nHi there<|im_end|>")
    deltas, _ = run(IncrementalDetokenizer(tok, skip_special_tokens=skip), ids)
    expected = "assistant\nHi there" if skip else "<|im_start|>assistant\nHi there<|im_end|>"
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip) == expected


# --- stop strings --------------------------------------------------------------------------------


def test_stop_string_across_token_boundaries(tok, byte_ids):
    text = "Hello world. STOP and more"
    ids = byte_ids(text.encode())
    detok = IncrementalDetokenizer(tok, stop=["STOP"])
    deltas, stopped = run(detok, ids)
    assert stopped
    assert "".join(deltas) == "Hello world. " == detok.text
    assert len(deltas) == text.index("STOP") + len("STOP")  # stopped on the token completing it
    assert all("S" not in delta for delta in deltas)  # not even its first letter escaped


def test_stop_string_with_real_tokens_anywhere_in_a_token(tok):
    text = "The answer is 42.\nObservation: done"
    ids = tok.encode(text)
    for stop in ("Observation:", "ervat", "\nObs", "42.\n"):
        deltas, stopped = run(IncrementalDetokenizer(tok, stop=[stop]), ids)
        assert stopped and "".join(deltas) == text[: text.index(stop)], stop


def test_multiple_stop_strings_earliest_wins(tok, byte_ids):
    text = "abc xEND yOBS z"
    deltas, stopped = run(
        IncrementalDetokenizer(tok, stop=["OBS", "END", "\n\n"]),
        byte_ids(text.encode()),
    )
    assert stopped and "".join(deltas) == "abc x"
    # A shorter stop completing inside a longer stop's pending prefix still stops, at its start.
    deltas, stopped = run(IncrementalDetokenizer(tok, stop=["abcd", "bc"]), byte_ids(b"xabce"))
    assert stopped and "".join(deltas) == "xa"
    # Both complete in the same add(): the one starting first wins.
    detok = IncrementalDetokenizer(tok, stop=["cd", "bcde"])
    assert detok.add(byte_ids(b"abcdef")) == ("a", True)


def test_exactly_the_longest_tail_that_could_begin_a_stop_is_held_back(tok, byte_ids):
    # Many stops sharing prefixes, fed a byte at a time: after each byte the text out is all of
    # the text in but its longest tail that begins some stop (checked by brute force).
    import random

    rng = random.Random(7)
    for _ in range(40):
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 40))]
        text = "".join(rng.choice("abcd") for _ in range(60))
        detok = IncrementalDetokenizer(tok, stop=stops)
        out = ""
        for end in range(1, len(text) + 1):
            delta, stopped = detok.add(byte_ids(text[end - 1].encode()))
            out += delta
            fed = text[:end]
            if stopped:
                first = min(fed.index(stop) for stop in stops if stop in fed)
                assert out == fed[:first]
                break
            held = max((n for n in range(1, len(fed) + 1) if any(stop.startswith(fed[-n:]) for stop in stops)),
                       default=0)
            assert out == fed[: len(fed) - held], (stops, fed)


def test_include_stop_str_in_output(tok, byte_ids):
    detok = IncrementalDetokenizer(tok, stop=["</answer>"], include_stop_str_in_output=True)
    deltas, stopped = run(detok, byte_ids(b"<answer>7</answer> trailing"))
    assert stopped and "".join(deltas) == "<answer>7</answer>"


def test_held_back_text_is_flushed_when_no_stop_matches(tok, byte_ids):
    detok = IncrementalDetokenizer(tok, stop=["STOP", "\n\n"])
    assert detok.add(byte_ids(b"one ST")) == ("one ", False)  # "ST" may start "STOP"
    assert detok.add(byte_ids(b"A")) == ("STA", False)  # no longer can
    assert detok.add(byte_ids(b"y\n")) == ("y", False)
    assert detok.flush() == "\n"
    assert detok.text == "one STAy\n"


def test_multibyte_stop_string_split_across_tokens(tok, byte_ids):
    deltas, stopped = run(IncrementalDetokenizer(tok, stop=["😀!"]), byte_ids("ok 😀?😀! no".encode()))
    assert stopped and "".join(deltas) == "ok 😀?"
    assert all("\ufffd" not in delta for delta in deltas)


def test_stop_never_leaks_into_any_delta(tok):
    text = "Let me think. Final Answer: 12"
    ids = tok.encode(text)
    stop = "Final Answer:"
    deltas, stopped = run(IncrementalDetokenizer(tok, stop=[stop]), ids)
    assert stopped
    emitted = ""
    for delta in deltas:
        emitted += delta
        assert text.startswith(emitted) and len(emitted) <= text.index(stop)


def test_no_add_after_stop(tok, byte_ids):
    detok = IncrementalDetokenizer(tok, stop=["x"])
    assert detok.add(byte_ids(b"ax")) == ("a", True)
    assert detok.flush() == ""
    with pytest.raises(AssertionError):
        detok.add(byte_ids(b"b"))


# --- SentencePiece leading space -----------------------------------------------------------------


def _tiny_sentencepiece() -> Tokenizer:
    tokens = [
        "<unk>",
        "<s>",
        "</s>",
        *(f"<0x{b:02X}>" for b in range(256)),
        "▁",
        "▁Hello",
        "▁world",
        "!",
    ]
    metadata = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * len(tokens),
        "tokenizer.ggml.token_type": [2, 3, 3, *[6] * 256, 1, 1, 1, 1],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    return Tokenizer.from_gguf(GGUFFile(path=Path("memory.gguf"), tensors=[], metadata=metadata))


def test_sentencepiece_first_space_is_stripped_like_decode():
    spm = _tiny_sentencepiece()
    hello, world, bang = (
        spm.token_bytes_table.index(b" Hello"),
        spm.token_bytes_table.index(b" world"),
        262,
    )
    for ids in (
        [1, hello, world, bang],
        [hello, world],
        [259, world],
        [1, 259, 259, hello],
    ):
        for skip in (True, False):
            deltas, _ = run(IncrementalDetokenizer(spm, skip_special_tokens=skip), ids)
            assert "".join(deltas) == spm.decode(ids, skip_special_tokens=skip), (
                ids,
                skip,
            )
    detok = IncrementalDetokenizer(spm)
    assert detok.add([1, hello]) == ("Hello", False)
    assert detok.add([world]) == (" world", False)
    assert spm.decode([1, hello, world], skip_special_tokens=False) == "<s> Hello world"
