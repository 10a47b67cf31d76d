"""lmserve's Llama and Qwen2 models against transformers on tiny random configs, loaded from
safetensors folders and from GGUF files, through the paged KV cache (whole prefill, chunked
prefill and single-token decodes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmserve.cache.kv_cache import allocate_kv_caches
from lmserve.model.attention import AttentionMetadata, PrefillSeq
from lmserve.weights.load import load_weights
from tests.helpers.tiny_models import save_hf_folder, tiny_hf_model, write_gguf

BLOCK = 4


def reference_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()  # (len, vocab)


def _slots(block_ids, length):
    return (torch.tensor(block_ids)[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[:length]


def run_paged(model, config, ids: list[int], chunks: list[int]) -> torch.Tensor:
    """Feed `ids` in chunks of the given sizes (size 1 goes through the decode path) over a
    cache whose blocks are deliberately out of order; return logits for every position."""
    caches = allocate_kv_caches(config, 64, BLOCK, torch.float32, torch.device("cpu"))
    block_ids = list(range(63, 63 - (len(ids) + BLOCK - 1) // BLOCK, -1))
    logits, start = [], 0
    for size in chunks:
        end = start + size
        all_slots = _slots(block_ids, end)
        if size == 1:
            meta = AttentionMetadata(all_slots[start:end], 1, all_slots[None, :], torch.tensor([end]), [], 1,
                                     decode_kernel=False)
        else:
            meta = AttentionMetadata(all_slots[start:end], 0, None, None,
                                     [PrefillSeq(0, size, end, all_slots if start else None)])
        hidden = model(torch.tensor(ids[start:end]), torch.arange(start, end), caches, meta)
        logits.append(model.compute_logits(hidden))
        start = end
    return torch.cat(logits)


@pytest.fixture(params=["llama", "qwen2"])
def family(request):
    return request.param


def test_safetensors_prefill_matches_transformers(tmp_path, family):
    hf = tiny_hf_model(family)
    model, config, _ = load_weights(save_hf_folder(hf, tmp_path / "m"))
    ids = torch.randint(0, 300, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = run_paged(model, config, ids, [23])
    torch.testing.assert_close(ours, reference_logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_chunked_prefill_and_decode_match_transformers(tmp_path, family):
    hf = tiny_hf_model(family, seed=3)
    model, config, _ = load_weights(save_hf_folder(hf, tmp_path / "m"))
    ids = torch.randint(0, 300, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    ours = run_paged(model, config, ids, [7, 9, 1, 1, 5, 1, 6])
    torch.testing.assert_close(ours, reference_logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_chunked_prefill_equals_one_shot(tmp_path):
    hf = tiny_hf_model("qwen2", seed=4)
    model, config, _ = load_weights(save_hf_folder(hf, tmp_path / "m"))
    ids = list(range(3, 40))
    one_shot = run_paged(model, config, ids, [37])
    torch.testing.assert_close(run_paged(model, config, ids, [5, 16, 3, 13]), one_shot, atol=1e-5, rtol=1e-5)


def test_tied_embeddings(tmp_path):
    hf = tiny_hf_model("llama", tie=True, seed=5)
    model, config, _ = load_weights(save_hf_folder(hf, tmp_path / "m"))
    assert config.tie_word_embeddings
    ids = list(range(10, 30))
    torch.testing.assert_close(run_paged(model, config, ids, [20]), reference_logits(hf, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tie", [False, True])
def test_gguf_f32_matches_transformers(tmp_path, family, tie):
    hf = tiny_hf_model(family, tie=tie, seed=7)
    model, config, gguf = load_weights(write_gguf(hf, tmp_path / "m.gguf", family))
    assert gguf.architecture == family and config.attention_bias == (family == "qwen2")
    ids = list(range(40, 61))
    ours = run_paged(model, config, ids, [12, 1, 1, 7])
    torch.testing.assert_close(ours, reference_logits(hf, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("quant,tolerance", [("F16", 2e-2), ("BF16", 1e-1), ("Q8_0", 1e-1), ("Q5_1", 0.5),
                                             ("Q5_0", 0.5), ("Q4_1", 1.0), ("Q4_0", 1.0)])
def test_gguf_quantized_close_to_transformers(tmp_path, quant, tolerance):
    hf = tiny_hf_model("llama", seed=9)
    model, config, _ = load_weights(write_gguf(hf, tmp_path / "m.gguf", "llama", quant))
    ids = list(range(5, 25))
    diff = (run_paged(model, config, ids, [20]) - reference_logits(hf, ids)).abs().max().item()
    assert 0 < diff < tolerance  # dequantized, so close but not bit-equal


def test_unsupported_architecture_is_named(tmp_path):
    import gguf

    path = tmp_path / "x.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    with pytest.raises(ValueError, match="mamba"):
        load_weights(path)


def _write_raw_tensor(path, qtype_name: str, block_bytes: np.ndarray, rows: int):
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.ffn_down.weight", block_bytes.reshape(rows, -1), raw_dtype=gguf.GGMLQuantizationType[qtype_name])
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()


@pytest.mark.parametrize("qtype,block_size,scale_offsets", [
    ("Q4_K", 144, [0, 2]),      # d, dmin are the first two fp16s
    ("Q5_K", 176, [0, 2]),
    ("Q6_K", 210, [208]),       # d is the last fp16
])
def test_k_quant_tensors_dequantize_in_pytorch_layout(tmp_path, qtype, block_size, scale_offsets):
    # The gguf package cannot quantize K types, so write valid random blocks with sane scales.
    from lmserve.weights.gguf import GGUFFile

    rows, blocks_per_row = 3, 2  # 3 x 512 weights
    raw = np.random.default_rng(0).integers(0, 256, (rows * blocks_per_row, block_size), dtype=np.uint8)
    for offset in scale_offsets:
        raw[:, offset:offset + 2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    path = tmp_path / "k.gguf"
    _write_raw_tensor(path, qtype, raw, rows)
    f = GGUFFile.open(path)
    f.check_quant_types()
    [(name, array)] = list(f.iter_tensors())
    assert array.shape == (rows, 256 * blocks_per_row) and np.isfinite(array).all() and np.abs(array).max() > 0
    # Row r of the tensor is exactly the dequantized blocks of row r.
    import gguf
    row1 = gguf.quants.dequantize(raw[blocks_per_row:2 * blocks_per_row].reshape(1, -1), gguf.GGMLQuantizationType[qtype])
    np.testing.assert_array_equal(array[1], row1.reshape(-1))


def test_unsupported_quant_type_is_named(tmp_path):
    raw = np.zeros((1, 84), dtype=np.uint8)  # one Q2_K block
    _write_raw_tensor(tmp_path / "q2.gguf", "Q2_K", raw, 1)
    with pytest.raises(ValueError, match="Q2_K"):
        load_weights(tmp_path / "q2.gguf")


@pytest.mark.parametrize("native", [True, False])
def test_runner_steps_with_drafts_run_as_decode_rows_and_match_transformers(tmp_path, native):
    """Through ModelRunner.prepare: a decode with drafts runs its last token and drafts as decode
    rows (each attending to the cache up to itself), in steps beside another sequence's prompt
    chunks; with every draft kept, every position's logits are transformers' own."""
    from lmserve.engine.batch import ScheduledSeq, SchedulerOutput
    from lmserve.engine.runner import ModelRunner
    from lmserve.request import Request, SamplingParams

    hf = tiny_hf_model("qwen2", seed=5)
    model, config, _ = load_weights(save_hf_folder(hf, tmp_path / "m"))
    if not native:
        model.native = None
    caches = allocate_kv_caches(config, 64, BLOCK, torch.float32, torch.device("cpu"))
    runner = ModelRunner(model, caches, BLOCK, torch.device("cpu"))
    g = torch.Generator().manual_seed(6)
    spec_ids = torch.randint(0, 300, (40,), generator=g).tolist()  # a 20-token prompt, then 20 "outputs"
    spec = Request("spec", spec_ids[:20], SamplingParams(temperature=0))
    spec.block_ids = list(range(63, 53, -1))  # out of order
    other = Request("other", torch.randint(0, 300, (30,), generator=g).tolist(), SamplingParams(temperature=0))
    other.block_ids = list(range(10))
    hidden_of = {"spec": [], "other": []}
    plan = [(20, 0, 12), (1, 3, 9), (1, 5, 9), (1, 0, 0), (1, 2, 0), (1, 4, 0)]  # spec's count, drafts; other's
    for count, num_drafts, other_count in plan:
        known = len(spec.output_ids)
        draft = spec_ids[20 + known:20 + known + num_drafts] if count == 1 else []
        seqs = [ScheduledSeq(spec, count + len(draft), draft)]
        if other_count:
            seqs.append(ScheduledSeq(other, other_count))
        inp = runner.prepare(SchedulerOutput(seqs))
        assert inp.meta.num_decodes == (1 + len(draft) if count == 1 else 0)
        hidden = model(inp.input_ids, inp.positions, caches, inp.meta)
        start = 0
        for seq in sorted(seqs, key=lambda s: not s.runs_as_decode_rows):  # decode rows first
            hidden_of[seq.request.request_id].append(hidden[start:start + seq.num_new_tokens])
            start += seq.num_new_tokens
        spec.num_computed_tokens += count + len(draft)
        for token in spec_ids[20 + known:20 + known + len(draft) + 1]:  # every draft kept, then the next
            spec.append_output(token)
        other.num_computed_tokens += other_count
    ours = model.compute_logits(torch.cat(hidden_of["spec"]))
    torch.testing.assert_close(ours, reference_logits(hf, spec_ids[:ours.shape[0]]), atol=1e-4, rtol=1e-4)
    theirs = model.compute_logits(torch.cat(hidden_of["other"]))
    torch.testing.assert_close(theirs, reference_logits(hf, other.prompt_ids), atol=1e-4, rtol=1e-4)
