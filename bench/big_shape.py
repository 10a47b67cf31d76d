"""A bigger model for the side-by-side benchmark: random weights in the shape of Qwen2-0.5B
(hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocabulary 151,936, tied embeddings),
written as GGUF files by the gguf package, one per quantization. Speed only: its text is noise.

    python -m bench.big_shape                       # Q4_1 and Q8_0 under ~/.cache/lmserve-bench/
    python -m bench compare --gguf ~/.cache/lmserve-bench/qwen2-0.5b-shape.Q4_1.gguf \\
        --lmserve-args=--no-embedding-model --workloads decode --concurrency 1,16,64 --max-tokens 64

The tokenizer is the packaged SmolLM2's (a byte-level BPE both servers load), its vocabulary padded
with control tokens to 151,936 entries; the benchmark sends token ids, so only the shapes matter.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from bench.gguf_files import finish, read_fields, write_files
SHAPE = {"hidden": 896, "layers": 24, "heads": 14, "kv_heads": 2, "ffn": 4864, "vocab": 151_936,
         "context": 32_768, "rope_theta": 1_000_000.0, "rms_eps": 1e-6}
STD = 0.02  # the initializer range of Qwen2's config: activations stay finite through 24 layers


@functools.cache
def _smollm2_tokenizer_fields() -> dict[str, tuple]:
    """Read once a process: the gguf package's reader takes ~6 s over SmolLM2's 98,000 strings."""
    import gguf

    from lmserve.cli import default_model_path

    return read_fields(gguf.GGUFReader(default_model_path()), lambda name: name.startswith("tokenizer."))


def tokenizer_metadata(vocab: int) -> dict[str, tuple]:
    """SmolLM2's tokenizer fields, its tokens padded with control tokens to `vocab` entries."""
    import gguf

    fields = {key: (list(value[0]) if isinstance(value[0], list) else value[0], *value[1:])
              for key, value in _smollm2_tokenizer_fields().items()}  # lists of their own: padded below
    tokens, types = fields["tokenizer.ggml.tokens"][0], fields["tokenizer.ggml.token_type"][0]
    extra = vocab - len(tokens)
    tokens += [f"<|extra_{i}|>" for i in range(extra)]
    types += [int(gguf.TokenType.CONTROL)] * extra
    return fields


def write_model(path: Path, quant: str, seed: int = 0, shape: dict | None = None, arch: str = "qwen2",
                embedding_quant: str = "Q8_0", name: str = "qwen2-0.5b-shape") -> Path:
    """The file: SHAPE (or `shape`) with random weights, its layers' matrices in `quant` and the tied
    embedding in `embedding_quant`; "qwen2" has biases on q, k and v, "llama" none."""
    import gguf

    s = shape or SHAPE
    head_dim = s["hidden"] // s["heads"]
    rng = np.random.default_rng(seed)
    qtype = gguf.GGMLQuantizationType[quant]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_block_count(s["layers"])
    writer.add_context_length(s["context"])
    writer.add_embedding_length(s["hidden"])
    writer.add_feed_forward_length(s["ffn"])
    writer.add_head_count(s["heads"])
    writer.add_head_count_kv(s["kv_heads"])
    writer.add_rope_freq_base(s["rope_theta"])
    writer.add_layer_norm_rms_eps(s["rms_eps"])
    writer.add_vocab_size(s["vocab"])
    for key, value in tokenizer_metadata(s["vocab"]).items():
        writer.add_key_value(key, *value)

    def matrix(name: str, rows: int, cols: int, as_type: gguf.GGMLQuantizationType = qtype) -> None:
        data = rng.normal(0.0, STD, (rows, cols)).astype(np.float32)
        writer.add_tensor(name, gguf.quants.quantize(data, as_type), raw_dtype=as_type)

    def vector(name: str, size: int, value: float | None = None) -> None:
        data = np.full(size, value, np.float32) if value is not None else rng.normal(0.0, STD, size).astype(np.float32)
        writer.add_tensor(name, data)

    # The tied embedding (and so the head) at Q8_0 by default whatever the layers' type: llama-quantize
    # writes a tied head as Q6_K, or Q8_0 where its rows (896 here, 576 in SmolLM2) are not whole
    # 256-blocks, which is how the packaged SmolLM2 Q4_1 file has it (bench.kquant_shape writes F16
    # for llama-quantize to make its Q6_K).
    matrix("token_embd.weight", s["vocab"], s["hidden"], gguf.GGMLQuantizationType[embedding_quant])
    vector("output_norm.weight", s["hidden"], 1.0)
    kv = s["kv_heads"] * head_dim
    for layer in range(s["layers"]):
        blk = f"blk.{layer}"
        vector(f"{blk}.attn_norm.weight", s["hidden"], 1.0)
        vector(f"{blk}.ffn_norm.weight", s["hidden"], 1.0)
        matrix(f"{blk}.attn_q.weight", s["hidden"], s["hidden"])
        if arch == "qwen2":
            vector(f"{blk}.attn_q.bias", s["hidden"])
        matrix(f"{blk}.attn_k.weight", kv, s["hidden"])
        if arch == "qwen2":
            vector(f"{blk}.attn_k.bias", kv)
        matrix(f"{blk}.attn_v.weight", kv, s["hidden"])
        if arch == "qwen2":
            vector(f"{blk}.attn_v.bias", kv)
        matrix(f"{blk}.attn_output.weight", s["hidden"], s["hidden"])
        matrix(f"{blk}.ffn_gate.weight", s["ffn"], s["hidden"])
        matrix(f"{blk}.ffn_up.weight", s["ffn"], s["hidden"])
        matrix(f"{blk}.ffn_down.weight", s["hidden"], s["ffn"])
    finish(writer)
    return path


def main() -> None:
    write_files("python -m bench.big_shape", __doc__, "--quant", "Q4_1,Q8_0", "comma list of GGUF types",
                lambda quant: f"qwen2-0.5b-shape.{quant}.gguf", write_model)


if __name__ == "__main__":
    main()
