"""Writing benchmark GGUF files (bench.big_shape, bench.float_gguf): fields read back from a file,
a writer finished, and the command line both share."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

CACHE = Path.home() / ".cache" / "lmserve-bench"


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


def finish(writer) -> None:
    """Write a GGUFWriter's header, fields and tensors, and close its file."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_files(prog: str, doc: str, option: str, default: str, help_text: str, file_name: Callable[[str], str],
                write: Callable[[Path, str], object]) -> None:
    """The command line of a module that writes one file per kind named by `option` (a comma list)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(option, default=default, help=help_text)
    parser.add_argument("--out", type=Path, default=CACHE)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in getattr(args, option.lstrip("-")).split(","):
        path = args.out / file_name(kind)
        started = time.monotonic()
        write(path, kind)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.monotonic() - started:.0f} s")
