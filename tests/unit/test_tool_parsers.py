"""Tool-call parsers (Hermes, Llama 3 JSON, Mistral), their syntax tables and the tools prompt.

The central property: for every chunking of the text, the streamed events fold into exactly
what parse() returns, and every event has the OpenAI streaming shape.
"""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest

from lmserve.parsing import (
    HERMES_SYNTAX,
    LLAMA3_SYNTAX,
    MISTRAL_SYNTAX,
    MISTRAL_V11_SYNTAX,
    ContentDelta,
    HermesToolParser,
    Llama3JsonToolParser,
    MistralToolParser,
    ToolCallDelta,
    add_tools_system_prompt,
    collect_events,
    make_tool_call_id,
    messages_for_template,
    template_renders_tools,
    tool_call_syntax_for,
    tool_parser_for,
    tools_system_prompt,
)
from lmserve.parsing.reasoning import ReasoningParser
from lmserve.parsing.json_call import normalize_arguments
from lmserve.text.chat_template import CHATML_TEMPLATE, compile_chat_template
from tests.helpers.tool_streams import (
    assert_agrees,
    assert_shape,
    chunkings,
    counting_ids,
    stream,
    without_ids,
)


def hermes(*bodies: str) -> str:
    return "".join(f"<tool_call>\n{body}\n</tool_call>" for body in bodies)


WEATHER = '{"location": "Paris, FR", "unit": "celsius"}'
TRICKY = json.dumps(
    {
        "code": 'if (a) { return "}"; } // </tool_call> [TOOL_CALLS] <tool_call>',
        "quote": 'he said "hi" \\ and left',
        "nested": {"list": [1, 2.5e-3, {"deep": [None, True, False]}], "empty": {}},
        "unicode": "日本語 😀 é",
        "brackets": "[]{}]]}}",
    },
    ensure_ascii=False,
)


# --- Hermes ------------------------------------------------------------------------------------


HERMES_CASES = [
    (hermes('{"name": "get_weather", "arguments": ' + WEATHER + "}"), "", [("get_weather", WEATHER)]),
    (
        "Let me check.\n"
        + hermes('{"name": "a", "arguments": {"x": 1}}')
        + "\n"
        + hermes('{"name": "b", "arguments": {}}'),
        "Let me check.",
        [("a", '{"x": 1}'), ("b", "{}")],
    ),
    (hermes('{"name": "t", "arguments": ' + TRICKY + "}"), "", [("t", TRICKY)]),
    # arguments written before the name; extra keys skipped; "parameters" accepted
    (hermes('{"arguments": {"q": "x"}, "name": "s"}'), "", [("s", '{"q": "x"}')]),
    (hermes('{"type": "function", "name": "s", "parameters": {"q": [1]}}'), "", [("s", '{"q": [1]}')]),
    # arguments as a string holding JSON, as null, or missing
    (hermes('{"name": "s", "arguments": "{\\"q\\": \\"}\\"}"}'), "", [("s", '{"q": "}"}')]),
    (hermes('{"name": "s", "arguments": null}'), "", [("s", "{}")]),
    (hermes('{"name": "s"}'), "", [("s", "{}")]),
    (hermes('{"name": "s", "arguments": "not json"}'), "", [("s", '"not json"')]),
    # escapes in the name; unicode everywhere
    (hermes('{"name": "f\\u00e9", "arguments": {"é": "日本"}}'), "", [("fé", '{"é": "日本"}')]),
    # no whitespace at all, and lots of it
    ('<tool_call>{"name":"s","arguments":{"a":1}}</tool_call>', "", [("s", '{"a":1}')]),
    (
        '\n\n<tool_call>\n\n  {\n "name" : "s" ,\n "arguments" :\n {"a" : 1}\n}\n\n</tool_call>\n\n',
        "",
        [("s", '{"a" : 1}')],
    ),
    # content before, between and after: separated by the whitespace before the calls
    ("Sure.\n\n" + hermes('{"name": "s", "arguments": {}}') + "\nDone.", "Sure.\n\nDone.", [("s", "{}")]),
    ("A " + hermes('{"name": "s", "arguments": {}}') + "B", "A B", [("s", "{}")]),
    # closing tag missing: the call ends with its object
    ('<tool_call>\n{"name": "s", "arguments": {"a": 1}}\nok', "ok", [("s", '{"a": 1}')]),
    ('<tool_call>{"name": "s", "arguments": {}}\n</tool_', "", [("s", "{}")]),
    (
        '<tool_call>{"name": "a", "arguments": {}}<tool_call>{"name": "b", "arguments": {}}',
        "",
        [("a", "{}"), ("b", "{}")],
    ),
    # tag-like text that is not a tag is content
    ("a <tool_calls> b <tool_cal", "a <tool_calls> b <tool_cal", []),
    ("stray </tool_call> closing tag", "stray </tool_call> closing tag", []),
    ("no calls, 日本語 😀", "no calls, 日本語 😀", []),
    ("", "", []),
]


