"""requests/plan/: requests -> prompt ids and SamplingParams, exactly."""

from __future__ import annotations

import pytest

from lmserve.server.errors import APIError
from lmserve.server.protocol import ChatCompletionRequest, CompletionRequest
from lmserve.server.requests.plan import chat_plan, completion_plan
from tests.helpers.fake_engine import ByteTokenizer

TOKENIZER = ByteTokenizer()


def chat_request(**fields):
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **fields)


def refused(make_plan, param: str) -> APIError:
    with pytest.raises(APIError) as caught:
        make_plan()
    assert caught.value.status_code == 400 and caught.value.param == param
    return caught.value


def test_chat_prompt_is_the_rendered_template_without_extra_bos():
    plan = chat_plan(chat_request(), "r", TOKENIZER, 100)
    assert plan.prompts == [TOKENIZER.encode("user: hi\nassistant: ", add_special_tokens=False)]
    [choice] = plan.choices
    assert (choice.index, choice.request_id, choice.prompt_index) == (0, "r", 0)
    assert choice.params.max_tokens == 100 - len(plan.prompts[0])
    assert choice.params.logprobs is None and not plan.want_logprobs


def test_max_completion_tokens_wins_over_max_tokens():
    plan = chat_plan(chat_request(max_tokens=9, max_completion_tokens=4), "r", TOKENIZER, 100)
    assert plan.choices[0].params.max_tokens == 4


def test_n_choices_get_their_own_ids_and_seeds():
    plan = chat_plan(chat_request(n=3, seed=10), "r", TOKENIZER, 100)
    assert [c.request_id for c in plan.choices] == ["r-0", "r-1", "r-2"]
    assert [c.params.seed for c in plan.choices] == [10, 11, 12]
    unseeded = chat_plan(chat_request(n=2), "r", TOKENIZER, 100)
    assert [c.params.seed for c in unseeded.choices] == [None, None]


def test_chat_logprobs_map_to_top_k():
    assert (
        chat_plan(chat_request(logprobs=True), "r", TOKENIZER, 100).choices[0].params.logprobs == 0
    )
    plan = chat_plan(chat_request(logprobs=True, top_logprobs=5), "r", TOKENIZER, 100)
    assert plan.choices[0].params.logprobs == 5 and plan.want_logprobs


def test_context_length_checks_name_the_numbers():
    prompt_len = len(chat_plan(chat_request(), "r", TOKENIZER, 100).prompts[0])  # 20
    error = refused(
        lambda: chat_plan(chat_request(max_tokens=5), "r", TOKENIZER, prompt_len + 4), "max_tokens"
    )
    assert f"5 > {prompt_len + 4} - {prompt_len}" in error.message and error.code == "context_length_exceeded"
    error = refused(lambda: chat_plan(chat_request(), "r", TOKENIZER, prompt_len), "messages")
    assert str(prompt_len) in error.message
    exact = chat_plan(chat_request(max_tokens=4), "r", TOKENIZER, prompt_len + 4)
    assert exact.choices[0].params.max_tokens == 4


def test_completion_prompt_forms():
    a, b, c = (2 + ord(char) for char in "abc")  # ByteTokenizer: byte value + 2
    assert completion_plan(CompletionRequest(prompt="ab"), "r", TOKENIZER, 50).prompts == [[0, a, b]]
    assert completion_plan(CompletionRequest(prompt=[5, 6]), "r", TOKENIZER, 50).prompts == [[5, 6]]
    request = CompletionRequest(prompt=["a", "bc"], n=2, echo=True, max_tokens=None)
    plan = completion_plan(request, "r", TOKENIZER, 50)
    assert plan.prompts == [[0, a], [0, b, c]]
    assert [(c.index, c.prompt_index, c.request_id) for c in plan.choices] == [
        (0, 0, "r-0"),
        (1, 0, "r-1"),
        (2, 1, "r-2"),
        (3, 1, "r-3"),
    ]
    assert [c.params.max_tokens for c in plan.choices] == [48, 48, 47, 47]
    assert plan.echo_texts == ["a", "bc"]
    default = completion_plan(CompletionRequest(prompt="ab"), "r", TOKENIZER, 50)
    assert default.choices[0].params.max_tokens == 16  # OpenAI's default for text completions
    token_echo = completion_plan(CompletionRequest(prompt=[[0, a]], echo=True), "r", TOKENIZER, 50)
    assert token_echo.echo_texts == ["a"]


