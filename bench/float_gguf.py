"""The packaged SmolLM2 GGUF rewritten with F16 or BF16 matrices (its Q4_1/Q8_0 values, rounded to 16 bits),
for benchmarking the path `lmserve serve` takes on a 16-bit file (`--dtype auto` -> bfloat16)
against llama-server on the same file. Vectors (the norms) stay F32, as converters write them.

    python -m bench.float_gguf                      # F16 under ~/.cache/lmserve-bench/
    python -m bench compare --gguf ~/.cache/lmserve-bench/smollm2-135m.F16.gguf \\
        --lmserve-args=--no-embedding-model --workloads decode --concurrency 1,4,32
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.gguf_files import finish, read_fields, write_files
FILE_TYPES = {"F16": 1, "BF16": 32}  # general.file_type: LLAMA_FTYPE_MOSTLY_F16 / _BF16


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
    finish(writer)
    return path


def main() -> None:
    from lmserve.cli import default_model_path

    write_files("python -m bench.float_gguf", __doc__, "--kind", "F16", "comma list of F16, BF16",
                lambda kind: f"smollm2-135m.{kind}.gguf",
                lambda path, kind: write_float_copy(Path(default_model_path()), path, kind))


if __name__ == "__main__":
    main()