@pytest.mark.parametrize("text,content,calls", HERMES_CASES)
def test_hermes(text, content, calls):
    assert_agrees(HermesToolParser, text, content, calls)


MALFORMED_HERMES = [
    # not a call: given back as content, tags included
    "<tool_call>\nnot json\n</tool_call>",
    "<tool_call>\n[1, 2]\n</tool_call>",
    '<tool_call>\n{"name": 5, "arguments": {}}\n</tool_call>',
    '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>',
    '<tool_call>\n{"name": "s" "arguments": {}}\n</tool_call>',
]


@pytest.mark.parametrize("text", MALFORMED_HERMES)
def test_hermes_malformed_call_is_content(text):
    assert_agrees(HermesToolParser, "Hi\n" + text, "Hi\n" + text, [])


CUT_HERMES = [
    "<tool_call>",
    "<tool_call>\n",
    '<tool_call>\n{"na',
    '<tool_call>\n{"name": "s"',
    '<tool_call>\n{"name": "s", "arguments":',
    '<tool_call>\n{"name": "s", "arguments": "{\\"a',  # a string is committed only once it ends
]


@pytest.mark.parametrize("cut", CUT_HERMES)
def test_hermes_call_cut_before_its_commit_is_dropped(cut):
    """max_tokens inside a call: complete calls stand, the partial one is never content."""
    done = hermes('{"name": "a", "arguments": {"x": 1}}')
    assert_agrees(HermesToolParser, "Hi\n" + done + "\n" + cut, "Hi", [("a", '{"x": 1}')])
    assert_agrees(HermesToolParser, "Hi\n" + cut, "Hi", [])


def test_hermes_malformed_call_does_not_stop_later_calls():
    text = "<tool_call>oops</tool_call>\n" + hermes('{"name": "s", "arguments": {}}')
    assert_agrees(HermesToolParser, text, "<tool_call>oops</tool_call>", [("s", "{}")])


def test_hermes_truncated_arguments_stay_as_streamed():
    # committed calls stand: cut short, the arguments are cut short (finish_reason "length")
    text = '<tool_call>\n{"name": "s", "arguments": {"a": "unfinish'
    assert_agrees(HermesToolParser, text, "", [("s", '{"a": "unfinish')])


def test_hermes_junk_after_committed_arguments_is_content():
    text = '<tool_call>{"name": "s", "arguments": {"a": 1} junk}</tool_call>'
    assert_agrees(HermesToolParser, text, "junk}</tool_call>", [("s", '{"a": 1}')])


def test_hermes_deltas_are_openai_shaped():
    parser = HermesToolParser(counting_ids())
    assert parser.feed("Hello <tool") == [ContentDelta("Hello")]  # " <tool" may start a tag
    assert parser.feed('_call>\n{"name": "get_weather", ') == []  # not committed yet
    assert parser.feed('"arguments": {"loc') == [ToolCallDelta(0, "id0", "get_weather", '{"loc')]
    assert parser.feed('": 1}}') == [ToolCallDelta(0, None, None, '": 1}')]
    assert parser.feed("\n</tool_call>\n<tool_call>") == []
    assert parser.feed('{"name": "b", "arguments": {}') == [ToolCallDelta(1, "id1", "b", "{}")]
    assert parser.finish() == []
    assert parser.num_tool_calls == 2


