"""The real server, the real default model, the official openai client."""

from __future__ import annotations

import concurrent.futures

import httpx

PARIS = [{"role": "user", "content": "Name the capital of France."}]


def chat_prompt_ids(tokenizer, messages):
    return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)


def test_health_went_from_loading_to_ready(server):
    codes = server["health_codes"]
    assert codes[-1] == 200 and 503 in codes  # loading takes seconds; /health answered 503 meanwhile
    body = httpx.get(f"{server['url']}/health").json()
    assert body["status"] == "ok" and body["num_free_kv_blocks"] <= body["num_kv_blocks"]


def test_models_lists_the_default_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct", "all-MiniLM-L6-v2"]  # chat first, then embedding
    assert models[0].object == "model"


def test_paris(client, model_id, tokenizer):
    response = client.chat.completions.create(model=model_id, messages=PARIS, temperature=0, max_tokens=30)
    choice = response.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"
    assert response.usage.prompt_tokens == len(chat_prompt_ids(tokenizer, PARIS))
    assert response.usage.completion_tokens == len(tokenizer.encode(choice.message.content, add_special_tokens=False))
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_streamed_chunks_match_the_whole_response(client, model_id):
    whole = client.chat.completions.create(model=model_id, messages=PARIS, temperature=0, max_tokens=30)
    chunks = list(client.chat.completions.create(model=model_id, messages=PARIS, temperature=0, max_tokens=30,
                                                 stream=True))
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content


def test_stream_usage_only_when_asked(client, model_id, tokenizer):
    whole = client.chat.completions.create(model=model_id, messages=PARIS, temperature=0, max_tokens=30)
    chunks = list(client.chat.completions.create(model=model_id, messages=PARIS, temperature=0, max_tokens=30,
                                                 stream=True, stream_options={"include_usage": True}))
    *content, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == len(chat_prompt_ids(tokenizer, PARIS))
    assert all(c.usage is None for c in content)


def test_n2_gives_two_indexed_choices(client, model_id):
    response = client.chat.completions.create(model=model_id, messages=PARIS, temperature=1.0, n=2, max_tokens=10,
                                              seed=3)
    assert [c.index for c in response.choices] == [0, 1]
    assert all(c.message.content for c in response.choices)
    assert response.choices[0].message.content != response.choices[1].message.content  # seeds differ per choice


def test_stop_string_cuts_the_text(client, model_id):
    response = client.chat.completions.create(model=model_id, messages=PARIS, temperature=0, max_tokens=30,
                                              stop=["France", "zzz"])
    assert response.choices[0].message.content == "The capital of "
    assert response.choices[0].finish_reason == "stop"


def test_stop_string_never_leaks_into_the_stream(client, model_id):
    chunks = list(client.chat.completions.create(model=model_id, messages=PARIS, temperature=0, max_tokens=30,
                                                 stop=["of Fr"], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "The capital "


def test_logprobs_shape(client, model_id):
    response = client.chat.completions.create(model=model_id, messages=PARIS, temperature=0, max_tokens=8,
                                              logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens >= 5
    assert "".join(t.token for t in content) == response.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely
        assert bytes(entry.bytes).decode() == entry.token
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)


def ask_seeded(client, seed):
    return client.chat.completions.create(messages=PARIS, temperature=1.0, max_tokens=16, seed=seed,
                                          model="SmolLM2-135M-Instruct").choices[0].message.content


def test_seed_reproducible(client):
    assert ask_seeded(client, 1234) == ask_seeded(client, 1234) != ask_seeded(client, 7)


def test_seed_reproducible_under_concurrency_in_float32(float32_client):
    def ask(seed):
        return ask_seeded(float32_client, seed)

    alone = ask(1234)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, [1234, 7, 1234, 99]))
    assert together[0] == together[2] == alone
    assert len(set(together)) > 1  # other seeds do differ


def test_completions_prompt_forms_and_echo(client, model_id, tokenizer):
    response = client.completions.create(model=model_id, prompt=["The capital of France is", "1, 2, 3,"],
                                         temperature=0, max_tokens=5)
    assert [c.index for c in response.choices] == [0, 1]
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    ids = tokenizer.encode("The capital of France is")
    by_ids = client.completions.create(model=model_id, prompt=ids, temperature=0, max_tokens=5)
    assert by_ids.choices[0].text == response.choices[0].text
    echoed = client.completions.create(model=model_id, prompt="The capital of France is", temperature=0,
                                       max_tokens=5, echo=True)
    assert echoed.choices[0].text == "The capital of France is" + response.choices[0].text


def test_completions_logprobs_shape(client, model_id):
    response = client.completions.create(model=model_id, prompt="The capital of France is", temperature=0,
                                         max_tokens=4, logprobs=2)
    lp = response.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert "".join(lp.tokens) == response.choices[0].text
