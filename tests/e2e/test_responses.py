"""The Responses API on the real default model, through the official client: a continuation by
previous_response_id reads the earlier turn from the prefix cache, a stream's deltas make the
stored response, and the Conversations calls keep a chat on the server."""

from __future__ import annotations

import pytest


def test_a_continuation_reads_the_earlier_turn_from_the_prefix_cache(client, model_id):
    first = client.responses.create(model=model_id, input="What is the capital of France?", temperature=0,
                                    max_output_tokens=24)
    assert first.status in ("completed", "incomplete") and first.output_text
    second = client.responses.create(model=model_id, input="And of Italy?", previous_response_id=first.id,
                                     temperature=0, max_output_tokens=16)
    assert second.output_text and second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    # the first turn's prompt, whole blocks of it, comes from the cache
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 16
    items = client.responses.input_items.list(second.id, order="asc").data
    assert [item.role for item in items] == ["user", "assistant", "user"]
    assert items[1].content[0].text == first.output_text


def test_a_stream_builds_the_stored_response(client, model_id):
    # the stream helper's final response needs response.completed: room for the whole answer
    with client.responses.stream(model=model_id, input="Name three colors.", temperature=0,
                                 max_output_tokens=200) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text and final.output_text
    assert client.responses.retrieve(final.id).output_text == final.output_text
    client.responses.delete(final.id)


def test_the_clients_conversation_calls_keep_a_chat_on_the_server(client, model_id):
    import openai

    conversation = client.conversations.create(
        items=[{"type": "message", "role": "user", "content": "My name is Ada."},
               {"type": "message", "role": "assistant", "content": "Nice to meet you, Ada."}],
        metadata={"topic": "names"})
    assert client.conversations.retrieve(conversation.id).metadata == {"topic": "names"}
    assert client.conversations.update(conversation.id, metadata={"topic": "greetings"}).metadata == {"topic": "greetings"}

    first = client.responses.create(model=model_id, input="What is my name?", conversation=conversation.id,
                                    temperature=0, max_output_tokens=16)
    second = client.responses.create(model=model_id, input="Say it again.", conversation=conversation.id,
                                     temperature=0, max_output_tokens=16)
    assert second.usage.input_tokens_details.cached_tokens > 0  # the conversation so far is in the cache
    items = client.conversations.items.list(conversation.id, order="asc").data
    assert [item.type for item in items] == ["message"] * 6
    assert [item.role for item in items] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert items[3].content[0].text == first.output_text and items[5].content[0].text == second.output_text

    added = client.conversations.items.create(conversation.id, items=[
        {"type": "message", "role": "user", "content": "One more thing."}])
    assert client.conversations.items.retrieve(added.data[0].id, conversation_id=conversation.id).role == "user"
    client.conversations.items.delete(added.data[0].id, conversation_id=conversation.id)
    assert len(client.conversations.items.list(conversation.id).data) == 6

    assert client.conversations.delete(conversation.id).deleted
    for call in (lambda: client.conversations.retrieve(conversation.id),
                 lambda: client.responses.create(model=model_id, input="Hi", conversation=conversation.id)):
        try:
            call()
        except openai.NotFoundError:
            continue
        raise AssertionError("a deleted conversation answered")


def test_output_text_logprobs_are_the_chat_completions_ones(float32_client):
    """On the float32 server, whose outputs depend on nothing but the request: on the shared int4
    server, after the other e2e tests, the two routes' logprobs differed by up to 0.085 (a CPU
    without AMX; a fresh int4 server gave them equal, with and without another stream running)."""
    client = float32_client
    model_id = client.models.list().data[0].id
    question = "Name a prime number."
    response = client.responses.create(model=model_id, input=question, temperature=0, max_output_tokens=8,
                                       include=["message.output_text.logprobs"], top_logprobs=3)
    chat = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": question}],
                                          temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    ours = response.output[0].content[0].logprobs
    theirs = chat.choices[0].logprobs.content
    assert response.output_text == chat.choices[0].message.content
    assert [(e.token, e.bytes, len(e.top_logprobs)) for e in ours] == [(e.token, e.bytes, 3) for e in theirs]
    assert [e.logprob for e in ours] == pytest.approx([e.logprob for e in theirs], abs=1e-4)