def test_hermes_text_that_cannot_be_a_tag_is_released_at_once():
    parser = HermesToolParser(counting_ids())
    assert parser.feed("a <tool") == [ContentDelta("a")]
    assert parser.feed("s>") == [ContentDelta(" <tools>")]
    assert parser.feed(" <tool_cal") == []
    assert parser.finish() == [ContentDelta(" <tool_cal")]


def test_parse_uses_a_fresh_parser():
    parser = HermesToolParser(counting_ids())
    parser.feed("<tool_call>")
    assert parser.parse("plain").content == "plain"
    assert parser.feed('{"name": "s", "arguments": {}}') == [ToolCallDelta(0, "id0", "s", "{}")]


def test_feed_after_finish_is_a_bug():
    parser = HermesToolParser()
    parser.finish()
    with pytest.raises(AssertionError):
        parser.feed("x")


def test_default_ids_are_openai_style():
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", make_tool_call_id())
    assert make_tool_call_id() != make_tool_call_id()
    calls = HermesToolParser().parse(hermes('{"name": "a"}', '{"name": "b"}')).tool_calls
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", call.id) for call in calls)
    assert calls[0].id != calls[1].id


def test_mistral_ids_are_what_its_templates_take_back():
    calls = MistralToolParser().parse(MISTRAL_SYNTAX.render([("a", "{}"), ("b", "{}")])).tool_calls
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", call.id) for call in calls) and calls[0].id != calls[1].id


# --- Llama 3 JSON ------------------------------------------------------------------------------


LLAMA3_CASES = [
    ('{"name": "get_weather", "parameters": ' + WEATHER + "}", "", [("get_weather", WEATHER)]),
    ('<|python_tag|>{"name": "s", "parameters": {"a": 1}}', "", [("s", '{"a": 1}')]),
    (
        '\n {"name": "a", "parameters": {}}; {"name": "b", "parameters": ' + TRICKY + "}",
        "",
        [("a", "{}"), ("b", TRICKY)],
    ),
    ('{"name": "a", "parameters": {}};', "", [("a", "{}")]),
    ('{"name": "a", "arguments": {"x": [1]}}\n{"name": "b", "parameters": {}}', "", [("a", '{"x": [1]}'), ("b", "{}")]),
    ('{"type": "function", "name": "a", "parameters": {}}', "", [("a", "{}")]),
    ('{"name": "a", "parameters": {}} and some words', "and some words", [("a", "{}")]),
    ('{"name": "a", "parameters": {}}; oops', "; oops", [("a", "{}")]),
    # not calls: all content, unchanged
    ("The answer is 42.", "The answer is 42.", []),
    ('  {"name": "John", "age": 30}', '  {"name": "John", "age": 30}', []),
    ('{"name": "a", "parameters": {}}; {"oops": 1}', '; {"oops": 1}', [("a", "{}")]),
    ("<|python_tag|>print('hi')", "<|python_tag|>print('hi')", []),
    ("<|python_ta", "<|python_ta", []),
    ("{not json", "{not json", []),
    ("", "", []),
]


@pytest.mark.parametrize("text,content,calls", LLAMA3_CASES)
def test_llama3(text, content, calls):
    assert_agrees(Llama3JsonToolParser, text, content, calls)


def test_llama3_prose_streams_without_delay():
    parser = Llama3JsonToolParser(counting_ids())
    assert parser.feed("Hello") == [ContentDelta("Hello")]
    assert parser.feed(' {"name": "x", "parameters": {}}') == [ContentDelta(' {"name": "x", "parameters": {}}')]


def test_llama3_arguments_stream():
    parser = Llama3JsonToolParser(counting_ids())
    assert parser.feed('{"name": "s", "parameters": {"a": ') == [ToolCallDelta(0, "id0", "s", '{"a": ')]
    assert parser.feed('"b"}}') == [ToolCallDelta(0, None, None, '"b"}')]


# --- Mistral -----------------------------------------------------------------------------------