def test_completion_logprobs_and_refusals():
    plan = completion_plan(CompletionRequest(prompt="a", logprobs=3), "r", TOKENIZER, 50)
    assert plan.choices[0].params.logprobs == 3
    refused(
        lambda: completion_plan(CompletionRequest(prompt="a", suffix="b"), "r", TOKENIZER, 50),
        "suffix",
    )
    refused(
        lambda: completion_plan(CompletionRequest(prompt="a", best_of=2), "r", TOKENIZER, 50),
        "best_of",
    )
    refused(
        lambda: completion_plan(CompletionRequest(prompt="a", n=2, best_of=1), "r", TOKENIZER, 50),
        "best_of",
    )
    assert completion_plan(
        CompletionRequest(prompt="a", n=2, best_of=2), "r", TOKENIZER, 50
    ).choices
    refused(
        lambda: completion_plan(CompletionRequest(prompt=[[1], []]), "r", TOKENIZER, 50), "prompt[1]"
    )
    refused(lambda: completion_plan(CompletionRequest(prompt=[-1]), "r", TOKENIZER, 50), "prompt")


def test_sampling_fields_and_their_errors():
    request = chat_request(stop=["a", "b"], logit_bias={"3": 2.5}, top_k=-1, stop_token_ids=[4], min_p=0.1)
    params = chat_plan(request, "r", TOKENIZER, 100).choices[0].params
    assert (params.stop, params.logit_bias, params.top_k, params.stop_token_ids, params.min_p) == (
        ("a", "b"),
        ((3, 2.5),),
        0,
        (4,),
        0.1,
    )
    refused(lambda: chat_plan(chat_request(temperature=-1), "r", TOKENIZER, 100), "temperature")
    refused(lambda: chat_plan(chat_request(top_k=-2), "r", TOKENIZER, 100), "top_k")
    refused(lambda: chat_plan(chat_request(logit_bias={"": 1}), "r", TOKENIZER, 100), "logit_bias")
    refused(lambda: chat_plan(chat_request(logit_bias=[[3, True]]), "r", TOKENIZER, 100), "logit_bias")
    refused(lambda: chat_plan(chat_request(logit_bias={"3": 101}), "r", TOKENIZER, 100), "logit_bias")
    refused(lambda: chat_plan(chat_request(stop=""), "r", TOKENIZER, 100), "stop")


def test_chat_refusals():
    refused(
        lambda: chat_plan(
            chat_request(tool_choice={"type": "function", "function": {"name": "f"}}), "r", TOKENIZER, 100
        ),
        "tool_choice",
    )
    refused(
        lambda: chat_plan(
            chat_request(function_call="auto", functions=[{"name": "f"}]), "r", TOKENIZER, 100
        ),
        "functions",
    )
    refused(
        lambda: chat_plan(
            chat_request(response_format={"type": "json_schema", "json_schema": {}}), "r", TOKENIZER, 100
        ),
        "response_format",
    )
    image = [{"type": "image_url", "image_url": {"url": "data:"}}]
    request = ChatCompletionRequest(messages=[{"role": "user", "content": image}])
    refused(lambda: chat_plan(request, "r", TOKENIZER, 100), "messages[0].content[0]")
    no_text = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "text"}]}])
    refused(lambda: chat_plan(no_text, "r", TOKENIZER, 100), "messages[0].content[0].text")
    refused(
        lambda: chat_plan(chat_request(stream_options={"include_usage": True}), "r", TOKENIZER, 100),
        "stream_options",
    )
    assert chat_plan(
        chat_request(tool_choice="auto", modalities=["text"]), "r", TOKENIZER, 100
    ).choices


def test_assistant_message_without_content_renders_empty():
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "b"},
    ]
    plan = chat_plan(ChatCompletionRequest(messages=messages), "r", TOKENIZER, 100)
    assert TOKENIZER.decode(plan.prompts[0]) == "user: a\nassistant: \nuser: b\nassistant: "
