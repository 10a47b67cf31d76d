"""Draw docs/web-chat.png: the chat page of a running server (default http://127.0.0.1:8080)
after one question, in Debian's chromium through Playwright.

    .venv/bin/python scripts/web_screenshot.py [URL] [OUT]
"""

from __future__ import annotations

import shutil
import sys

from playwright.sync_api import sync_playwright

QUESTION = "Write a Python function that checks whether a word is a palindrome, and explain it briefly."


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080"
    out = sys.argv[2] if len(sys.argv) > 2 else "docs/web-chat.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"))
        page = browser.new_page(viewport={"width": 1200, "height": 760})
        page.goto(url)
        page.wait_for_selector("body[data-ready=true]")
        page.click("#settings-toggle")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "200")
        page.dispatch_event("#max-tokens", "change")
        page.click("#settings-toggle")
        page.fill("#prompt", QUESTION)
        page.press("#prompt", "Enter")
        page.wait_for_selector(".turn.assistant .stats:not(:empty)", timeout=120_000)
        page.screenshot(path=out)
        browser.close()


if __name__ == "__main__":
    main()
