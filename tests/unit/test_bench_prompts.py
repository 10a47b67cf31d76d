import pytest

from bench.client import completion_body
from bench.prompts import TOKEN_ID_RANGE, make_prompts
from bench.workloads import (
    JSON_SCHEMA,
    Workload,
    json_schema,
    level_workloads,
    parse_kinds,
    workload_jobs,
    workload_prompts,
    workload_set,
)


def test_prompts_have_exact_lengths_and_safe_ids():
    prompts = make_prompts(5, 128, seed="s")
    assert [len(p) for p in prompts] == [128] * 5
    low, high = TOKEN_ID_RANGE
    assert all(low <= i < high for p in prompts for i in p)
    assert len({tuple(p[:8]) for p in prompts}) == 5  # distinct from the first tokens on


def test_shared_prefix_is_common_and_the_rest_differs():
    prompts = make_prompts(4, 1600, shared_prefix_tokens=1500, seed="s")
    assert [len(p) for p in prompts] == [1600] * 4
    assert all(p[:1500] == prompts[0][:1500] for p in prompts)
    assert len({tuple(p[1500:]) for p in prompts}) == 4
    assert make_prompts(2, 10, 10, seed="s")[0] == make_prompts(2, 10, 10, seed="s")[1]


def test_prompts_are_deterministic_per_seed():
    assert make_prompts(3, 16, 4, seed="a") == make_prompts(3, 16, 4, seed="a")
    assert make_prompts(3, 16, 4, seed="a") != make_prompts(3, 16, 4, seed="b")
    with pytest.raises(ValueError):
        make_prompts(1, 10, shared_prefix_tokens=11)


def test_workload_prompts_add_a_warmup_that_shares_the_prefix_and_differ_by_level():
    shared, cold = level_workloads([4], 1600, 8, shared_prefix_tokens=1500)
    prompts = workload_prompts(shared, "0")
    assert len(prompts) == shared.num_requests + 1 and all(p[:1500] == prompts[0][:1500] for p in prompts)
    cold_prompts = workload_prompts(cold, "0")
    assert len({tuple(p[:1500]) for p in cold_prompts}) == len(cold_prompts)
    c1, c2 = level_workloads([1, 2], 64, 8)
    assert workload_prompts(c1, "0")[0] != workload_prompts(c2, "0")[0]


def test_level_workloads():
    levels = level_workloads([1, 8], 128, 256)
    assert [(w.name, w.concurrency, w.num_requests) for w in levels] == [("decode-c1", 1, 4), ("decode-c8", 8, 16)]
    assert [w.kind for w in level_workloads([2], 1600, 8, 1500, num_requests=3)] == ["shared", "cold"]


def test_default_and_quick_workload_sets():
    default = {w.name: w for w in workload_set()}
    assert list(default) == ["decode-c1", "decode-c4", "decode-c16", "decode-c32", "decode-c64",
                             "prefill-2000", "shared-c16", "cold-c16", "mix-c16", "chat-c16", "system-c16",
                             "json-c1", "json-c16"]
    assert (default["decode-c64"].num_requests, default["decode-c64"].context_tokens) == (128, 384)
    assert (default["shared-c16"].shared_prefix_tokens, default["cold-c16"].shared_prefix_tokens) == (1500, 0)
    assert (default["chat-c16"].num_requests, default["chat-c16"].context_tokens) == (96, 400 + 6 * (48 + 256))
    quick = workload_set(parse_kinds("decode,prefix"), quick=True, concurrencies=[1, 2], max_tokens=16)
    assert [(w.name, w.num_requests, w.max_tokens) for w in quick] == [
        ("decode-c1", 2, 16), ("decode-c2", 2, 16), ("shared-c2", 2, 16), ("cold-c2", 2, 16)]
    with pytest.raises(ValueError):
        parse_kinds("decode,warp")


def test_workload_validates():
    with pytest.raises(ValueError):
        Workload("x", "decode", 0, 1, 10, 1)