MISTRAL_CASES = [
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": ' + WEATHER + "}]", "", [("get_weather", WEATHER)]),
    (
        'Checking.[TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "b", "arguments": ' + TRICKY + "}]",
        "Checking.",
        [("a", "{}"), ("b", TRICKY)],
    ),
    ("[TOOL_CALLS]get_weather[ARGS]" + WEATHER, "", [("get_weather", WEATHER)]),
    ('[TOOL_CALLS]a[ARGS]{"x": 1}[TOOL_CALLS]b[ARGS]' + TRICKY, "", [("a", '{"x": 1}'), ("b", TRICKY)]),
    ('[TOOL_CALLS]a[CALL_ID]abc123XYZ[ARGS]{"x": 1}', "", [("a", '{"x": 1}')]),
    ('[TOOL_CALLS]a{"x": 1}', "", [("a", '{"x": 1}')]),
    ('[TOOL_CALLS]a[ARGS]{"x": 1}\n\nAfter.', "After.", [("a", '{"x": 1}')]),
    ("[TOOL_CALLS] []", "", []),
    # not calls
    ("[TOOL_CALLS] nonsense!", "[TOOL_CALLS] nonsense!", []),
    ("[TOOL_CALLS]a[NOPE]{}", "[TOOL_CALLS]a[NOPE]{}", []),
    # cut short (max_tokens) before a call was committed: dropped, never content
    ("Hi [TOOL_CALLS]", "Hi", []),
    ("[TOOL_CALLS] [", "", []),
    ('[TOOL_CALLS] [{"name": "a", "arguments": {}}, {"name": "b", "argu', "", [("a", "{}")]),
    ("[TOOL_CALLS]get_weather", "", []),
    ("[TOOL_CALLS]get_weather[AR", "", []),
    ("[TOOL_CALLS]a[ARGS]{}[TOOL_CALLS]b[CALL_ID]12", "", [("a", "{}")]),
    ("a [TOOL_CALL] b [TOOL", "a [TOOL_CALL] b [TOOL", []),
    ('[TOOL_CALLS][{"name": "a", "arguments": {}}, oops]', ", oops]", [("a", "{}")]),
]


@pytest.mark.parametrize("text,content,calls", MISTRAL_CASES)
def test_mistral(text, content, calls):
    assert_agrees(MistralToolParser, text, content, calls)


# --- untagged calls: a reply that is bare JSON, in every format --------------------------------

OFFERED = ("get_weather", "get_time")
PARIS = '{"city": "Paris"}'

UNTAGGED_CASES = [
    # Qwen2.5 skipping its <tool_call> tags, Llama 3 as its template asks; leading whitespace
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', "", [("get_weather", PARIS)]),
    ('\n\n  {"name": "get_weather", "parameters": {"city": "Paris"}}\n', "", [("get_weather", PARIS)]),
    ('{"type": "function", "name": "get_time", "parameters": {}}', "", [("get_time", "{}")]),
    ('{"arguments": {"city": "Paris"}, "name": "get_weather"}', "", [("get_weather", PARIS)]),
    # several: separated by ";" or newlines, or as a list
    (
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n{"name": "get_time", "arguments": {}}',
        "",
        [("get_weather", PARIS), ("get_time", "{}")],
    ),
    (
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}',
        "",
        [("get_weather", PARIS), ("get_time", "{}")],
    ),
    (
        ' [{"name": "get_weather", "arguments": {"city": "Paris"}},\n {"name": "get_time", "arguments": {}}]',
        "",
        [("get_weather", PARIS), ("get_time", "{}")],
    ),
    # text after the calls is content
    ('{"name": "get_time", "arguments": {}}\n\nDone.', "Done.", [("get_time", "{}")]),
    ('[{"name": "get_time", "arguments": {}}] Done.', "Done.", [("get_time", "{}")]),
    # not calls of an offered tool: content, unchanged
    ('{"name": "send_email", "arguments": {"to": "x"}}', '{"name": "send_email", "arguments": {"to": "x"}}', []),
    ('{"city": "Paris", "temperature": 21}', '{"city": "Paris", "temperature": 21}', []),
    ('{"name": "get_weather"}', '{"name": "get_weather"}', []),
    ('{"name": "get_weather" "arguments": {}}', '{"name": "get_weather" "arguments": {}}', []),
    ("  {not json}", "  {not json}", []),
    ("[1, 2, 3]", "[1, 2, 3]", []),
    ('[{"a": 1}]', '[{"a": 1}]', []),
    ("[]", "[]", []),
    ('Sure: {"name": "get_time", "arguments": {}}', 'Sure: {"name": "get_time", "arguments": {}}', []),
    # a call, then something that is not one
    (
        '{"name": "get_time", "arguments": {}}\n{"name": "nope", "arguments": {}}',
        '{"name": "nope", "arguments": {}}',
        [("get_time", "{}")],
    ),
    ('[{"name": "get_time", "arguments": {}}, 7]', ", 7]", [("get_time", "{}")]),
    # cut short (max_tokens): a call is dropped once its name is read, or after another call
    ('{"name": "get_weather", "arguments": {"city": "Pa', "", [("get_weather", '{"city": "Pa')]),
    ('{"name": "get_weather", "arguments":', "", []),
    ('{"name": "get_time", "arguments": {}}; {"name": "get_w', "", [("get_time", "{}")]),
    ('[{"name": "get_time", "arguments": {}}, {"na', "", [("get_time", "{}")]),
    ('{"name": "get_wea', '{"name": "get_wea', []),  # maybe a JSON answer cut short
    ('[{"na', '[{"na', []),
    ("[", "[", []),
]


