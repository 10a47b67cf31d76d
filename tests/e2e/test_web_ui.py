"""The web chat page at / in a real browser (chromium through Playwright), against a real server
with two models and an API key: the key prompt, a streamed answer stored in its conversation,
stop aborting on the server, model switching, reload, rename, delete, regenerate, copy, stored
reasoning and tool calls, and an error a user can cause."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from lmserve.cli import default_model_path
from tests.helpers.live_server import start_server
from tests.helpers.prometheus import metric_samples

KEY = "web-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    folder = tmp_path_factory.mktemp("web-models")
    for name in ("alpha", "beta"):
        (folder / f"{name}.gguf").symlink_to(default_model_path())
    proc, url, _ = start_server("--models-dir", str(folder), "--no-embedding-model", "--api-key", KEY)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def page(browser, web):
    """A page of the chat with the key already given (as after the prompt, on an earlier visit)."""
    context = browser.new_context(viewport={"width": 1200, "height": 800}, bypass_csp=True)  # lets the test evaluate
    context.add_init_script(f"localStorage.setItem('lmserve.apiKey', '{KEY}')")
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(error))
    page.goto(web)
    page.wait_for_selector("body[data-ready=true]")
    yield page
    context.close()
    assert errors == []


def api(web, method, path, **kwargs):
    return httpx.request(method, f"{web}{path}", headers=AUTH, timeout=60, **kwargs)


def items_of(web, conversation_id):
    return api(web, "GET", f"/v1/conversations/{conversation_id}/items?order=asc").json()["data"]


def texts(items):
    return [(item["role"], "".join(part["text"] for part in item["content"])) for item in items]


def ask(page, text, **settings):
    if settings:
        page.click("#settings-toggle")
        for field, value in settings.items():
            page.fill(f"#{field}", str(value))
            page.dispatch_event(f"#{field}", "change")
        page.click("#settings-toggle")
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def wait_reply(page, timeout=60_000):
    page.wait_for_function("!document.body.classList.contains('streaming') && "
                           "document.querySelector('.turn.assistant:last-child .stats')?.textContent",
                           timeout=timeout)
    return page.locator(".turn.assistant").last


def current_conversation(page):
    return page.evaluate("location.hash.slice(1)")


def test_a_browser_gets_the_page_and_a_program_the_status_both_keyed_apart(web):
    page = httpx.get(web, headers={"Accept": "text/html,application/xhtml+xml"})  # no key needed for the page
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    script = httpx.get(f"{web}/ui/chat.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert httpx.get(web, headers={"Accept": "application/json"}).status_code == 401  # the status is keyed
    assert httpx.get(web, headers={**AUTH, "Accept": "application/json"}).json()["status"] == "ok"
    assert httpx.get(f"{web}/ui/missing.js").status_code == 404


def test_the_page_asks_for_the_key_and_keeps_it(browser, web):
    context = browser.new_context(bypass_csp=True)
    page = context.new_page()
    page.goto(web)
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", "wrong")
    page.press("#key-input", "Enter")
    page.wait_for_function("document.getElementById('key-error').textContent.includes('API key')")
    assert page.is_visible("#key-dialog[open]")
    page.fill("#key-input", KEY)
    page.press("#key-input", "Enter")
    page.wait_for_selector("body[data-ready=true]")
    assert page.eval_on_selector_all("#model option", "options => options.map(o => o.value)") == ["alpha", "beta"]
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert not page.is_visible("#key-dialog[open]")
    context.close()


def test_a_question_streams_its_answer_into_a_stored_conversation(page, web):
    page.evaluate("""() => {  // the reply's length at every change while it streams
        window.seen = [];
        new MutationObserver(() => {
            const body = document.querySelector('.turn.assistant:last-child .body');
            if (body && document.body.classList.contains('streaming')) window.seen.push(body.textContent.length);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")
    with page.expect_request("**/v1/responses") as sent:
        ask(page, "List five fruits, one per line.", system="Answer briefly.", temperature=0,
            **{"top-p": 0.9, "max-tokens": 80})
    reply = wait_reply(page)
    body = sent.value.post_data_json  # the settings go with the request, by their API names
    assert {k: body[k] for k in ("instructions", "temperature", "top_p", "max_output_tokens", "model", "stream", "truncation")} == {
        "instructions": "Answer briefly.", "temperature": 0, "top_p": 0.9, "max_output_tokens": 80,
        "model": "alpha", "stream": True, "truncation": "auto"}
    assert body["conversation"].startswith("conv_")
    text = reply.locator(".body").get_attribute("data-text")
    seen = page.evaluate("window.seen")
    assert text and len([n for n in seen if 0 < n]) >= 3, seen  # it grew in steps before the end
    stats = reply.locator(".stats").inner_text()
    assert stats.startswith("alpha ·") and "tok/s" in stats and "prompt tokens cached" in stats
    conversation = current_conversation(page)
    assert texts(items_of(web, conversation)) == [("user", "List five fruits, one per line."), ("assistant", text)]
    title = page.locator(f"#conversations li[data-id='{conversation}'] .title").inner_text()
    assert title == "List five fruits, one per line."

    ask(page, "Now one more.")  # the second turn continues on the server's copy: its prefix is cached
    stats = wait_reply(page).locator(".stats").inner_text()
    cached = int(stats.split(" of ")[0].rsplit(" ", 1)[1])
    assert cached > 0, stats
    assert len(items_of(web, conversation)) == 4


def finished_by_abort(web) -> float:
    samples = metric_samples(httpx.get(f"{web}/metrics").text)
    return samples.get(("lmserve:request_success_total", (("finished_reason", "abort"), ("model", "alpha"))), 0.0)


def test_stop_aborts_the_request_on_the_server_and_keeps_what_was_written(page, web):
    aborted = finished_by_abort(web)
    ask(page, "Write a long, detailed essay about the history of Rome.", temperature=0, **{"max-tokens": 1500})
    page.wait_for_function("(document.querySelector('.turn.assistant:last-child .body')?.textContent.length ?? 0) > 40")
    page.click("#stop")
    page.wait_for_selector(".turn.assistant.stopped")
    deadline = time.monotonic() + 10
    while finished_by_abort(web) != aborted + 1 or httpx.get(f"{web}/health").json()["num_running"] != 0:
        assert time.monotonic() < deadline, "the server did not abort the stopped request"
        time.sleep(0.1)
    assert page.is_visible("#send") and not page.is_visible("#stop")
    shown = page.locator(".turn.assistant").last.locator(".body").get_attribute("data-text")
    stored = texts(items_of(web, current_conversation(page)))
    assert stored == [("user", "Write a long, detailed essay about the history of Rome."), ("assistant", shown)]
    assert 40 <= len(shown) < 4000  # far from the 1,500 tokens asked for


def test_switching_models_answers_with_the_model_picked(page, web):
    page.select_option("#model", "beta")
    ask(page, "Say hello.", **{"max-tokens": 8})
    assert wait_reply(page).locator(".stats").inner_text().startswith("beta ·")
    statuses = {m["id"]: m["status"]["value"] for m in api(web, "GET", "/v1/models").json()["data"]}
    assert statuses["beta"] == "loaded"
    page.reload()  # the choice is remembered
    page.wait_for_selector("body[data-ready=true]")
    assert page.input_value("#model") == "beta"


def test_reload_finds_the_conversation_then_rename_and_delete_it(page, web):
    ask(page, "What is two plus two?", **{"max-tokens": 16})
    answer = wait_reply(page).locator(".body").get_attribute("data-text")
    conversation = current_conversation(page)
    page.goto(web)  # a fresh visit: the conversation is in the list, and opens with its turns
    page.wait_for_selector("body[data-ready=true]")
    entry = page.locator(f"#conversations li[data-id='{conversation}']")
    entry.locator(".title").click()
    page.wait_for_selector(".turn.assistant")
    assert page.locator(".turn.user .body").all_inner_texts() == ["What is two plus two?"]
    assert page.locator(".turn.assistant .body").get_attribute("data-text") == answer

    entry.locator(".rename").click()
    page.fill(".rename-input", "Arithmetic")
    page.press(".rename-input", "Enter")
    page.wait_for_function(f"document.querySelector(\"li[data-id='{conversation}'] .title\")?.textContent === 'Arithmetic'")
    assert api(web, "GET", f"/v1/conversations/{conversation}").json()["metadata"]["title"] == "Arithmetic"

    page.once("dialog", lambda dialog: dialog.accept())
    entry.locator(".delete").click()
    page.wait_for_selector(f"#conversations li[data-id='{conversation}']", state="detached")
    assert api(web, "GET", f"/v1/conversations/{conversation}").status_code == 404
    assert page.locator(".turn").count() == 0 and current_conversation(page) == ""


def test_on_a_narrow_screen_the_conversations_open_from_the_header(page, web):
    items = [{"type": "message", "role": "user", "content": "Kept for the phone."}]
    conversation = api(web, "POST", "/v1/conversations", json={"items": items, "metadata": {"title": "Phone"}}).json()
    page.set_viewport_size({"width": 400, "height": 800})
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert not page.is_visible("#sidebar") and page.is_visible("#sidebar-toggle")
    page.click("#sidebar-toggle")
    entry = page.locator(f"#conversations li[data-id='{conversation['id']}'] .title")
    entry.click()
    page.wait_for_selector(".turn.user")
    assert page.locator(".turn.user .body").inner_text() == "Kept for the phone."
    assert not page.is_visible("#sidebar")  # out of the way once one is chosen
    page.set_viewport_size({"width": 1200, "height": 800})
    assert page.is_visible("#sidebar") and not page.is_visible("#sidebar-toggle")


def test_regenerate_replaces_the_last_reply_and_copy_copies_it(page, web):
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    ask(page, "Name a colour.", temperature=1.0, **{"max-tokens": 12})
    wait_reply(page)
    conversation = current_conversation(page)
    first_id = items_of(web, conversation)[1]["id"]
    old = page.locator(".turn.assistant").last
    old_element = old.element_handle()
    old.locator(".regenerate").click()
    old_element.wait_for_element_state("hidden")  # removed from the page
    wait_reply(page)
    assert page.locator(".turn").count() == 2
    stored = items_of(web, conversation)
    assert [item["role"] for item in stored] == ["user", "assistant"] and stored[1]["id"] != first_id
    reply = page.locator(".turn.assistant").last
    assert texts(stored)[1][1] == reply.locator(".body").get_attribute("data-text")
    reply.locator(".copy").click()
    assert page.evaluate("navigator.clipboard.readText()") == texts(stored)[1][1]


FAILING_STREAM = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in [
    {"type": "response.created", "response": {}},
    {"type": "response.output_item.added", "output_index": 0,
     "item": {"type": "message", "id": "msg_x", "role": "assistant", "content": []}},
    {"type": "response.output_text.delta", "output_index": 0, "delta": "Half an ans"},
    {"type": "error", "code": "server_error", "message": "the engine stopped"},
    {"type": "response.failed", "response": {"error": {"message": "the engine stopped"}}},
])


def test_regenerating_a_failed_reply_resends_it_and_leaves_earlier_turns_alone(page, web):
    ask(page, "First question.", **{"max-tokens": 8})
    wait_reply(page)
    conversation = current_conversation(page)
    first_turn = texts(items_of(web, conversation))
    page.route("**/v1/responses", lambda route: route.fulfill(
        status=200, headers={"content-type": "text/event-stream"}, body=FAILING_STREAM))
    ask(page, "Second question.")
    page.wait_for_selector(".turn.assistant.failed")
    assert "the engine stopped" in page.inner_text("#error")
    assert page.locator(".turn.assistant.failed .body").inner_text() == "Half an ans"
    page.unroute("**/v1/responses")
    page.locator(".turn.assistant").last.locator(".regenerate").click()
    page.wait_for_function("document.querySelectorAll('.turn').length === 4 && "
                           "!document.querySelector('.turn.failed') && "
                           "document.querySelector('.turn.assistant:last-child .stats').textContent")
    stored = texts(items_of(web, conversation))
    assert stored[:2] == first_turn and [role for role, _ in stored] == ["user", "assistant"] * 2
    assert stored[2] == ("user", "Second question.")


def test_stored_reasoning_and_tool_calls_are_shown_folded_and_escaped(page, web):
    items = [
        {"type": "message", "role": "user", "content": "Weather in Paris?"},
        {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "Ask the <b>tool</b>."}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "18 C, sunny"},
        {"type": "message", "role": "assistant", "content": "**Sunny**, 18 C.\n\n```python\nprint(1 < 2)\n```"},
    ]
    conversation = api(web, "POST", "/v1/conversations", json={"items": items}).json()["id"]
    page.goto(f"{web}/#{conversation}")  # the address of a conversation opens it
    reasoning = page.locator("details.reasoning")
    assert reasoning.get_attribute("open") is None  # folded
    assert reasoning.locator(".reasoning-text").text_content() == "Ask the <b>tool</b>."  # text, not markup
    assert "get_weather" in page.locator(".function_call").inner_text()
    assert '{"city": "Paris"}' in page.locator(".function_call pre").inner_text()
    assert page.locator(".function_call_output pre").inner_text() == "18 C, sunny"
    assert page.locator(".message strong").inner_text() == "Sunny"
    assert page.locator(".message pre code").inner_text() == "print(1 < 2)"
    reasoning.locator("summary").click()
    assert reasoning.get_attribute("open") is not None


# ChatML whose generation prompt opens a reasoning block, as DeepSeek-R1's and Qwen3's do: the
# reply streams as reasoning until the model closes it (the small default model never does).
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")


def test_streamed_reasoning_is_shown_folded_and_stored(browser, tmp_path):
    template = tmp_path / "thinking.jinja"
    template.write_text(THINKING_TEMPLATE)
    proc, url, _ = start_server("--no-embedding-model", "--chat-template-file", str(template))
    try:
        context = browser.new_context(bypass_csp=True)
        page = context.new_page()
        page.goto(url)
        page.wait_for_selector("body[data-ready=true]")
        ask(page, "Why is the sky blue?", temperature=0, **{"max-tokens": 24})
        reply = wait_reply(page)
        reasoning = reply.locator("details.reasoning")
        assert reasoning.get_attribute("open") is None  # folded while and after it streams
        shown = reasoning.locator(".reasoning-text").text_content()
        stored = httpx.get(f"{url}/v1/conversations/{current_conversation(page)}/items?order=asc").json()["data"]
        assert [item["type"] for item in stored] == ["message", "reasoning"]
        letters = lambda text: re.sub(r"[\s*_#`>|-]", "", text)  # noqa: E731 - markdown renders away marks and breaks
        assert letters(shown) and letters(shown) == letters(stored[1]["content"][0]["text"])
        context.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_markdown_renders_replies_and_lets_no_markup_through(page):
    rendered = page.evaluate("""async () => {
        const { renderMarkdown } = await import('/ui/markdown.js');
        const cases = {
            img: '<img src=x onerror="window.hit=1">',
            script: '```html\\n<script>window.hit=1</script>\\n```',
            link: '[click](javascript:window.hit=1) and [site](https://example.org/?a=1&b=2)',
            rich: '# Title\\n\\n- one\\n- **two**\\n\\n1. first\\n2. `x<y`\\n\\n| a | b |\\n|---|---|\\n| 1 | 2 |',
            streaming: 'Here:\\n```js\\nlet a = 1;',
            linkThenUnderscore: 'see [docs](https://x.io/a_b) then y_ z and [c](http://x/**) d**',
            deepQuote: '>'.repeat(20000) + ' deep',
        };
        return Object.fromEntries(Object.entries(cases).map(([k, v]) => [k, renderMarkdown(v)]));
    }""")
    assert "<img" not in rendered["img"] and "&lt;img" in rendered["img"]
    assert "<script" not in rendered["script"] and "&lt;script&gt;" in rendered["script"]
    assert re.findall(r'href="([^"]*)"', rendered["link"]) == ["https://example.org/?a=1&amp;b=2"]
    assert rendered["rich"] == (
        "<h1>Title</h1><ul><li>one</li><li><strong>two</strong></li></ul>"
        "<ol><li>first</li><li><code>x&lt;y</code></li></ol>"
        "<table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>1</td><td>2</td></tr></tbody></table>")
    assert "<pre><code>let a = 1;</code></pre>" in rendered["streaming"]  # an open fence is code already
    assert page.evaluate("window.hit") is None
    built = rendered["linkThenUnderscore"]  # markup the renderer made is not marked up again
    assert re.findall(r'<a href="([^"]*)" target="_blank"', built) == ["https://x.io/a_b", "http://x/**"]
    assert "<em>" not in built and "<strong>" not in built
    assert rendered["deepQuote"].count("<blockquote>") == 8 and rendered["deepQuote"].endswith("</blockquote>" * 8)


def test_a_chat_longer_than_the_context_goes_on_without_its_oldest_turns(page, web):
    words = " ".join(["lorem ipsum dolor sit amet"] * 120)  # ~600 tokens a turn; the tests' context is 2,048
    items = [{"type": "message", "role": role, "content": f"{n}: {words}"}
             for n in range(8) for role in ("user", "assistant")]
    conversation = api(web, "POST", "/v1/conversations", json={"items": items}).json()["id"]
    page.goto(f"{web}/#{conversation}")
    page.wait_for_selector(".turn.assistant")
    ask(page, "Summarise.", **{"max-tokens": 8})
    reply = wait_reply(page)
    assert page.is_hidden("#error") and reply.locator(".stats").inner_text().startswith("alpha ·")
    assert len(items_of(web, conversation)) == 18  # everything kept on the server


def test_an_error_the_user_causes_is_shown_and_the_message_kept(page, web):
    ask(page, "Hello there.", **{"max-tokens": 100000})  # more than the context holds
    page.wait_for_selector("#error:not([hidden])")
    assert "context" in page.inner_text("#error")
    assert page.input_value("#prompt") == "Hello there." and page.locator(".turn").count() == 0
    assert page.is_visible("#send")
