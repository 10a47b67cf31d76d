"""`--dtype auto`: the checkpoint's own precision picks the path, then the CPU's instructions."""

import json

import pytest

from lmserve.cli import build_parser, default_model_path
from lmserve.config import EngineConfig
from lmserve.weights import dtype as auto
from lmserve.weights.dtype import choose_dtype, gguf_weight_type, serving_dtype
from lmserve.weights.gguf import GGUFFile
from tests.helpers.tiny_models import save_hf_folder, tiny_hf_model, write_gguf

FULL = frozenset({"avx512f", "avx512_vnni", "avx512_bf16"})  # this project's machines
AVX_VNNI_ONLY = frozenset({"avx2", "avx_vnni"})
AVX2_ONLY = frozenset({"avx", "avx2", "fma", "f16c"})  # x86-64-v3, as AMD's Zen 1-3
NO_DOT_PRODUCTS = frozenset({"avx", "sse4_2"})
BF16_ONLY = frozenset({"avx512f", "avx512_bf16"})


@pytest.mark.parametrize(("source", "expected"), [
    ("gguf:Q4_0", "int4"), ("gguf:Q4_1", "int4"), ("gguf:Q4_K", "int4"),
    ("gguf:Q5_0", "int8"), ("gguf:Q5_1", "int8"), ("gguf:Q5_K", "int8"), ("gguf:Q6_K", "int8"),
    ("gguf:Q8_0", "int8"), ("gguf:F16", "bfloat16"), ("gguf:BF16", "bfloat16"), ("gguf:F32", "float32"),
    ("hf:bfloat16", "bfloat16"), ("hf:float16", "bfloat16"), ("hf:float32", "float32"), ("hf:", "float32"),
])
def test_the_checkpoint_decides_on_a_cpu_with_every_path(source, expected):
    assert choose_dtype(source, "cpu", FULL).dtype == expected


@pytest.mark.parametrize(("source", "flags", "expected"), [
    ("gguf:Q4_1", AVX_VNNI_ONLY, "int4"),  # AVX-VNNI runs the int8 products too
    ("gguf:Q4_1", BF16_ONLY, "bfloat16"),
    ("gguf:Q8_0", BF16_ONLY, "bfloat16"),
    ("gguf:Q4_1", AVX2_ONLY, "int4"),  # the W4A8 product on vpmaddubsw
    ("gguf:Q4_K", AVX2_ONLY, "int4"),
    ("gguf:Q8_0", AVX2_ONLY, "float32"),
    ("gguf:Q4_1", AVX2_ONLY - {"f16c"}, "float32"),
    ("gguf:Q4_1", NO_DOT_PRODUCTS, "float32"),
    ("gguf:F16", NO_DOT_PRODUCTS, "float32"),
    ("hf:bfloat16", AVX_VNNI_ONLY, "float32"),
    ("gguf:F32", NO_DOT_PRODUCTS, "float32"),
])
def test_a_cpu_without_the_instructions_gets_the_next_path_and_says_why(source, flags, expected):
    choice = choose_dtype(source, "cpu", flags)
    assert choice.dtype == expected
    if expected != choose_dtype(source, "cpu", FULL).dtype:
        assert "this CPU has no" in choice.reason and choice.reason.endswith(expected)


def test_other_devices_take_bfloat16_for_the_cpu_only_integer_paths():
    assert choose_dtype("gguf:Q4_1", "cuda", frozenset()).dtype == "bfloat16"
    assert choose_dtype("gguf:F32", "cuda", frozenset()).dtype == "float32"


def test_unknown_gguf_type_is_refused_by_name():
    with pytest.raises(ValueError, match="IQ2_XS"):
        choose_dtype("gguf:IQ2_XS", "cpu", FULL)


def test_the_default_model_is_read_as_q4_1():
    """Q4_1 projections, a Q8_0 token embedding: the layers' matrices decide."""
    assert gguf_weight_type(GGUFFile.open(default_model_path()).tensors) == "Q4_1"


@pytest.mark.parametrize(("quant", "expected"), [("Q4_0", "int4"), ("Q8_0", "int8"), ("F16", "bfloat16"),
                                                 ("F32", "float32")])