@pytest.mark.parametrize("parser_cls", [HermesToolParser, Llama3JsonToolParser, MistralToolParser])
@pytest.mark.parametrize("text,content,calls", UNTAGGED_CASES)
def test_untagged_calls(parser_cls, text, content, calls):
    assert_agrees(parser_cls, text, content, calls, tool_names=OFFERED, num_random=8)


def test_untagged_calls_of_any_name_without_offered_tools():
    text = '{"name": "anything", "arguments": {}}'
    assert_agrees(HermesToolParser, text, "", [("anything", "{}")])


def test_untagged_then_tagged_calls():
    text = '{"name": "get_time", "arguments": {}}\n<tool_call>\n{"name": "s", "arguments": {}}\n</tool_call>'
    assert_agrees(HermesToolParser, text, "", [("get_time", "{}"), ("s", "{}")], tool_names=OFFERED)


def test_untagged_text_is_released_as_soon_as_it_cannot_be_a_call():
    parser = HermesToolParser(counting_ids(), OFFERED)
    assert parser.feed(" \n") == []
    assert parser.feed('{"') == []
    assert parser.feed('city": ') == [ContentDelta(' \n{"city":')]  # "city" opens no call
    assert parser.feed('"Paris"}') == [ContentDelta(' "Paris"}')]  # (a space may precede a tag)
    parser = HermesToolParser(counting_ids(), OFFERED)
    assert parser.feed('{"name": "send_') == []
    assert parser.feed('email", ') == [ContentDelta('{"name": "send_email",')]  # not offered
    parser = HermesToolParser(counting_ids(), OFFERED)
    assert parser.feed("[") == []
    assert parser.feed("1") == [ContentDelta("[1")]
    assert HermesToolParser(counting_ids(), OFFERED).feed("Hello") == [ContentDelta("Hello")]


def test_untagged_arguments_stream():
    parser = HermesToolParser(counting_ids(), OFFERED)
    assert parser.feed('{"name": "get_weather", ') == []
    assert parser.feed('"arguments": {"ci') == [ToolCallDelta(0, "id0", "get_weather", '{"ci')]
    assert parser.feed('ty": "Oslo"}}') == [ToolCallDelta(0, None, None, 'ty": "Oslo"}')]
    assert parser.finish() == [] and parser.num_tool_calls == 1


@pytest.mark.parametrize(
    "parser_cls,text,content",
    [
        (HermesToolParser, "Let me check.\n<tool_ca", "Let me check."),
        (HermesToolParser, '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<', ""),
        (MistralToolParser, "Checking [TOOL_CA", "Checking"),
        (HermesToolParser, "Plain words, cut  ", "Plain words, cut  "),
    ],
)
def test_partial_tag_at_the_end_of_truncated_output_is_dropped(parser_cls, text, content):
    """max_tokens cut inside the tag opening the next call (several tokens in a vocabulary
    without it as a special token, e.g. SmolLM2's); the model ending there leaves it content."""
    calls = [("a", "{}")] if "arguments" in text else []
    assert_agrees(parser_cls, text, content, calls, truncated=True)
    assert without_ids(parser_cls(counting_ids()).parse(text)) == (text.split("</tool_call>\n")[-1], calls)


