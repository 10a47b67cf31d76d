"""What loading a model leaves in the server process besides the model."""

from __future__ import annotations

import subprocess
import sys

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