def test_a_gguf_file_keeps_its_quantization(tmp_path, monkeypatch, quant, expected):
    monkeypatch.setattr(auto, "cpu_flags", lambda: FULL)
    path = write_gguf(tiny_hf_model("llama"), tmp_path / "m.gguf", "llama", quant)
    assert gguf_weight_type(GGUFFile.open(path).tensors) == quant
    assert serving_dtype(path, "auto") == expected
    assert serving_dtype(path, "float32") == "float32"  # asked for explicitly: kept


@pytest.mark.parametrize(("key", "value", "expected"), [("torch_dtype", "bfloat16", "bfloat16"),
                                                        ("dtype", "bfloat16", "bfloat16"),
                                                        ("torch_dtype", "float32", "float32"),
                                                        (None, None, "float32")])
def test_a_hugging_face_folder_follows_its_torch_dtype(tmp_path, monkeypatch, key, value, expected):
    monkeypatch.setattr(auto, "cpu_flags", lambda: FULL)
    folder = save_hf_folder(tiny_hf_model("llama"), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config.pop("torch_dtype", None)
    config.pop("dtype", None)
    if key is not None:
        config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    assert serving_dtype(folder, "auto") == expected


def test_auto_is_the_default_everywhere():
    assert build_parser().parse_args(["serve"]).dtype == "auto"
    assert EngineConfig("m.gguf", "m").dtype == "auto"
    with pytest.raises(ValueError, match="float16"):
        EngineConfig("m.gguf", "m", dtype="float16")


# A Q4_K_M file's way (llama-quantize keeps attn_v and some ffn_down at Q6_K), written with the types
# the gguf package writes: Q4_0 layers, two matrices at Q8_0.
MIXED = {"blk.0.attn_v.weight": "Q8_0", "blk.1.ffn_down.weight": "Q8_0"}


def test_an_int4_file_keeps_its_wider_matrices_and_those_fused_with_them_at_int8(tmp_path):
    path = write_gguf(tiny_hf_model("llama"), tmp_path / "m.gguf", "llama", "Q4_0", tensor_quants=MIXED)
    tensors = GGUFFile.open(path).tensors
    assert gguf_weight_type(tensors) == "Q4_0"
    assert auto.int8_matrices(tensors) == {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight",
                                           "blk.1.ffn_down.weight"}
    plain = write_gguf(tiny_hf_model("llama"), tmp_path / "plain.gguf", "llama", "Q4_0")
    assert auto.int8_matrices(GGUFFile.open(plain).tensors) == frozenset()


def test_the_size_estimate_counts_the_wider_matrices_at_int8(tmp_path, monkeypatch):
    from lmserve.weights.size import MATRIX_BYTES, estimated_weight_bytes

    monkeypatch.setattr(auto, "cpu_flags", lambda: FULL)
    path = write_gguf(tiny_hf_model("llama"), tmp_path / "m.gguf", "llama", "Q4_0", tensor_quants=MIXED)
    tensors = GGUFFile.open(path).tensors
    wider = sum(int(t.shape[0]) * int(t.shape[1]) for t in tensors if t.name in auto.int8_matrices(tensors))
    difference = estimated_weight_bytes(path, "auto") - estimated_weight_bytes(path, "int4")
    assert wider > 0 and abs(difference - wider * (MATRIX_BYTES["int8"] - MATRIX_BYTES["int4"])) <= 1


def test_the_size_estimate_parses_a_gguf_header_once(tmp_path, monkeypatch):
    """The fleet estimates each model it plans: its header parsed once, without its vocabulary."""
    from lmserve.weights.size import estimated_weight_bytes

    monkeypatch.setattr(auto, "cpu_flags", lambda: FULL)
    path = write_gguf(tiny_hf_model("llama"), tmp_path / "m.gguf", "llama", "Q4_0", tensor_quants=MIXED)
    opened = []
    real_open = GGUFFile.open.__func__
    monkeypatch.setattr(GGUFFile, "open",
                        classmethod(lambda cls, p, **kw: (opened.append((p, kw)), real_open(cls, p, **kw))[1]))
    assert estimated_weight_bytes(path, "auto") > estimated_weight_bytes(path, "int4")
    assert opened == [(path, {"arrays": False})] * 2  # one for each estimate