# --- syntax tables: what a grammar produces, the parser reads -----------------------------------


SYNTAXES = [
    (HERMES_SYNTAX, HermesToolParser),
    (LLAMA3_SYNTAX, Llama3JsonToolParser),
    (MISTRAL_SYNTAX, MistralToolParser),
    (MISTRAL_V11_SYNTAX, MistralToolParser),
]


def test_syntax_renders_the_documented_layout():
    assert (
        HERMES_SYNTAX.render([("f", '{"a": 1}')]) == '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    )
    assert (
        LLAMA3_SYNTAX.render([("f", "{}"), ("g", "{}")])
        == '{"name": "f", "parameters": {}}; {"name": "g", "parameters": {}}'
    )
    assert MISTRAL_SYNTAX.render([("f", "{}")]) == '[TOOL_CALLS][{"name": "f", "arguments": {}}]'
    assert MISTRAL_V11_SYNTAX.render([("f", "{}"), ("g", "{}")]) == "[TOOL_CALLS]f[ARGS]{}[TOOL_CALLS]g[ARGS]{}"
    assert (
        HERMES_SYNTAX.render_call('quo"te', "{}") == '<tool_call>\n{"name": "quo\\"te", "arguments": {}}\n</tool_call>'
    )


def random_json(rng: random.Random, depth: int = 0):
    atoms = [
        "",
        "}",
        "]{",
        '"',
        "\\",
        "</tool_call>",
        "[TOOL_CALLS]",
        "日本 😀",
        "a\nb\tc",
        "<|python_tag|>",
        ";",
        0,
        -1.5,
        True,
        None,
    ]
    if depth > 2 or rng.random() < 0.3:
        return rng.choice(atoms)
    if rng.random() < 0.5:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {
        rng.choice(["k", "name", "arguments", "x y", "é"]) + str(i): random_json(rng, depth + 1)
        for i in range(rng.randint(0, 3))
    }


@pytest.mark.parametrize("syntax,parser_cls", SYNTAXES, ids=lambda x: getattr(x, "format", ""))
def test_random_calls_round_trip_through_every_chunking(syntax, parser_cls):
    rng = random.Random(syntax.format)
    for trial in range(12):
        calls = []
        for i in range(rng.randint(1, 3)):
            arguments = {f"arg{i}": random_json(rng)}
            dumped = json.dumps(arguments, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1]))
            calls.append((f"fn_{trial}_{i}", dumped))
        prefix = "" if parser_cls is Llama3JsonToolParser else rng.choice(["", "Sure, calling.\n", "x "])
        text = prefix + syntax.render(calls)
        parsed = parser_cls(counting_ids()).parse(text)
        assert [json.loads(call.arguments) for call in parsed.tool_calls] == [json.loads(args) for _, args in calls]
        assert_agrees(parser_cls, text, prefix.strip(), calls, seed=trial, num_random=5)


@pytest.mark.parametrize("parser_cls", [HermesToolParser, Llama3JsonToolParser, MistralToolParser])
def test_every_prefix_streams_like_it_parses(parser_cls):
    """Output cut anywhere (max_tokens): stream and parse still agree; complete calls stand, a
    call cut after its commit keeps its arguments so far, and the text of a call cut before its
    commit is never content. Until a call is certain, nothing is lost."""
    syntax, lead, certain = {
        HermesToolParser: (HERMES_SYNTAX, "Hi ", "<tool_call>"),
        Llama3JsonToolParser: (LLAMA3_SYNTAX, "", '"a"'),  # untagged: a call once its name is read
        MistralToolParser: (MISTRAL_V11_SYNTAX, "Hi ", "[TOOL_CALLS]"),
    }[parser_cls]
    calls = [("a", '{"s": "x}\\"y", "n": [1, {"m": null}]}'), ("b", "{}")]
    text = lead + syntax.render(calls)
    for end in range(len(text) + 1):
        prefix = text[:end]
        parsed = parser_cls(counting_ids()).parse(prefix, truncated=True)
        content, got = without_ids(parsed)
        assert content == lead.strip() or (content == prefix and certain not in prefix), prefix
        assert all(name == calls[i][0] and calls[i][1].startswith(args) for i, (name, args) in enumerate(got))
        for cuts in itertools.islice(chunkings(prefix, seed=end), 0, None, 7):
            events = stream(parser_cls, prefix, cuts, truncated=True)
            assert without_ids(collect_events(events)) == (content, got), (prefix, cuts)


