"""The web page in a real headless Chromium against the real server and the real default models."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from browser import CHROMIUM, Browser, BrowserError
from conftest import DEMO_QUESTION, Server, edgekb_env

QUESTION, ASK, STOP = "[data-testid=question]", "[data-testid=ask]", "[data-testid=stop]"
ANSWER_TIMEOUT = 180
# Stages after which a card changes no more.
FINAL = ("done", "length", "cancelled", "error")
# A whole answer: ended by the model, or by max_tokens (greedy output differs between CPUs).
ANSWERED = ("done", "length")

# The newest card (cards are prepended) as the user sees it.
NEWEST = """(() => {
  const cards = document.querySelectorAll('#cards > .card');
  const c = cards[0];
  if (!c) return {count: 0};
  const st = c.querySelector('[data-testid=status]');
  return {count: cards.length, stage: st.dataset.stage || '', status: st.textContent,
          question: c.querySelector('h2').textContent,
          sources: [...c.querySelectorAll('[data-testid=sources] > li')].map(li => li.textContent),
          answer: c.querySelector('[data-testid=answer]').textContent,
          error: (c.querySelector('.err') || {}).textContent || ''};
})()"""


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        if os.geteuid() == 0:
            pytest.fail(f"{CHROMIUM} is missing; scripts/test installs it (apt-get install "
                        "chromium)")
        pytest.skip(f"{CHROMIUM} is missing and installing it needs root")
    b = await Browser.launch(tmp_path / "chromium")
    try:
        yield b
    finally:
        await b.close()


async def sign_in(browser: Browser, server: Server) -> None:
    """What a login leaves in the browser: the HttpOnly token cookie (set here through
    DevTools; test_login_screen_signs_in_and_out goes through the login screen itself)."""
    await browser.send("Network.setCookie", name="edgekb_token", value=server.token,
                       url=server.url, httpOnly=True, sameSite="Strict")


async def open_page(browser: Browser, url: str, server: Server | None = None) -> None:
    if server is not None:
        await sign_in(browser, server)
    await browser.navigate(url)
    await browser.wait_for("document.querySelector('[data-testid=conn]').dataset.state === 'up'",
                           timeout=30)


async def ask(browser: Browser, question: str) -> None:
    await browser.type_into(QUESTION, question)
    await browser.click(ASK)


async def card_when(browser: Browser, count: int, stages: tuple[str, ...],
                    timeout: float = ANSWER_TIMEOUT) -> dict[str, Any]:
    """The newest card once there are `count` cards and its stage is one of `stages`."""
    try:
        return await browser.wait_for(
            f"(() => {{ const c = {NEWEST}; "
            f"return c.count === {count} && {list(stages)!r}.includes(c.stage) ? c : null; }})()",
            timeout)
    except BrowserError:
        raise AssertionError(f"after {timeout} s, not {count} cards with the newest in {stages}: "
                             f"{await browser.evaluate(NEWEST)}") from None


async def test_demo_question_shows_sources_then_answer(browser: Browser, server: Server,
                                                       tmp_path: Path) -> None:
    await open_page(browser, server.url, server)
    # Note the answer text at the moment the sources first appear: it must still be empty.
    await browser.evaluate("""window.answerAtSources = null;
      new MutationObserver(() => {
        const c = document.querySelector('#cards > .card');
        if (!c || window.answerAtSources !== null) return;
        if (c.querySelector('[data-testid=sources] > li'))
          window.answerAtSources = c.querySelector('[data-testid=answer]').textContent;
      }).observe(document.getElementById('cards'),
                 {childList: true, subtree: true, characterData: true});""")
    await ask(browser, DEMO_QUESTION)

    card = await card_when(browser, 1, FINAL)
    await browser.screenshot(tmp_path / "page.png", Path("/tmp/edgekb-page.png"))
    assert card["stage"] in ANSWERED, card
    assert card["question"] == DEMO_QUESTION
    assert card["sources"] and ("pump-manual.md" in card["sources"][0]
                                or "P-200" in card["sources"][0]), card["sources"]
    assert card["answer"].strip(), card
    assert await browser.evaluate("window.answerAtSources") == ""
    sources_first = await browser.evaluate("""(() => {
      const c = document.querySelector('#cards > .card');
      const src = c.querySelector('[data-testid=sources] > li');
      const ans = c.querySelector('[data-testid=answer]');
      return !!(src.compareDocumentPosition(ans) & Node.DOCUMENT_POSITION_FOLLOWING); })()""")
    assert sources_first
    conn = await browser.evaluate(
        "(() => { const c = document.querySelector('[data-testid=conn]');"
        " return [c.dataset.state, c.textContent]; })()")
    assert conn == ["up", "Connected"]
    assert await browser.evaluate(f"document.querySelector('{QUESTION}').value") == ""
    assert await browser.evaluate(f"document.querySelector('{STOP}').disabled") is True


async def test_q_parameter_asks_once_on_load(browser: Browser, server: Server) -> None:
    await open_page(browser, f"{server.url}?q={quote(DEMO_QUESTION)}", server)
    card = await card_when(browser, 1, FINAL)
    assert card["stage"] in ANSWERED, card
    assert card["question"] == DEMO_QUESTION
    assert card["sources"] and card["answer"].strip(), card
    assert (await browser.evaluate(NEWEST))["count"] == 1


async def test_stop_cancels_the_answer_and_the_page_still_answers(browser: Browser,
                                                                  server: Server) -> None:
    await open_page(browser, server.url, server)
    await ask(browser, DEMO_QUESTION)
    running = await card_when(browser, 1, ("reading", "generating", *FINAL))
    assert running["stage"] in ("reading", "generating"), f"finished before Stop: {running}"
    await browser.click(STOP)

    stopped = await card_when(browser, 1, FINAL, timeout=60)
    assert stopped["stage"] == "cancelled", stopped
    assert stopped["status"] == "Stopped"
    assert await browser.evaluate(f"document.querySelector('{STOP}').disabled") is True

    await ask(browser, "What does the AC-75 compressor do when it overheats?")
    card = await card_when(browser, 2, FINAL)
    assert card["stage"] in ANSWERED, card
    assert card["answer"].strip(), card
    # The stopped card stays stopped.
    older = await browser.evaluate(
        "document.querySelectorAll('#cards > .card')[1]"
        ".querySelector('[data-testid=status]').dataset.stage")
    assert older == "cancelled"


async def test_login_screen_signs_in_and_out(browser: Browser, server: Server,
                                             models_cache: Path) -> None:
    env = edgekb_env(models_cache)
    added = subprocess.run([sys.executable, "-m", "edgekb", "users", "add", "tech1",
                            "--password-stdin", "--data-dir", str(server.data_dir)],
                           input="wrench-and-gauge\n", env=env, capture_output=True, text=True,
                           timeout=60, check=False)
    assert added.returncode == 0, added.stderr
    await browser.navigate(server.url)
    await browser.wait_for("!document.querySelector('[data-testid=login]').hidden", timeout=30)
    assert await browser.evaluate("document.querySelector('#ask-form').hidden") is True
    await browser.type_into("[data-testid=login-name]", "tech1")
    await browser.type_into("[data-testid=login-password]", "not-the-password")
    await browser.click("[data-testid=login-submit]")
    await browser.wait_for("document.querySelector('#notice').textContent.includes('wrong')",
                           timeout=30)
    await browser.type_into("[data-testid=login-password]", "wrench-and-gauge")
    await browser.click("[data-testid=login-submit]")
    await browser.wait_for("document.querySelector('[data-testid=conn]').dataset.state === 'up'",
                           timeout=30)
    # The token is in an HttpOnly cookie: the page's script cannot read it.
    assert "edgekb_token" not in await browser.evaluate("document.cookie")
    await ask(browser, DEMO_QUESTION)
    card = await card_when(browser, 1, FINAL)
    assert card["stage"] in ANSWERED, card
    await browser.click("[data-testid=logout]")
    await browser.wait_for("!document.querySelector('[data-testid=login]').hidden", timeout=30)
    await browser.navigate(server.url)  # a reload stays signed out
    await browser.wait_for("!document.querySelector('[data-testid=login]').hidden", timeout=30)
