"""A Q4_K_M file, the quantization most GGUF downloads are, for the side-by-side benchmark: random
weights in a llama shape whose matrices are whole 256-blocks, as K-quants need (hidden 1024, 24
layers, 16 heads, 4 KV heads, MLP 2816, SmolLM2's tokenizer and vocabulary), written as F16 by the
gguf package (bench.big_shape's writer) and quantized by llama.cpp's own llama-quantize (the gguf
package cannot write K types). Its Q4_K_M: Q4_K layers, attn_v and ffn_down at Q6_K in 12 of the 24,
the tied table at Q6_K. Speed only: its text is noise.

    bash bench/build_llama_server.sh              # builds llama-quantize beside llama-server
    python -m bench.kquant_shape --llama-quantize ~/.cache/lmserve-bench/build/bin/llama-quantize
    python -m bench compare --gguf ~/.cache/lmserve-bench/kquant-shape.Q4_K_M.gguf \\
        --lmserve-args=--no-embedding-model --workloads decode --concurrency 1,32 --max-tokens 64
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

from bench.big_shape import write_model
from bench.gguf_files import CACHE

SHAPE = {"hidden": 1024, "layers": 24, "heads": 16, "kv_heads": 4, "ffn": 2816, "vocab": 49_152,
         "context": 8_192, "rope_theta": 100_000.0, "rms_eps": 1e-5}
NAME = "kquant-shape"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.kquant_shape", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-quantize", type=Path, required=True, help="llama.cpp's llama-quantize binary")
    parser.add_argument("--types", default="Q4_K_M", help="comma list of llama-quantize's type names")
    parser.add_argument("--out", type=Path, default=CACHE)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    source = args.out / f"{NAME}.F16.gguf"
    if not source.exists():
        started = time.monotonic()
        write_model(source, "F16", shape=SHAPE, arch="llama", embedding_quant="F16", name=NAME)
        print(f"wrote {source} ({source.stat().st_size / 2**20:.0f} MiB) in {time.monotonic() - started:.0f} s")
    for kind in args.types.split(","):
        path = args.out / f"{NAME}.{kind}.gguf"
        subprocess.run([str(args.llama_quantize), str(source), str(path), kind], check=True,
                       stdout=subprocess.DEVNULL)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
