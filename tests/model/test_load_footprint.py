"""What loading a model leaves in the server process besides the model, and what it holds while
it loads."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lmserve.model.llama import LlamaForCausalLM
from lmserve.weights import load
from tests.helpers.tiny_models import save_hf_folder, tiny_hf_model, write_gguf

# torch's compiler stack: ~900 modules and ~70 MiB resident for the server's whole life, were it
# imported (nn.Embedding's random init or arange on the meta device used to pull it in).
COMPILER_MODULES = ("torch._dynamo", "torch._inductor", "torch.distributed.tensor")

PROBE = """
import sys
from lmserve.weights.load import load_weights
load_weights(sys.argv[1], sys.argv[2])
print(" ".join(m for m in {modules!r} if m in sys.modules))
"""


def imported_by_loading(path, dtype: str) -> list[str]:
    probe = PROBE.format(modules=COMPILER_MODULES)
    done = subprocess.run([sys.executable, "-c", probe, str(path), dtype], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_loading_a_gguf_imports_no_compiler_modules(tmp_path):
    path = write_gguf(tiny_hf_model("llama", tie=True), tmp_path / "tiny.gguf", "llama")
    assert imported_by_loading(path, "int4") == []


def test_loading_an_hf_folder_imports_no_compiler_modules(tmp_path):
    path = save_hf_folder(tiny_hf_model("qwen2"), tmp_path / "qwen2")
    assert imported_by_loading(path, "bfloat16") == []


@pytest.mark.parametrize("dtype", ["int4", "bfloat16"])
def test_layers_are_read_one_at_a_time(tmp_path, monkeypatch, dtype):
    """Loading reads a layer's tensors only once the layer before is done (quantized, or fused and
    cast), so the float32 copies of one layer at a time are alive, not the whole model's."""
    path = write_gguf(tiny_hf_model("llama", tie=True), tmp_path / "tiny.gguf", "llama")
    events = []
    read = load._read_gguf_tensor
    monkeypatch.setattr(load, "_read_gguf_tensor", lambda gguf, config, name, hf_name: (
        events.append(("read", hf_name)), read(gguf, config, name, hf_name))[1])
    done = LlamaForCausalLM.quantize_layer if dtype == "int4" else LlamaForCausalLM.prepare_layer
    name = done.__name__
    monkeypatch.setattr(LlamaForCausalLM, name, staticmethod(lambda layer, kind, *more: (
        events.append(("done", id(layer))), done(layer, kind, *more))[1]))
    model, _, _ = load.load_weights(path, dtype)
    index = {id(layer): i for i, layer in enumerate(model.model.layers)}
    open_layers, finished = set(), []
    for kind, what in events:
        if kind == "read" and what.startswith("model.layers."):
            layer = int(what.split(".")[2])
            assert layer == len(finished), f"layer {layer} read while layer {len(finished)} was not done"
            open_layers.add(layer)
        elif kind == "done":
            finished.append(index[what])
            open_layers.discard(index[what])
    assert finished == list(range(model.config.num_hidden_layers)) and not open_layers
    assert events[-1][0] == "read" and not events[-1][1].startswith("model.layers.")  # then the rest


def test_the_load_holds_its_largest_pieces_apart(tmp_path, monkeypatch):
    """The order that keeps the load's peak below the serving level (bench/RESULTS.md, thirty-second
    sitting): the heap is trimmed after each layer; the head comes after the last layer, so the
    layers' float32 copies are never held beside it; the library pages making the weights touched
    are released before the tokenizer is built, so they are not held beside its allocations."""
    path = write_gguf(tiny_hf_model("llama", tie=True, vocab_size=320), tmp_path / "tiny.gguf", "llama", "Q8_0")
    events = []
    quantize_layer, head_rows = LlamaForCausalLM.quantize_layer, LlamaForCausalLM.quantize_head_rows
    monkeypatch.setattr(LlamaForCausalLM, "quantize_layer", staticmethod(lambda layer, kind, *more: (
        events.append("layer"), quantize_layer(layer, kind, *more))[1]))
    monkeypatch.setattr(LlamaForCausalLM, "quantize_head_rows", lambda self, rows: (
        events.append("head"), head_rows(self, rows))[1])
    monkeypatch.setattr(load, "return_freed_memory", lambda: events.append("trim"))
    monkeypatch.setattr(load, "release_library_pages", lambda: events.append("release") or 0)
    monkeypatch.setattr(load.Tokenizer, "from_gguf", lambda gguf: events.append("tokenizer"))  # the file has none
    loaded = load.load_model(path, "int4")
    layers = loaded.config.num_hidden_layers
    assert events[:2 * layers] == ["layer", "trim"] * layers
    assert events[2 * layers] == "head"
    assert events[-2:] == ["release", "tokenizer"]


