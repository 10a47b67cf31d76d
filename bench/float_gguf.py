"""The packaged SmolLM2 GGUF rewritten with F16 or BF16 matrices (its Q4_1/Q8_0 values, rounded to 16 bits),
for benchmarking the path `lmserve serve` takes on a 16-bit file (`--dtype auto` -> bfloat16)
against llama-server on the same file. Vectors (the norms) stay F32, as converters write them.

    python -m bench.float_gguf                      # F16 under ~/.cache/lmserve-bench/
    python -m bench compare --gguf ~/.cache/lmserve-bench/smollm2-135m.F16.gguf \\
        --lmserve-args=--no-embedding-model --workloads decode --concurrency 1,4,32
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

CACHE = Path.home() / ".cache" / "lmserve-bench"
FILE_TYPES = {"F16": 1, "BF16": 32}  # general.file_type: LLAMA_FTYPE_MOSTLY_F16 / _BF16


def read_fields(reader, keep: Callable[[str], bool]) -> dict[str, tuple]:
    """A GGUF's key-value fields whose names `keep` accepts, as GGUFWriter.add_key_value takes them."""
    import gguf

    fields = {}
    for name, field in reader.fields.items():
        if not keep(name):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            item = field.types[-1]
            values = [field.parts[i].tobytes().decode() if item == gguf.GGUFValueType.STRING
                      else field.parts[i].tolist()[0] for i in field.data]
            fields[name] = (values, gguf.GGUFValueType.ARRAY, item)
        elif kind == gguf.GGUFValueType.STRING:
            fields[name] = (field.parts[field.data[0]].tobytes().decode(), kind)
        else:
            fields[name] = (field.parts[field.data[0]].tolist()[0], kind)
    return fields


def write_float_copy(source: Path, path: Path, kind: str) -> Path:
    """`source` with every matrix widened to `kind` (F16 or BF16); everything else as it was."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"]
    writer = gguf.GGUFWriter(str(path), arch.parts[arch.data[0]].tobytes().decode())
    skip = ("GGUF.", "general.architecture", "general.file_type")
    for key, value in read_fields(reader, lambda name: not name.startswith(skip)).items():
        writer.add_key_value(key, *value)
    writer.add_file_type(FILE_TYPES[kind])
    target = gguf.GGMLQuantizationType[kind]
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        if values.ndim == 1:
            writer.add_tensor(tensor.name, values.astype(np.float32))
        else:
            writer.add_tensor(tensor.name, gguf.quants.quantize(values.astype(np.float32), target), raw_dtype=target)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main() -> None:
    from lmserve.cli import default_model_path

    parser = argparse.ArgumentParser(prog="python -m bench.float_gguf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="F16", help="comma list of F16, BF16")
    parser.add_argument("--out", type=Path, default=CACHE)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in args.kind.split(","):
        path = args.out / f"smollm2-135m.{kind}.gguf"
        started = time.monotonic()
        write_float_copy(Path(default_model_path()), path, kind)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
