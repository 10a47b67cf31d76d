"""The Responses API on the real default model, through the official client: a continuation by
previous_response_id reads the earlier turn from the prefix cache, and a stream's deltas make the
stored response."""

from __future__ import annotations


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