def test_the_mix_draws_long_tailed_lengths_within_their_caps():
    (mix,) = workload_set(("mix",))
    jobs = workload_jobs(mix, "0")
    assert len(jobs) == mix.num_requests + 1 and all(len(job) == 1 for job in jobs)
    prompts = sorted(len(prompt) for (prompt, _), in jobs)
    outputs = sorted(max_tokens for (_, max_tokens), in jobs)
    assert 16 <= prompts[0] and prompts[-1] <= 4 * mix.prompt_tokens
    assert 1 <= outputs[0] and outputs[-1] <= mix.max_tokens
    assert outputs[int(0.95 * len(outputs))] > 2.5 * outputs[len(outputs) // 2]  # a long tail
    assert max(len(prompt) + max_tokens for (prompt, max_tokens), in jobs) <= mix.context_tokens
    assert workload_jobs(mix, "0") == jobs and workload_jobs(mix, "1") != jobs


def test_each_chat_turn_sends_the_history_so_far_under_one_system_prompt():
    (chat,) = workload_set(("chat",))
    jobs = workload_jobs(chat, "0")
    conversations = jobs[1:]
    assert len(conversations) * chat.turns == chat.num_requests
    system = jobs[0][0][0][: chat.shared_prefix_tokens]
    for turns in conversations:
        assert len(turns) == chat.turns
        for (before, reply), (after, _) in zip(turns, turns[1:]):
            # the next prompt: this one, a reply of the length asked for, a new user message
            assert after[: len(before)] == before
            assert len(after) == len(before) + reply + chat.prompt_tokens
        assert all(prompt[: chat.shared_prefix_tokens] == system for prompt, _ in turns)
        assert max(len(prompt) + max_tokens for prompt, max_tokens in turns) <= chat.context_tokens
    assert len({tuple(turns[0][0]) for turns in conversations}) == len(conversations)


def test_the_system_workload_sends_long_replies_under_one_long_prompt():
    (system,) = workload_set(("system",))
    jobs = workload_jobs(system, "0")
    prompts = [prompt for (prompt, _), in jobs]
    assert {max_tokens for (_, max_tokens), in jobs} == {256}
    assert len(prompts) == system.num_requests + 1 == 2 * system.concurrency + 1  # the warm-up first
    assert all(len(prompt) == 1600 and prompt[:1500] == prompts[0][:1500] for prompt in prompts)
    assert len({tuple(prompt[1500:]) for prompt in prompts}) == len(prompts)  # each its own after it


def test_the_big_shape_keeps_the_tokenizer_and_pads_its_vocabulary_with_control_tokens():
    import gguf

    from bench.big_shape import SHAPE, tokenizer_metadata

    fields = tokenizer_metadata(SHAPE["vocab"])
    tokens, types = fields["tokenizer.ggml.tokens"][0], fields["tokenizer.ggml.token_type"][0]
    assert len(tokens) == len(types) == SHAPE["vocab"] == len(set(tokens))
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # SmolLM2's own come first
    assert tokens[-1] == f"<|extra_{SHAPE['vocab'] - 49152 - 1}|>" and types[-1] == int(gguf.TokenType.CONTROL)
    assert fields["tokenizer.ggml.model"][0] == "gpt2" and len(fields["tokenizer.ggml.merges"][0]) > 1000


def test_a_llama_shaped_file_has_no_attention_biases_and_its_matrices_in_the_asked_type(tmp_path):
    """bench.kquant_shape's source: big_shape's writer in another shape, llama's layout, all F16.
    Read back by lmserve's reader (held to the gguf package's in test_gguf_reader.py; the package's
    own takes ~6 s over the 98,000 strings of the tokenizer)."""
    from bench.big_shape import write_model
    from lmserve.weights.gguf import GGUFFile

    shape = {"hidden": 256, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 512, "vocab": 49_152,
             "context": 512, "rope_theta": 10_000.0, "rms_eps": 1e-5}
    path = write_model(tmp_path / "k.F16.gguf", "F16", shape=shape, arch="llama", embedding_quant="F16", name="k")
    opened = GGUFFile.open(path)
    tensors = {t.name: t for t in opened.tensors}
    assert opened.architecture == "llama"
    assert not [name for name in tensors if name.endswith(".bias")]
    assert {t.tensor_type.name for t in tensors.values() if len(t.shape) == 2} == {"F16"}
    assert list(tensors["blk.1.ffn_down.weight"].shape) == [512, 256]  # innermost first


def test_the_json_workload_sends_its_schema_and_lets_it_end_the_output():
    levels = workload_set(("json",), concurrencies=[1, 32])
    assert [(w.name, w.concurrency, w.max_tokens) for w in levels] == [("json-c1", 1, 256), ("json-c16", 16, 256)]
    body = completion_body("m", [1, 2], 256, json_schema(levels[0]))
    assert body["json_schema"] == JSON_SCHEMA and "ignore_eos" not in body  # the schema's end is the output's
    plain = completion_body("m", [1, 2], 256, json_schema(workload_set(("decode",), concurrencies=[1])[0]))
    assert plain["ignore_eos"] is True and "json_schema" not in plain


@pytest.mark.parametrize("kind", ["F16", "BF16"])
def test_the_float_copy_widens_every_matrix_and_keeps_the_rest(tmp_path, kind):
    import gguf
    import numpy as np

    from bench.float_gguf import write_float_copy
    from lmserve.weights.dtype import checkpoint_dtype, gguf_weight_type
    from lmserve.weights.gguf import GGUFFile
    from tests.helpers.tiny_models import tiny_hf_model, write_gguf

    source = write_gguf(tiny_hf_model("llama"), tmp_path / "tiny.Q8_0.gguf", "llama", quant="Q8_0")
    copy = gguf.GGUFReader(write_float_copy(source, tmp_path / f"tiny.{kind}.gguf", kind))
    original = gguf.GGUFReader(source)
    assert [t.name for t in copy.tensors] == [t.name for t in original.tensors]
    for new, old in zip(copy.tensors, original.tensors):
        values = gguf.quants.dequantize(old.data, old.tensor_type)
        if values.ndim == 1:
            assert new.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(new.data, values)
            continue
        assert new.tensor_type == gguf.GGMLQuantizationType[kind]
        widened = gguf.quants.dequantize(new.data, new.tensor_type)
        assert widened.shape == values.shape and np.abs(widened - values).max() <= 2 ** -7 * np.abs(values).max()
    for name in ("llama.block_count", "llama.embedding_length", "general.architecture"):
        assert copy.fields[name].parts[-1].tolist() == original.fields[name].parts[-1].tolist()
    assert copy.fields["general.file_type"].parts[-1].tolist() == [{"F16": 1, "BF16": 32}[kind]]
    kept = gguf_weight_type(GGUFFile.open(tmp_path / f"tiny.{kind}.gguf").tensors)
    assert kept == kind and checkpoint_dtype("gguf:" + kept) == "bfloat16"  # what `lmserve serve` runs it as


def test_the_temperature_option_reaches_every_request(monkeypatch):
    """--temperature goes into the run options and from there into each request's body, the
    warm-up's too; without it every request is greedy, as before."""
    import asyncio
    import json as json_module

    import httpx

    from bench import client as bench_client
    from bench.__main__ import build_parser, run_options

    sent = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(json_module.loads(request.content)["temperature"])
        stream = 'data: {"choices": [{"index": 0, "text": "a"}]}\n\ndata: [DONE]\n\n'
        return httpx.Response(200, text=stream, headers={"content-type": "text/event-stream"})

    monkeypatch.setattr(bench_client, "new_client",
                        lambda target, concurrency: httpx.AsyncClient(transport=httpx.MockTransport(answer)))
    for argv, expected in ((["--temperature", "0.8"], 0.8), ([], 0.0)):
        options = run_options(build_parser().parse_args(["run", "--url", "http://stand-in", *argv]))
        assert options.temperature == expected
        results, _ = asyncio.run(bench_client.run_jobs(bench_client.Target("http://stand-in", "m"), [[([1, 2], 4)]] * 3,
                                                       2, temperature=options.temperature))
        assert all(result.ok for result in results)
        assert sent == [expected] * 3
        sent.clear()