def test_random_hermes_soup_streams_like_it_parses():
    rng = random.Random(3)
    pieces = [
        "<tool_call>",
        "</tool_call>",
        "<tool",
        "_call>",
        "\n",
        " ",
        "{",
        "}",
        '"name"',
        ":",
        '"f"',
        ",",
        '"arguments"',
        "x",
        "é",
        '"',
        "\\",
    ]
    for _ in range(400):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        expected = without_ids(HermesToolParser(counting_ids()).parse(text))
        for _ in range(4):
            cuts = sorted(rng.sample(range(1, len(text)), k=rng.randint(0, len(text) - 1))) if len(text) > 1 else []
            events = stream(HermesToolParser, text, cuts)
            assert_shape(events)
            assert without_ids(collect_events(events)) == expected, (text, cuts)


@pytest.mark.parametrize(
    "raw,expected",
    [
        ('"{\\"a\\": 1}"', '{"a": 1}'),
        ('" {\\"a\\": 1} "', '{"a": 1}'),
        ('"[1, 2]"', '"[1, 2]"'),  # only a string holding an object is unwrapped
        ('"plain"', '"plain"'),
        ("null", "{}"),
        ("42", "42"),
        ('{"a": 1}', '{"a": 1}'),
        ("{broken", "{broken"),
    ],
)
def test_normalize_arguments(raw, expected):
    assert normalize_arguments(raw) == expected


# --- choosing the parser -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "template,expected",
    [
        ("{{ '<tool_call>\\n' }}", HermesToolParser),
        ("{{ '[TOOL_CALLS]' }}", MistralToolParser),
        ("{{ '<|python_tag|>' }}", Llama3JsonToolParser),
        ("{% if message.role == 'ipython' %}", Llama3JsonToolParser),
        (CHATML_TEMPLATE, HermesToolParser),
        (None, HermesToolParser),
    ],
)
def test_tool_parser_for(template, expected):
    assert tool_parser_for(template) is expected


@pytest.mark.parametrize(
    "template,expected",
    [
        ("{{ '<tool_call>' }}", HERMES_SYNTAX),
        ("{{ '[TOOL_CALLS]' + tool_calls | tojson }}", MISTRAL_SYNTAX),
        ("{{ '[TOOL_CALLS]' + name + '[ARGS]' + args }}", MISTRAL_V11_SYNTAX),
        ("{{ '<|python_tag|>' }}", LLAMA3_SYNTAX),
        (None, HERMES_SYNTAX),
    ],
)
def test_tool_call_syntax_for(template, expected):
    assert tool_call_syntax_for(template) is expected


def test_reasoning_then_tools_chain():
    """The integration order: reasoning parser first, its content into the tool parser."""
    text = "<think>Need <tool_call> weather.</think>\n\nOne moment.\n" + HERMES_SYNTAX.render([("w", '{"c": "Oslo"}')])
    rng = random.Random(5)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), k=rng.randint(1, 20)))
        reasoning_parser, tool_parser = ReasoningParser(), HermesToolParser(counting_ids())
        reasoning, events = "", []
        for a, b in itertools.pairwise([0, *cuts, len(text)]):
            delta = reasoning_parser.feed(text[a:b])
            reasoning += delta.reasoning
            events += tool_parser.feed(delta.content)
        last = reasoning_parser.finish()
        events += tool_parser.feed(last.content) + tool_parser.finish()
        assert reasoning + last.reasoning == "Need <tool_call> weather."
        assert without_ids(collect_events(events)) == ("One moment.", [("w", '{"c": "Oslo"}')])


