"""The byte-length bound on token counts (lmserve/text/length_bound.py): sound on every text tried
for the tokenizers that have one, and absent for those that can fold text."""

from __future__ import annotations

import random

import pytest
from tokenizers import AddedToken, Tokenizer as Backend, models, normalizers, pre_tokenizers

from lmserve.text.length_bound import LengthBound, length_bound
from lmserve.text.token_bytes import sentencepiece_bytes

ADVERSARIAL = [
    "",
    "a",
    " " * 5000,
    "\n" + " " * 80,  # SmolLM2's longest token, 81 bytes
    "#" * 10_000,
    "<|im_start|>" * 500,
    "\x04\x06\x13" * 1000,  # bytes SmolLM2 has no token for: encoding drops them
    "a\x04b\x1dc" * 300,
    "😀👍🏽🇫🇷" * 200,
    "日本語のテキスト" * 300,
    "𝕏\U000f0000\U0010ffff" * 100,  # planes with bytes the vocabulary may lack
    "def f(x):\n    return x\n" * 200,
]


def random_texts(seed: int, count: int, pieces: list[str]) -> list[str]:
    rng = random.Random(seed)
    alphabet = [chr(c) for c in (*range(0, 0x250), 0x3000, 0x4E00, 0x1F600, 0xF0000)] + pieces
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 400))) for _ in range(count)]


def assert_sound(tokenizer, texts) -> None:
    for text in texts:
        data = text.encode("utf-8")
        assert len(tokenizer.encode(text, add_special_tokens=False)) >= tokenizer.min_num_tokens(data), text[:40]


def test_the_default_tokenizer_has_a_sound_bound(default_tokenizer):
    bound = default_tokenizer.length_bound
    assert bound is not None and bound.max_bytes_per_token == 81
    longest = [raw.decode("utf-8", "replace") for raw in default_tokenizer.token_bytes_table if len(raw) > 40]
    assert_sound(default_tokenizer, ADVERSARIAL + random_texts(0, 200, longest))


def test_dropped_bytes_do_not_count(default_tokenizer):
    assert default_tokenizer.encode("\x04" * 100, add_special_tokens=False) == []
    assert default_tokenizer.min_num_tokens(b"\x04" * 100) == 0
    assert default_tokenizer.min_num_tokens(b"a" * 810) == 10


def test_the_bound_refuses_megabytes_for_a_small_context(default_tokenizer):
    assert default_tokenizer.min_num_tokens(b"x" * 15_000_000) > 100_000


def spm_backend(missing_byte: int | None = None, unk: bool = True) -> Backend:
    """A SentencePiece-style BPE as lmserve builds one from a GGUF: byte fallback, '▁' prefixed."""
    pieces = ["<unk>", *(f"<0x{b:02X}>" for b in range(256) if b != missing_byte), "▁", "a", "b", "▁a", "ab", "▁ab"]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = [("▁", "a"), ("a", "b"), ("▁a", "b")]
    backend = Backend(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>" if unk else None,
                                 fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.add_special_tokens([AddedToken("</s>", special=True, normalized=False)])
    return backend


class Encoder:
    """`encode` and `min_num_tokens` over a backend, as the Tokenizer offers them."""

    def __init__(self, backend: Backend, bound: LengthBound):
        self.backend, self.bound = backend, bound

    def encode(self, text, add_special_tokens=False):
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def min_num_tokens(self, data):
        return self.bound.min_num_tokens(data)


def table(backend: Backend) -> list[bytes]:
    added = backend.get_added_tokens_decoder()
    by_id = {i: t for t, i in backend.get_vocab(with_added_tokens=True).items()}
    return [by_id[i].encode() if i in added else sentencepiece_bytes(by_id[i]) for i in range(len(by_id))]


def test_sentencepiece_with_byte_fallback_has_a_sound_bound():
    backend = spm_backend()
    bound = length_bound(backend, table(backend))
    assert bound == LengthBound(max_bytes_per_token=5)  # "<unk>"
    assert_sound(Encoder(backend, bound), ADVERSARIAL + random_texts(1, 200, ["ab", " ab", "</s>"]))


def test_no_bound_where_text_can_be_folded_or_dropped():
    backend = spm_backend(missing_byte=0xA9)  # "é" becomes <unk>, fused with its neighbours
    assert length_bound(backend, table(backend)) is None
    for normalizer in (normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace("ab", "")):
        backend = spm_backend()
        backend.normalizer = normalizer
        assert length_bound(backend, table(backend)) is None
    for pre_tokenizer in (pre_tokenizers.Whitespace(), pre_tokenizers.Split(" ", behavior="removed")):
        backend = spm_backend()
        backend.pre_tokenizer = pre_tokenizer
        assert length_bound(backend, table(backend)) is None
    backend = spm_backend()
    backend.add_special_tokens([AddedToken("<mask>", special=True, lstrip=True, rstrip=True)])
    assert length_bound(backend, table(backend)) is None


@pytest.mark.parametrize("model", [models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"),
                                   models.Unigram([("<unk>", 0.0), ("a", -1.0)], 0, byte_fallback=False)])
def test_no_bound_for_models_with_whole_word_unknowns(model):
    assert length_bound(Backend(model), [b"[UNK]", b"a"]) is None


def test_the_packaged_embedding_model_has_no_bound():
    from lmserve.cli import default_embedding_model_path
    from lmserve.text.tokenizer import Tokenizer

    assert Tokenizer.from_hf_folder(default_embedding_model_path()).length_bound is None  # WordPiece, lowercasing
