"""The Responses API through the official `openai` client, against the app on a fake engine:
whole and streamed responses (the typed events, in order), continuation on the server's copy,
the stored responses' routes, function calls, reasoning, ownership by API key, and refusals."""

from __future__ import annotations

import json

import openai
import pytest

from lmserve.parsing import HERMES_SYNTAX
from lmserve.server.state import ServerState
from lmserve.store.conversations import ConversationStore
from tests.helpers.fake_engine import ByteTokenizer, FakeEngine
from tests.helpers.server import make_client

ADD = {"type": "function", "name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}


def client_of(engine: FakeEngine, api_key: str = "unused", **state_fields) -> openai.OpenAI:
    http = make_client(engine, **state_fields)
    return openai.OpenAI(base_url="http://testserver/v1", api_key=api_key, http_client=http, max_retries=0)


def prompt_text(engine: FakeEngine, call: int = -1) -> str:
    return engine.tokenizer.decode(engine.calls[call][1])


def test_a_whole_response_is_stored_and_read_back():
    engine = FakeEngine(reply="Hello there", max_model_len=1024)
    client = client_of(engine)
    response = client.responses.create(model="fake", input="Hi", instructions="Be brief")
    assert response.id.startswith("resp_") and response.status == "completed"
    assert response.output_text == "Hello there" and response.instructions == "Be brief"
    assert [item.type for item in response.output] == ["message"]
    prompt = prompt_text(engine)
    assert prompt.index("system: Be brief") < prompt.index("user: Hi")
    assert response.usage.input_tokens == len(engine.calls[-1][1])
    assert response.usage.output_tokens == len("Hello there")
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    again = client.responses.retrieve(response.id)
    assert again.model_dump() == response.model_dump()
    items = client.responses.input_items.list(response.id)
    assert [(item.type, item.role, item.content[0].text) for item in items.data] == [("message", "user", "Hi")]


def test_a_continuation_starts_from_the_stored_turns_without_their_instructions():
    engine = FakeEngine(reply="Paris", max_model_len=1024)
    client = client_of(engine)
    first = client.responses.create(model="fake", input="Capital of France?", instructions="Answer in one word")
    second = client.responses.create(model="fake", input="And of Italy?", previous_response_id=first.id)
    prompt = prompt_text(engine)
    assert prompt.index("user: Capital of France?") < prompt.index("assistant: Paris") < prompt.index("user: And of Italy?")
    assert "Answer in one word" not in prompt  # instructions belong to the response that gave them
    assert second.previous_response_id == first.id
    items = client.responses.input_items.list(second.id, order="asc")
    assert [(item.role, item.content[0].text) for item in items.data] == [
        ("user", "Capital of France?"), ("assistant", "Paris"), ("user", "And of Italy?")]
    newest_first = client.responses.input_items.list(second.id, limit=2)
    assert [item.content[0].text for item in newest_first.data] == ["And of Italy?", "Paris"]
    assert newest_first.has_more
    rest = client.responses.input_items.list(second.id, limit=2, after=newest_first.data[-1].id)
    assert [item.content[0].text for item in rest.data] == ["Capital of France?"] and not rest.has_more


def test_a_streamed_response_sends_the_typed_events_in_order():
    engine = FakeEngine(reply="Hi!", max_model_len=1024)
    client = client_of(engine)
    events = list(client.responses.create(model="fake", input="Hello", stream=True))
    assert [event.type for event in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * 3, "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert "".join(event.delta for event in events if event.type == "response.output_text.delta") == "Hi!"
    item_id = events[2].item.id
    assert all(event.item_id == item_id for event in events[3:-2])
    completed = events[-1].response
    assert completed.output_text == "Hi!" and completed.status == "completed"
    assert events[0].response.id == completed.id and events[0].response.status == "in_progress"
    assert client.responses.retrieve(completed.id).output_text == "Hi!"  # stored before the last event


def test_the_stream_helper_accumulates_the_same_response():
    engine = FakeEngine(reply="Streamed answer", max_model_len=1024)
    client = client_of(engine)
    with client.responses.stream(model="fake", input="Go") as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "Streamed answer"


def test_max_output_tokens_ends_an_incomplete_response():
    client = client_of(FakeEngine(reply="Hello there", max_model_len=1024))
    response = client.responses.create(model="fake", input="Hi", max_output_tokens=3)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "Hel" and response.usage.output_tokens == 3
    events = list(client.responses.create(model="fake", input="Hi", max_output_tokens=3, stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == "Hel"


def test_unstored_deleted_and_unknown_responses_are_404():
    client = client_of(FakeEngine(reply="x", max_model_len=1024))
    unstored = client.responses.create(model="fake", input="Hi", store=False)
    assert unstored.store is False
    for missing in (unstored.id, "resp_nothing"):
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(missing)
    stored = client.responses.create(model="fake", input="Hi")
    client.responses.delete(stored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(stored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(stored.id)
    with pytest.raises(openai.NotFoundError) as error:
        client.responses.create(model="fake", input="Hi", previous_response_id=stored.id)
    assert error.value.body["param"] == "previous_response_id"


def test_each_api_key_sees_only_its_own_responses():
    engine = FakeEngine(reply="mine", max_model_len=1024)
    store = ConversationStore(None)
    alice = client_of(engine, api_key="alice", api_keys=("alice", "bob"), store=store)
    bob = client_of(engine, api_key="bob", api_keys=("alice", "bob"), store=store)
    response = alice.responses.create(model="fake", input="Hi")
    assert alice.responses.retrieve(response.id).output_text == "mine"
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.create(model="fake", input="Hi", previous_response_id=response.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.delete(response.id)
    assert alice.responses.retrieve(response.id).id == response.id


@pytest.mark.parametrize("stream", [False, True])
def test_a_function_call_is_an_output_item_and_its_output_continues_the_turn(grammar_compiler, stream):
    engine = FakeEngine(reply=HERMES_SYNTAX.render([("add", '{"a": 1, "b": 2}')]), max_model_len=4096,
                        grammar=grammar_compiler)
    client = client_of(engine)
    if stream:
        events = list(client.responses.create(model="fake", input="1 + 2?", tools=[ADD], stream=True))
        kinds = [event.type for event in events]
        assert "response.function_call_arguments.delta" in kinds
        done = next(event for event in events if event.type == "response.function_call_arguments.done")
        assert done.arguments == '{"a": 1, "b": 2}'
        response = events[-1].response
    else:
        response = client.responses.create(model="fake", input="1 + 2?", tools=[ADD])
    (call,) = response.output
    assert (call.type, call.name, json.loads(call.arguments)) == ("function_call", "add", {"a": 1, "b": 2})
    assert call.call_id and call.status == "completed"
    engine.reply = "It is 3."
    follow = client.responses.create(model="fake", previous_response_id=response.id, tools=[ADD],
                                     input=[{"type": "function_call_output", "call_id": call.call_id, "output": "3"}])
    assert follow.output_text == "It is 3."
    prompt = prompt_text(engine)
    call_text = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    assert prompt.index("user: 1 + 2?") < prompt.index(call_text) < prompt.index("<tool_response>\n3\n</tool_response>")


def test_reasoning_comes_as_its_own_item_before_the_message():
    engine = FakeEngine(reply="<think>\nPondering.\n</think>\n\nAnswer.", max_model_len=1024,
                        tokenizer=ByteTokenizer(chat_template="<think>"))
    client = client_of(engine)
    whole = client.responses.create(model="fake", input="Q?")
    events = list(client.responses.create(model="fake", input="Q?", stream=True))
    for response in (whole, events[-1].response):
        reasoning, message = response.output
        assert reasoning.type == "reasoning" and reasoning.content[0].text.strip() == "Pondering."
        assert message.type == "message" and response.output_text == "Answer."
    kinds = [event.type for event in events]
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")


def test_logprobs_of_the_output_text_whole_and_streamed():
    engine = FakeEngine(reply="Héllo", max_model_len=1024)  # é: two byte tokens, one character
    client = client_of(engine)
    whole = client.responses.create(model="fake", input="Hi", include=["message.output_text.logprobs"],
                                    top_logprobs=2)
    events = list(client.responses.create(model="fake", input="Hi", top_logprobs=2, stream=True))
    streamed = [entry for e in events if e.type == "response.output_text.delta" for entry in e.logprobs]
    for logprobs in (whole.output[0].content[0].logprobs, streamed, events[-1].response.output[0].content[0].logprobs):
        assert "".join(bytes(entry.bytes).decode("latin-1") for entry in logprobs).encode("latin-1") == "Héllo".encode()
        assert [entry.logprob for entry in logprobs] == [-0.25] * len("Héllo".encode())
        assert all(len(entry.top_logprobs) == 2 for entry in logprobs)
    text_done = next(e for e in events if e.type == "response.output_text.done")
    assert len(text_done.logprobs) == len("Héllo".encode())
    plain = client.responses.create(model="fake", input="Hi")
    assert plain.output[0].content[0].logprobs == []  # not asked for


def test_logprobs_with_a_parsed_reply_are_refused_by_name():
    engine = FakeEngine(reply="x", max_model_len=1024, tokenizer=ByteTokenizer(chat_template="<think>"))
    with pytest.raises(openai.BadRequestError) as error:
        client_of(engine).responses.create(model="fake", input="Hi", include=["message.output_text.logprobs"])
    assert error.value.body["param"] == "include" and "chat/completions" in error.value.body["message"]


@pytest.mark.parametrize(("fields", "param"), [
    ({"include": ["reasoning.encrypted_content"]}, "include[0]"),
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"background": True}, "background"),
    ({"conversation": "conv_1", "previous_response_id": "resp_1"}, "conversation"),
    ({"reasoning": {"effort": "high"}}, "reasoning.effort"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"input": [{"role": "critic", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input"),  # no message to answer: was a 500
    ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
])
def test_what_is_not_served_is_refused_by_name(fields, param):
    client = client_of(FakeEngine(reply="x", max_model_len=1024))
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(**{"model": "fake", "input": "Hi", **fields})
    assert error.value.body["param"] == param


def test_the_store_keeps_responses_in_a_file_across_servers(tmp_path):
    engine = FakeEngine(reply="kept", max_model_len=1024)
    first = client_of(engine, store=ConversationStore.in_folder(tmp_path))
    response = first.responses.create(model="fake", input="Remember")
    second = client_of(engine, store=ConversationStore.in_folder(tmp_path))
    assert second.responses.retrieve(response.id).output_text == "kept"
    assert ServerState.__dataclass_fields__["store"].default_factory().path is None  # in memory unless told


def test_a_conversation_holds_its_items_and_responses_add_to_it():
    engine = FakeEngine(reply="Paris", max_model_len=1024)
    client = client_of(engine)
    conversation = client.conversations.create(items=[{"role": "system", "content": "Be terse"}],
                                               metadata={"title": "Capitals"})
    assert conversation.id.startswith("conv_") and conversation.metadata == {"title": "Capitals"}
    first = client.responses.create(model="fake", input="Capital of France?", conversation=conversation.id)
    assert first.conversation.id == conversation.id
    engine.reply = "Rome"
    client.responses.create(model="fake", input="And of Italy?", conversation={"id": conversation.id})
    prompt = prompt_text(engine)
    assert (prompt.index("system: Be terse") < prompt.index("user: Capital of France?") < prompt.index("assistant: Paris")
            < prompt.index("user: And of Italy?"))
    items = client.conversations.items.list(conversation.id, order="asc").data
    assert [(item.role, item.content[0].text) for item in items] == [
        ("system", "Be terse"), ("user", "Capital of France?"), ("assistant", "Paris"),
        ("user", "And of Italy?"), ("assistant", "Rome")]
    assert client.conversations.items.retrieve(items[2].id, conversation_id=conversation.id).content[0].text == "Paris"
    added = client.conversations.items.create(conversation.id, items=[{"role": "user", "content": "Thanks"}])
    assert [item.content[0].text for item in added.data] == ["Thanks"]
    client.conversations.items.delete(items[0].id, conversation_id=conversation.id)
    newest = client.conversations.items.list(conversation.id, limit=2).data
    assert [item.content[0].text for item in newest] == ["Thanks", "Rome"]
    assert len(client.conversations.items.list(conversation.id, limit=100).data) == 5
    renamed = client.conversations.update(conversation.id, metadata={"title": "Europe"})
    assert client.conversations.retrieve(conversation.id).metadata == renamed.metadata == {"title": "Europe"}
    listed = client.get("/conversations", cast_to=object)
    assert [c["id"] for c in listed["data"]] == [conversation.id]
    client.conversations.delete(conversation.id)
    for call in (lambda: client.conversations.retrieve(conversation.id),
                 lambda: client.conversations.items.list(conversation.id),
                 lambda: client.responses.create(model="fake", input="Hi", conversation=conversation.id)):
        with pytest.raises(openai.NotFoundError):
            call()


def test_conversations_belong_to_their_api_key():
    store = ConversationStore(None)
    engine = FakeEngine(reply="x", max_model_len=1024)
    alice = client_of(engine, api_key="alice", api_keys=("alice", "bob"), store=store)
    bob = client_of(engine, api_key="bob", api_keys=("alice", "bob"), store=store)
    conversation = alice.conversations.create()
    for call in (lambda: bob.conversations.retrieve(conversation.id),
                 lambda: bob.conversations.items.create(conversation.id, items=[{"role": "user", "content": "x"}]),
                 lambda: bob.conversations.delete(conversation.id),
                 lambda: bob.responses.create(model="fake", input="Hi", conversation=conversation.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert bob.get("/conversations", cast_to=object)["data"] == []
    assert alice.conversations.items.list(conversation.id).data == []


def test_an_error_after_the_stream_began_ends_it_with_an_error_event_and_a_failed_response():
    engine = FakeEngine(reply="Hello there", max_model_len=1024, fail_after=3)
    client = client_of(engine)
    events = list(client.responses.create(model="fake", input="Hi", stream=True))
    assert [event.type for event in events[-2:]] == ["error", "response.failed"]
    assert "Generation failed" in events[-2].message and events[-2].code == "server_error"
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.message == events[-2].message
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hel"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    with pytest.raises(openai.NotFoundError):  # a failed response is not stored
        client.responses.retrieve(failed.id)


def test_truncation_auto_drops_the_oldest_turns_that_do_not_fit_and_disabled_refuses():
    engine = FakeEngine(reply="ok", max_model_len=110)
    client = client_of(engine)
    first = client.responses.create(model="fake", input="first question here", instructions="Be brief")
    second = client.responses.create(model="fake", input="second question here", previous_response_id=first.id)
    third = dict(model="fake", input="third question here", previous_response_id=second.id, instructions="Be brief",
                 max_output_tokens=8)
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(**third)
    assert error.value.body["code"] == "context_length_exceeded"
    response = client.responses.create(**third, truncation="auto")
    assert response.output_text == "ok" and response.truncation == "auto"
    prompt = prompt_text(engine)
    assert "first question" not in prompt and prompt.startswith("system: Be brief")
    assert prompt.index("user: second question here") < prompt.index("user: third question here")
    assert len(engine.calls[-1][1]) + 8 <= 110
    stored = client.responses.input_items.list(response.id, order="asc").data
    assert stored[0].content[0].text == "first question here"  # the store keeps the whole conversation
    with pytest.raises(openai.BadRequestError):  # the newest turn alone does not fit
        client.responses.create(model="fake", input="x" * 120, truncation="auto")