# --- tools prompt and messages for templates that know no tools --------------------------------

# The tool parts of Qwen2.5's chat template (its default system message aside).
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city (°C)",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris and Köln?"},
    {
        "role": "assistant",
        "content": "Checking both.",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Köln"}'}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18"},
    {"role": "tool", "tool_call_id": "call_2", "content": "15"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c3", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}],
    },
    {"role": "tool", "tool_call_id": "c3", "content": [{"type": "text", "text": "n/a"}]},
    {"role": "user", "content": "Thanks"},
]


def test_tools_system_prompt_is_qwen25_wording():
    prompt = tools_system_prompt(TOOLS)
    assert prompt == (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(TOOLS[0], ensure_ascii=False)
        + "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def test_chatml_with_rewritten_messages_renders_like_qwen25():
    qwen_messages = messages_for_template(CONVERSATION[:-3] + CONVERSATION[-1:], renders_tools=True)
    expected = compile_chat_template(QWEN25_TEMPLATE).render(
        messages=qwen_messages, tools=TOOLS, add_generation_prompt=True
    )
    plain = messages_for_template(
        add_tools_system_prompt(CONVERSATION[:-3] + CONVERSATION[-1:], TOOLS), renders_tools=False
    )
    rendered = compile_chat_template(CHATML_TEMPLATE).render(messages=plain, add_generation_prompt=True)
    assert rendered == expected
    assert "<tool_response>\n18\n</tool_response>\n<tool_response>\n15\n</tool_response>" in rendered


def test_messages_for_plain_template():
    plain = messages_for_template(CONVERSATION, renders_tools=False)
    assert [m["role"] for m in plain] == ["system", "user", "assistant", "user", "assistant", "user", "user"]
    assert plain[2] == {
        "role": "assistant",
        "content": 'Checking both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Köln"}}\n</tool_call>',
    }
    assert plain[3] == {
        "role": "user",
        "content": "<tool_response>\n18\n</tool_response>\n<tool_response>\n15\n</tool_response>",
    }
    assert plain[4]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'
    assert plain[5] == {"role": "user", "content": "<tool_response>\nn/a\n</tool_response>"}
    assert CONVERSATION[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # input untouched


def test_rendered_calls_parse_back():
    plain = messages_for_template(CONVERSATION, renders_tools=False)
    parsed = HermesToolParser(counting_ids()).parse(plain[2]["content"])
    assert without_ids(parsed) == (
        "Checking both.",
        [("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Köln"}')],
    )


def test_messages_for_tool_template_decodes_arguments():
    messages = messages_for_template(CONVERSATION, renders_tools=True)
    assert messages[2]["tool_calls"][1]["function"]["arguments"] == {"city": "Köln"}
    assert messages[2]["tool_calls"][1]["id"] == "call_2"
    assert messages[3] == CONVERSATION[3]
    bad = [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]
    assert messages_for_template(bad, renders_tools=True)[0]["tool_calls"][0]["function"]["arguments"] == "{oops"


def test_add_tools_system_prompt():
    with_system = add_tools_system_prompt([{"role": "system", "content": "Be brief."}], TOOLS)
    assert with_system == [{"role": "system", "content": "Be brief.\n\n" + tools_system_prompt(TOOLS)}]
    without = add_tools_system_prompt([{"role": "user", "content": "hi"}], TOOLS)
    assert without[0] == {"role": "system", "content": tools_system_prompt(TOOLS)} and without[1]["role"] == "user"


@pytest.mark.parametrize(
    "template,expected",
    [
        (QWEN25_TEMPLATE, True),
        (CHATML_TEMPLATE, False),
        ("{% if tools is not none %}x{% endif %}", True),
        ("{{ 'tools' }} and tools in plain text", False),
        ("{% for t in custom_tools %}{% endfor %}", False),
        ("{% if %}", False),  # does not lex
    ],
)
def test_template_renders_tools(template, expected):
    assert template_renders_tools(template) is expected
