"""The web page in a real headless Chromium against the app in-process on a real loopback port,
answering with the scripted engine (tests/scripted.py): what the page does with an answer, at
exactly the moments a test chooses (held answers, a queue, a reload mid-answer, a second tab).
The same page against the real models and server: tests/test_web_page.py.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from pagelib import ASK, QUESTION, Login, ask, browser, card_when, cards, open_page  # noqa: F401
from scripted import ScriptedAnswers

from browser import Browser
from edgekb.app import create_app
from edgekb.config import load_settings
from edgekb.tokens import token_authority


class App:
    def __init__(self, server: TestServer, engine: ScriptedAnswers, login: Login) -> None:
        self.server, self.engine = server, engine
        self.login = login  # an admin's, signed with the data dir's key (auth is on)

    @property
    def url(self) -> str:
        return str(self.server.make_url("/"))


@pytest.fixture
async def app(aiohttp_server: Any, tmp_path: Path) -> AsyncIterator[App]:
    settings = load_settings(env={}, overrides={"data_dir": tmp_path / "data",
                                                "storage.min_free_mb": 0,
                                                # one answer at a time: the queue test
                                                "generation.slots": 1})
    engine = ScriptedAnswers()
    server = await aiohttp_server(create_app(settings, answers=engine))
    # What a page login of an admin makes (test_web_page.py signs in through /api/login).
    csrf = secrets.token_urlsafe(18)
    token, _ = token_authority(settings).issue("tech", "admin", 3600, csrf=csrf)
    yield App(server, engine, Login(token, csrf))


async def test_markdown_renders_safely_and_a_citation_opens_its_passage(app: App,
                                                                      browser: Browser) -> None:
    question = "How do I reset the discharge valve?"
    app.engine.script(question, sources=2, snippet="Close the discharge valve slowly, then "
                      "press RESET on the PC-20 panel.", pieces=[
                          "**Close** the discharge valve [1], then press `RESET` [2].\n\n",
                          "| Step | Action |\n|---|---|\n| 1 | Close |\n| 2 | Reset |\n\n",
                          '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'])
    await open_page(browser, app.url, app.login)
    await ask(browser, question)
    card = await card_when(browser, -1, ("done",))
    assert "<img src=x" in card["answer"], "markup from an answer must show as text"
    page = await browser.evaluate("""(() => {
      const a = document.querySelector('#cards > .card [data-testid=answer]');
      return {strong: [...a.querySelectorAll('strong')].map(e => e.textContent),
              code: [...a.querySelectorAll('code')].map(e => e.textContent),
              rows: a.querySelectorAll('table tbody tr').length,
              injected: a.querySelectorAll('img, script').length, pwned: window.pwned || null,
              cites: [...a.querySelectorAll('a.cite')].map(e => e.textContent)}; })()""")
    assert page == {"strong": ["Close"], "code": ["RESET"], "rows": 2, "injected": 0,
                    "pwned": None, "cites": ["[1]", "[2]"]}, page
    await browser.click("#cards > .card a.cite[data-n='2']")
    opened = await browser.wait_for("""(() => {
      const li = document.querySelector('#cards > .card [data-testid=sources] li[data-n="2"]');
      const d = li.querySelector('details');
      return d.open && li.classList.contains('flash') ? {
        place: li.querySelector('.place').textContent,
        marked: li.querySelector('blockquote mark').textContent,
        strong: [...li.querySelectorAll('blockquote strong')].map(e => e.textContent),
        other: document.querySelector('[data-testid=sources] li[data-n="1"] details').open} : null;
    })()""", timeout=5)
    assert opened["place"] == "pump-manual.md · Troubleshooting"
    assert opened["marked"].startswith("Close the discharge valve slowly")
    assert opened["strong"] == ["reset", "discharge", "valve"] or "discharge" in opened["strong"]
    assert opened["other"] is False  # only the cited passage opens


async def test_the_queue_shows_position_estimate_and_time_and_stop_is_per_card(
        app: App, browser: Browser) -> None:
    app.engine.script("first question", hold_after=1)
    await open_page(browser, app.url, app.login)
    await ask(browser, "first question")
    await card_when(browser, 0, ("generating",))
    await ask(browser, "second question")
    queued = await card_when(browser, 1, ("queued",), timeout=10)
    assert "1 answer ahead" in queued["status"] and "about 10 s" in queued["status"], queued
    before = await browser.evaluate("document.querySelectorAll('#cards .elapsed')[1].textContent")
    await asyncio.sleep(2.2)
    later = await browser.evaluate("document.querySelectorAll('#cards .elapsed')[1].textContent")
    assert before != later and later.endswith(" s"), (before, later)
    await browser.click("#cards > .card:nth-child(2) [data-testid=stop]")
    stopped = await card_when(browser, 1, ("cancelled",), timeout=10)
    assert stopped["status"] == "Stopped"
    assert (await cards(browser))[0]["stage"] == "generating", "Stop reached another card"
    app.engine.gate.set()
    first = await card_when(browser, 0, ("done",), timeout=10)
    assert first["answer"] == "Close the discharge valve."
    assert await browser.evaluate(
        "[...document.querySelectorAll('[data-testid=stop]')].every(b => b.hidden)")


async def test_a_reload_mid_answer_continues_and_a_second_tab_follows_it(
        app: App, browser: Browser) -> None:
    app.engine.script("held question", hold_after=2)
    await open_page(browser, app.url, app.login)
    await ask(browser, "held question")
    await browser.wait_for("document.querySelector('#cards [data-testid=answer]')"
                           ".textContent === 'Close the'", timeout=10)
    second = await browser.new_tab()
    try:
        await open_page(second, app.url, app.login)
        followed = await card_when(second, 0, ("generating", "following"), timeout=10)
        assert followed["question"] == "held question"
        await second.wait_for("document.querySelector('#cards [data-testid=answer]')"
                              ".textContent === 'Close the'", timeout=10)
        await browser.navigate(app.url)  # reload mid-answer
        await browser.wait_for("document.querySelector('#cards [data-testid=answer]')"
                               "?.textContent === 'Close the'", timeout=10)
        app.engine.gate.set()
        for tab in (browser, second):
            done = await card_when(tab, 0, ("done",), timeout=10, count=1)
            assert done["answer"] == "Close the discharge valve.", done
            assert done["question"] == "held question"
    finally:
        await second.close()
    assert app.engine.started == ["held question"]  # asked once, followed twice


async def test_conversations_new_rename_switch_and_delete(app: App, browser: Browser) -> None:
    await open_page(browser, app.url, app.login)
    await ask(browser, "pump question")
    await card_when(browser, 0, ("done",))
    await browser.click("[data-testid=new-conversation]")
    await browser.wait_for("!document.querySelector('[data-testid=welcome]').hidden", 10)
    await connected(browser)
    await ask(browser, "compressor question")
    await card_when(browser, 0, ("done",), count=1)
    titles = "[...document.querySelectorAll('.conv-title')].map(e => e.textContent)"
    await browser.wait_for(f"JSON.stringify({titles}) === "
                           "'[\"compressor question\",\"pump question\"]'", 10)
    await browser.click(".conv:nth-child(2) [data-testid=rename]")
    await browser.evaluate("document.querySelector('input.rename').value = ''")
    await browser.type_into("input.rename", "Line 3 pump")
    await browser.send("Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter",
                       windowsVirtualKeyCode=13)
    await browser.wait_for(f"{titles}.includes('Line 3 pump')", 10)
    await browser.click(".conv:nth-child(2) .conv-open")
    history = await card_when(browser, 0, ("history",), count=1)
    assert history["question"] == "pump question"
    assert history["answer"] == "Close the discharge valve."
    await browser.wait_for("document.querySelector('[data-testid=conv-title]').textContent"
                           " === 'Line 3 pump'", 10)
    await browser.evaluate("window.confirm = () => true")
    await browser.click(".conv:nth-child(1) [data-testid=delete]")
    await browser.wait_for(f"JSON.stringify({titles}) === '[\"Line 3 pump\"]'", 10)


async def test_hints_while_typing_and_see_also_after_the_answer(app: App,
                                                              browser: Browser) -> None:
    app.engine.script("reset the pump", see_also=True)
    await open_page(browser, app.url, app.login)
    await browser.type_into(QUESTION, "reset the pump")
    hints = await browser.wait_for(
        "[...document.querySelectorAll('[data-testid=hints] li')].map(l => l.textContent)"
        ".join('|') || null", timeout=10)
    assert hints == "P-200 manual — Troubleshooting (reset the pump)", hints
    await browser.click(ASK)
    assert await browser.evaluate("document.querySelectorAll('[data-testid=hints] li').length") \
        == 0
    await card_when(browser, 0, ("done",))
    see_also = "document.querySelector('[data-testid=see-also] button')"
    assert await browser.evaluate(f"{see_also}.textContent") == \
        "P-200 manual — Maintenance intervals"
    await browser.click("[data-testid=see-also] button")
    assert await browser.evaluate(f"document.querySelector('{QUESTION}').value") == \
        "What does the P-200 manual say about Maintenance intervals?"
    assert app.engine.lookups[0] == "reset the pump"


async def connected(browser: Browser) -> None:
    await browser.wait_for("document.querySelector('[data-testid=conn]').dataset.state === 'up'",
                           timeout=30)
