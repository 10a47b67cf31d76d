"""`lmserve chat` (lmserve/chat_cli.py) against the app on a fake engine: turns carry the
conversation, commands, multi-line messages, Ctrl-C stops a reply and not the chat, errors too."""

from __future__ import annotations

import pytest

from lmserve.chat_cli import ChatSession, first_model, run
from lmserve.cli import build_parser
from tests.helpers.fake_engine import FakeEngine
from tests.helpers.server import MODEL, make_client


def script(lines: list[str]):
    """A `read` that gives `lines` in turn, then EOF; `KeyboardInterrupt` entries raise it."""
    feed = iter(lines)

    def read(prompt: str) -> str:
        line = next(feed, None)
        if line is None:
            raise EOFError
        if line is KeyboardInterrupt:
            raise KeyboardInterrupt
        return line

    return read


def chat(engine: FakeEngine, lines: list, system: str | None = None, write=None) -> tuple[ChatSession, list[str]]:
    client = make_client(engine)
    session = ChatSession(client, first_model(client), system=system)
    shown: list[str] = []
    run(session, script(lines), write or shown.append)
    return session, shown


def prompt_text(engine: FakeEngine, call: int = -1) -> str:
    return engine.tokenizer.decode(engine.calls[call][1])


def test_turns_stream_and_carry_the_conversation():
    engine = FakeEngine(reply="Paris", max_model_len=1024)
    session, shown = chat(engine, ["Capital of France?", "And Italy?"], system="Be terse")
    assert session.model == MODEL
    assert "".join(shown).count("Paris") == 2 and "P" in shown  # streamed: token by token
    prompt = prompt_text(engine)
    assert (prompt.index("system: Be terse") < prompt.index("user: Capital of France?") < prompt.index("assistant: Paris")
            < prompt.index("user: And Italy?"))


def test_the_sampling_settings_go_with_every_turn():
    engine = FakeEngine(reply="Hello there", max_model_len=1024)
    client = make_client(engine)
    session = ChatSession(client, MODEL, settings={"temperature": 0.0, "max_tokens": 3})
    run(session, script(["Hi", "Again"]), lambda text: None)
    assert [(p.temperature, p.max_tokens) for _, _, p in engine.calls] == [(0.0, 3), (0.0, 3)]
    assert session.messages[1]["content"] == "Hel"


def test_commands_and_multi_line_messages():
    engine = FakeEngine(reply="ok", max_model_len=1024)
    session, shown = chat(engine, ["First", "/reset", '"""', "line one", "line two", '"""', "/system Be kind",
                                   "Third", "/nonsense", "/bye", "never sent"])
    assert prompt_text(engine, 1) == "user: line one\nline two\nassistant: "  # /reset forgot "First"
    assert prompt_text(engine) == "system: Be kind\nuser: Third\nassistant: "
    assert len(engine.calls) == 3 and any("unknown command /nonsense" in text for text in shown)
    assert session.system == "Be kind"


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on():
    engine = FakeEngine(reply="a long reply", max_model_len=1024)
    written: list[str] = []

    def write(text: str) -> None:
        written.append(text)
        if text == "a":  # the reply's first token is on screen: the user presses Ctrl-C
            raise KeyboardInterrupt

    session, _ = chat(engine, ["Tell me", KeyboardInterrupt, "Again"], write=write)
    assert engine.calls[0][0] in engine.closed_early  # the stream was closed, so the server stopped it
    assert "\n(stopped)\n" in written and "(/bye or Ctrl-D ends the chat)" in "".join(written)
    assert session.messages[1] == {"role": "assistant", "content": "a"}  # what was shown is kept
    assert len(engine.calls) == 2


def test_a_refused_turn_is_shown_and_the_chat_goes_on():
    engine = FakeEngine(reply="ok", max_model_len=64)  # a context too small for the second turn
    session, shown = chat(engine, ["Hi", "x" * 60, "Hi again"])
    text = "".join(shown)
    assert "error: " in text and "context length" in text
    assert len(engine.calls) == 2 and "x" not in prompt_text(engine)  # the refused turn left no trace
    assert [m["content"] for m in session.messages] == ["Hi", "ok", "Hi again", "ok"]


def test_the_command_line():
    args = build_parser().parse_args(["chat", "m1", "--url", "http://h:1", "--api-key", "k", "--system", "s",
                                      "--temperature", "0.5", "--max-tokens", "9"])
    assert (args.command, args.model, args.url, args.api_key, args.system) == ("chat", "m1", "http://h:1", "k", "s")
    assert (args.temperature, args.max_tokens) == (0.5, 9)
    assert build_parser().parse_args(["chat"]).model is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["chat", "--top-k", "1"])
