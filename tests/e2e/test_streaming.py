"""Streamed responses on the real server: chunk shapes as OpenAI sends them, n > 1, stop strings
across token boundaries, UTF-8, logprobs, usage."""

from __future__ import annotations

import json

import httpx

PARIS = [{"role": "user", "content": "Name the capital of France."}]


def sse_payloads(server, path, body) -> list:
    """The raw `data:` payloads of a streamed request: parsed JSON, then the string "[DONE]"."""
    response = httpx.post(f"{server['url']}{path}", json={**body, "stream": True}, timeout=120)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    frames = response.text.split("\n\n")
    assert frames[-1] == "" and all(f.startswith("data: ") for f in frames[:-1])
    payloads = [f[6:] if f[6:] == "[DONE]" else json.loads(f[6:]) for f in frames[:-1]]
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    return payloads[:-1]


def test_usage_key_absent_unless_asked_then_null_until_the_last_chunk(server):
    body = {"messages": PARIS, "temperature": 0, "max_tokens": 4}
    plain = sse_payloads(server, "/v1/chat/completions", body)
    assert all("usage" not in chunk for chunk in plain)
    with_usage = sse_payloads(server, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    *chunks, last = with_usage
    assert all(chunk["usage"] is None for chunk in chunks)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 4
    # The same chunks otherwise: role first, content, then one finish chunk with an empty delta.
    assert [c["choices"] for c in chunks] == [c["choices"] for c in plain]
    assert {k for c in plain for k in c} == {"id", "object", "created", "model", "system_fingerprint", "choices"}
    assert plain[0]["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    assert plain[-1]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]


def test_chat_n2_streamed_matches_the_whole_response(client, model_id):
    fields = dict(model=model_id, messages=PARIS, temperature=1.0, n=2, max_tokens=8, seed=11)
    whole = client.chat.completions.create(**fields)
    chunks = list(client.chat.completions.create(**fields, stream=True, stream_options={"include_usage": True}))
    *chunks, usage_chunk = chunks
    assert all(len(c.choices) == 1 for c in chunks)
    assert [c.choices[0].delta.role for c in chunks[:2]] == ["assistant", "assistant"]
    assert {c.choices[0].index for c in chunks[:2]} == {0, 1}
    texts, finishes = {0: "", 1: ""}, {0: [], 1: []}
    for chunk in chunks:
        choice = chunk.choices[0]
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason is not None:
            finishes[choice.index].append(choice.finish_reason)
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finishes == {c.index: [c.finish_reason] for c in whole.choices}
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == whole.usage.completion_tokens
    assert usage_chunk.usage.prompt_tokens == whole.usage.prompt_tokens  # counted once for n choices


def test_completion_stream_prompt_list_echo_and_usage(client, model_id):
    fields = dict(model=model_id, prompt=["The capital of France is", "1, 2, 3,"], temperature=0, max_tokens=5,
                  echo=True)
    whole = client.completions.create(**fields)
    chunks = list(client.completions.create(**fields, stream=True, stream_options={"include_usage": True}))
    *chunks, usage_chunk = chunks
    texts = {0: "", 1: ""}
    for chunk in chunks:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == {c.index: c.text for c in whole.choices}
    assert texts[0].startswith("The capital of France is") and texts[1].startswith("1, 2, 3,")
    assert usage_chunk.choices == [] and usage_chunk.usage.total_tokens == whole.usage.total_tokens


def test_stop_strings_across_token_boundaries_never_stream(client, model_id, tokenizer):
    fields = dict(model=model_id, messages=PARIS, temperature=0, max_tokens=12)
    full = client.chat.completions.create(**fields).choices[0].message.content  # The capital of France is Paris.
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode(full, add_special_tokens=False)]
    boundary = len(pieces[0]) + len(pieces[1])  # between the 2nd and 3rd token
    spanning = full[boundary - 2 : boundary + 3]  # "al of" : starts and ends inside tokens
    assert spanning and not any(spanning in piece for piece in pieces)
    later = full[boundary + 6 :]
    for stop in ([later, spanning, "never-generated"], [spanning[:-1] + "#"]):
        cut = min([full.find(s) for s in stop if s in full], default=len(full))
        streamed = client.chat.completions.create(**fields, stop=stop, stream=True)
        deltas = [c.choices[0].delta.content or "" for c in streamed]
        assert "".join(deltas) == full[:cut], stop
    completion = client.completions.create(model=model_id, prompt="The capital of France is", temperature=0,
                                           max_tokens=8, stop=[" Paris", "zz"], stream=True)
    assert "Paris" not in "".join(c.choices[0].text for c in completion)


def test_emoji_arrive_whole_when_streamed(client, model_id, tokenizer):
    # Each emoji is 3 tokens here; 21 tokens make 7 whole dragons, each delta whole characters (a
    # step whose prompt-lookup drafts stand sends several tokens, so several dragons, at once).
    assert len(tokenizer.encode("🐉", add_special_tokens=False)) == 3
    chunks = list(client.completions.create(model=model_id, prompt="🐉🐉🐉🐉🐉", temperature=0, max_tokens=21,
                                            stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(deltas) == "🐉" * 7
    assert all(delta == "🐉" * len(delta) for delta in deltas)
    assert chunks[-1].usage.completion_tokens == 21


def test_non_latin_chat_stream_has_no_replacement_characters(client, model_id):
    fields = dict(model=model_id, messages=[{"role": "user", "content": "Напиши предложение по-русски."}],
                  temperature=0, max_tokens=12)
    whole = client.chat.completions.create(**fields)
    text = whole.choices[0].message.content
    deltas = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**fields, stream=True)]
    assert "".join(deltas) == text and any("а" <= ch <= "я" for ch in text)
    # Cyrillic letters take two tokens here, so max_tokens may end inside one: it is dropped, not U+FFFD.
    assert "\ufffd" not in text and whole.choices[0].finish_reason == "length"


def test_streamed_logprobs_shapes(client, model_id):
    chat = list(client.chat.completions.create(model=model_id, messages=PARIS, temperature=0, max_tokens=4,
                                               logprobs=True, top_logprobs=2, stream=True))
    content_chunks = [c for c in chat if c.choices[0].delta.content]
    assert len(content_chunks) == 4
    for chunk in content_chunks:
        (entry,) = chunk.choices[0].logprobs.content
        assert entry.token == chunk.choices[0].delta.content and bytes(entry.bytes).decode() == entry.token
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token
    assert chat[0].choices[0].logprobs is None and chat[-1].choices[0].logprobs is None

    text = ""
    for chunk in client.completions.create(model=model_id, prompt="The capital of France is", temperature=0,
                                           max_tokens=4, logprobs=1, stream=True):
        choice = chunk.choices[0]
        if choice.finish_reason is not None:
            continue
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 1
        assert lp.tokens[0] == choice.text and len(lp.top_logprobs[0]) == 1  # greedy: top-1 is the sampled one
        assert lp.text_offset == [len(text)]  # where this token starts in the choice's text
        text += choice.text
    assert text


def test_max_completion_tokens_wins_over_max_tokens(client, model_id):
    response = client.chat.completions.create(model=model_id, messages=PARIS, temperature=0, max_tokens=10,
                                              max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert response.usage.completion_tokens == 3 and response.choices[0].finish_reason == "length"