def test_a_missing_tensor_fails_before_any_is_read(tmp_path, monkeypatch):
    path = write_gguf(tiny_hf_model("llama"), tmp_path / "tiny.gguf", "llama")
    real = load._read_gguf
    monkeypatch.setattr(load, "_read_gguf", lambda gguf: _without(real(gguf), "model.layers.1.mlp.up_proj.weight"))
    reads = []
    monkeypatch.setattr(load, "_read_gguf_tensor", lambda *args: reads.append(args))
    with pytest.raises(ValueError, match="missing 1 parameters.*model.layers.1.mlp.up_proj.weight"):
        load.load_weights(path, "int4")
    assert reads == []


def _without(read, name):
    config, tensors, freqs = read
    return config, load.LazyTensors({n: tensors._readers[n] for n in tensors if n != name}), freqs


ENGINE_PROBE = """
import sys
from lmserve.cli import default_model_path
from lmserve.config import CacheConfig, EngineConfig, SchedulerConfig
from lmserve.engine.engine import LLMEngine
from lmserve.request import GrammarSpec
import lmserve.server.app
engine = LLMEngine.from_config(EngineConfig(str(default_model_path()), "m", cache=CacheConfig(16, 8 << 20),
                                            scheduler=SchedulerConfig(max_model_len=64)))
heavy = ("xgrammar", "transformers", "huggingface_hub")
print(" ".join(m for m in heavy if m in sys.modules))
compiled = engine.grammar.compile(GrammarSpec("regex", "(yes|no)"))
print(type(compiled).__module__.split(".")[0], " ".join(m for m in heavy if m in sys.modules))
"""


def test_xgrammar_is_imported_by_the_first_constraint_not_at_start():
    """Importing xgrammar brings transformers and huggingface_hub (~33 MiB resident): a server
    imports it when a request first carries a constraint, not at start-up."""
    done = subprocess.run([sys.executable, "-c", ENGINE_PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    at_start, after_compile = done.stdout.splitlines()
    assert at_start == ""
    assert after_compile.split() == ["xgrammar", "xgrammar", "transformers", "huggingface_hub"]


KERNELS_PROBE = """
import sys
from lmserve.kernels import build_directory, native_module
module = native_module()
print((build_directory() / "lmserve_native.so").is_file(), module is not None and hasattr(module, "paged_decode_attention"))
print(" ".join(m for m in ("setuptools", "distutils", "torch.utils.cpp_extension") if m in sys.modules))
"""


def test_built_kernels_load_without_the_build_tooling():
    """Set-up builds the kernels once; a server then imports the built module directly, not
    through torch's `load`, which imports setuptools and ~90 modules to find it up to date."""
    done = subprocess.run([sys.executable, "-c", KERNELS_PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    built, imported = (done.stdout.splitlines() + [""])[:2]
    assert built == "True True"
    assert imported == ""


def test_a_broken_built_module_is_built_again(tmp_path):
    """A file left by a build cut short does not import: `_import_built` says so (None) and
    `native_module` goes on to torch's `load`, which builds it again."""
    from lmserve.kernels import _import_built

    broken = tmp_path / "lmserve_native.so"
    broken.write_bytes(b"\x7fELF cut short")
    assert _import_built(broken) is None
    assert _import_built(tmp_path / "absent.so") is None


@pytest.mark.parametrize("tie", [True, False])
def test_a_quantized_head_is_made_from_rows_without_its_whole_float_table(tmp_path, monkeypatch, tie):
    """Where the head's W8A8 copy is packed (the kernels' VNNI product), it is made from the
    checkpoint's rows a piece at a time, after the layers: the whole float32 table (a tied model's
    embeddings) is never read, and the model is the one the whole table gives."""
    from lmserve.model.weight_formats.int8 import W8A8Weight, int8_matmul_pays, packs_weights

    path = write_gguf(tiny_hf_model("llama", tie=tie, vocab_size=320), tmp_path / "tiny.gguf", "llama", "Q8_0")
    reads = []
    read = load._read_gguf_tensor
    monkeypatch.setattr(load, "_read_gguf_tensor", lambda gguf, config, name, hf_name: (
        reads.append(hf_name), read(gguf, config, name, hf_name))[1])
    model, _, _ = load.load_weights(path, "int4")
    head_name = "model.embed_tokens.weight" if tie else "lm_head.weight"
    by_rows = int8_matmul_pays() and packs_weights()
    assert (head_name not in reads) == by_rows and isinstance(model.lm_head.storage, W8A8Weight)
    monkeypatch.setattr(load.LazyTensors, "row_reader", lambda self, name: None)
    reference, _, _ = load.load_weights(path, "int4")
    assert torch.equal(model.lm_head.storage.weight, reference.lm_head.storage.weight)
    assert torch.equal(model.lm_head.storage.scales, reference.lm_head.storage.scales)
    ids = torch.arange(0, 320, 7)
    assert torch.equal(model.model.embed_tokens(ids).float(), reference.model.embed_tokens(ids).float())
    assert type(model.model.embed_tokens) is type(reference.model.embed_tokens)
