"""The web page in a real headless Chromium against the real server and the real default models,
directly or through a fault-injecting proxy (a link that cuts, refuses, or breaks a page load).

Deterministic page behaviour at chosen moments (held answers, a queue): test_page_scripted.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from faultproxy import FaultProxy
from pagelib import (  # noqa: F401
    ANSWERED,
    ASK,
    FINAL,
    Login,
    QUESTION,
    ask,
    browser,
    card_when,
    cards,
    connected,
    launch,
    open_page,
    page_login,
    rendered,
    screenshot,
    sign_in,
    watch_answers,
)

from browser import Browser
from conftest import DEMO_QUESTION, Server, edgekb_env, start_server

# Answers long enough to act on mid-answer (reload, cut, stop), short enough for a test suite.
MAX_TOKENS = 96
ANSWER_S = 300  # an answer's deadline on a loaded 2-core machine


ADMIN, ADMIN_PASSWORD = "page-admin", "torque-and-gauge"


@pytest.fixture(scope="module")
def page_server(demo_data_dir: Path, models_cache: Path) -> Iterator[Server]:
    env = edgekb_env(models_cache)
    added = subprocess.run([sys.executable, "-m", "edgekb", "users", "add", ADMIN, "--role",
                            "admin", "--password-stdin", "--data-dir", str(demo_data_dir)],
                           input=ADMIN_PASSWORD + "\n", env=env, capture_output=True, text=True,
                           timeout=60, check=False)
    assert added.returncode == 0, added.stderr
    # One answer at a time, so a second question visibly waits its turn (the Stop test).
    srv = start_server(demo_data_dir, env, "--set", f"generation.max_tokens={MAX_TOKENS}",
                       "--set", "generation.slots=1")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def admin(page_server: Server) -> Login:
    """An admin signed in on the page (through /api/login)."""
    return page_login(page_server.url, ADMIN, ADMIN_PASSWORD)


@pytest.fixture
async def proxy(page_server: Server) -> AsyncIterator[FaultProxy]:
    port = int(page_server.url.rsplit(":", 1)[1].strip("/"))
    p = await FaultProxy(port).start()
    yield p
    await p.close()


def proxied(proxy: FaultProxy) -> str:
    return f"http://127.0.0.1:{proxy.port}/"


def stored_turn(server: Server, request_id: str) -> tuple[str, list[int]]:
    """The answer as the server stored it, and its source numbers."""
    with contextlib.closing(sqlite3.connect(server.data_dir / "edgekb.db")) as db:
        row = db.execute("SELECT answer, sources FROM turns WHERE request_id=?",
                         (request_id,)).fetchone()
    assert row is not None, f"no turn {request_id}"
    return row[0], [s["n"] for s in json.loads(row[1])]


async def shows_stored_answer(tab: Browser, server: Server, card: dict[str, Any]) -> None:
    """The card shows exactly the stored answer: nothing lost, nothing twice."""
    answer, cited = stored_turn(server, card["id"])
    assert answer.strip(), card
    assert card["answer"] == await tab.evaluate(rendered(answer, cited)), card
    assert not card["error"], card


async def first_words(tab: Browser, index: int = -1, timeout: float = ANSWER_S) -> None:
    await tab.wait_for(f"(() => {{ const c = document.querySelectorAll('#cards > .card')"
                       f"[{index} < 0 ? document.querySelectorAll('#cards > .card').length"
                       f" + {index} : {index}]; return c && c.querySelector("
                       f"'[data-testid=answer]').textContent.length > 0; }})()", timeout)


async def test_on_a_phone_hints_come_while_typing_then_sources_then_streamed_tokens(
        browser: Browser, page_server: Server, admin: Login) -> None:
    await browser.viewport(390, 844, mobile=True)
    await open_page(browser, page_server.url, admin)
    welcome = await browser.wait_for(
        "(() => { const w = document.querySelector('[data-testid=welcome]');"
        " const ex = [...document.querySelectorAll('[data-testid=examples] button')];"
        " return !w.hidden && ex.length ? {text: w.innerText, examples: ex.map(b => b.textContent)}"
        " : null; })()", timeout=30)
    assert "default: 4 manuals" in welcome["text"]
    assert "P-200 Centrifugal Process Pump — Operation and Maintenance Manual" in welcome["text"]
    assert any("P-200" in q for q in welcome["examples"]), welcome
    await screenshot(browser, "empty", 390, 844)

    await browser.type_into(QUESTION, DEMO_QUESTION)
    hints = await browser.wait_for(
        "(() => { const h = document.querySelector('[data-testid=hints]');"
        f" return h.dataset.for === {json.dumps(DEMO_QUESTION)} && h.children.length ?"
        " h.innerText : null; })()", timeout=60)
    assert "P-200" in hints and "Overpressure trip" in hints, hints
    await screenshot(browser, "hints", 390, 844)
    await watch_answers(browser)
    await browser.click(ASK)
    card = await card_when(browser, -1, FINAL, timeout=ANSWER_S)
    assert card["stage"] in ANSWERED, card
    assert card["question"] == DEMO_QUESTION
    assert card["sources"] and "P-200" in card["sources"][0], card["sources"]
    seen = (await browser.evaluate("window.seenAnswers"))[card["id"]]
    assert (await browser.evaluate("window.atFirstSource"))[card["id"]] == "", \
        "answer text before the sources"
    assert len([s for s in seen if s]) >= 3, f"not streamed: {seen}"
    await shows_stored_answer(browser, page_server, card)
    meta = await browser.evaluate("document.querySelector('#cards > .card .meta').textContent")
    assert "sources found while you typed" in meta, meta  # the hint's retrieval was reused

    cite = await browser.evaluate("!!document.querySelector('#cards > .card a.cite')")
    if cite:  # the small model does not always cite; test_page_scripted.py always does
        await browser.click("#cards > .card a.cite")
        await browser.wait_for("!!document.querySelector('#cards > .card [data-testid=sources]"
                               " details[open]')", timeout=5)
    await screenshot(browser, "answer", 390, 844)
    await screenshot(browser, "answer", 1280, 900)
    await browser.send("Emulation.setEmulatedMedia",
                       features=[{"name": "prefers-color-scheme", "value": "dark"}])
    await screenshot(browser, "answer-dark", 390, 844)

    # 360 px wide: nothing sideways, the composer in reach, every control big enough to tap.
    await browser.viewport(360, 740, mobile=True)
    layout = await browser.evaluate("""(() => {
      const box = (s) => { const r = document.querySelector(s).getBoundingClientRect();
        return {right: r.right, bottom: r.bottom, width: r.width}; };
      const small = [...document.querySelectorAll('button, input, select, summary')]
        .filter(e => e.offsetParent !== null && e.getBoundingClientRect().height < 40)
        .map(e => e.outerHTML.slice(0, 80));
      return {width: document.documentElement.scrollWidth, ask: box('[data-testid=ask]'),
              input: box('[data-testid=question]'), small}; })()""")
    assert layout["width"] <= 360, layout
    assert layout["ask"]["right"] <= 360 and layout["ask"]["bottom"] <= 740, layout
    assert layout["input"]["width"] >= 180, layout
    assert layout["small"] == [], layout


async def test_a_link_cut_mid_answer_completes_without_repetition(
        browser: Browser, page_server: Server, admin: Login, proxy: FaultProxy) -> None:
    await open_page(browser, proxied(proxy), admin)
    await ask(browser, "What does the AC-75 compressor do when it overheats?")
    await first_words(browser)
    cuts_mid_answer = 0
    for _ in range(3):  # cut while it streams, each time once the page has resumed
        if (await cards(browser))[-1]["stage"] in FINAL:
            break
        proxy.cut()
        cuts_mid_answer += 1
        await browser.wait_for("document.querySelector('[data-testid=conn]').dataset.state"
                               " !== 'up'", timeout=10)
        await connected(browser, timeout=30)
        await asyncio.sleep(0.3)
    card = await card_when(browser, -1, FINAL, timeout=ANSWER_S)
    assert cuts_mid_answer >= 1 and card["stage"] in ANSWERED, card
    await shows_stored_answer(browser, page_server, card)
    assert len(await cards(browser)) == 1


async def test_a_reload_mid_answer_continues_and_a_second_tab_follows_it_live(
        browser: Browser, page_server: Server, admin: Login) -> None:
    await open_page(browser, page_server.url, admin)
    await ask(browser, "How do I replace the mechanical seal of the P-200?")
    await first_words(browser)
    second = await browser.new_tab()
    try:
        await second.navigate(page_server.url)
        await watch_answers(second)
        await connected(second)
        followed = await card_when(second, -1, ("generating", "following", *FINAL), timeout=30)
        assert followed["question"] == "How do I replace the mechanical seal of the P-200?"
        await browser.navigate(page_server.url)  # reload mid-answer
        await connected(browser)
        reloaded = await cards(browser)
        assert reloaded and reloaded[-1]["id"] == followed["id"], reloaded
        assert reloaded[-1]["stage"] not in ("history",), "the reload lost the live answer"
        mine = await card_when(browser, -1, FINAL, timeout=ANSWER_S, count=1)
        theirs = await card_when(second, -1, FINAL, timeout=ANSWER_S, count=1)
        assert mine["stage"] in ANSWERED and theirs["stage"] in ANSWERED, (mine, theirs)
        await shows_stored_answer(browser, page_server, mine)
        await shows_stored_answer(second, page_server, theirs)
        grew = [s for s in (await second.evaluate("window.seenAnswers"))[theirs["id"]] if s]
        assert len(grew) >= 2, f"the second tab did not follow live: {grew}"
    finally:
        await second.close()


async def test_a_page_load_cut_mid_transfer_recovers(tmp_path: Path, page_server: Server,
                                                     admin: Login, proxy: FaultProxy) -> None:
    async with aiohttp.ClientSession(headers=page_server.headers) as http:
        async with http.get(page_server.url) as response:
            index = len(await response.read()) + 250  # with its headers
    proxy.cut_after(index + 20_000)  # the scripts and style sheet are 70 KB together
    tab = await launch(tmp_path, "fresh")
    try:
        await sign_in(tab, proxied(proxy), admin)
        await tab.navigate(proxied(proxy))
        shown = await tab.wait_for("!document.getElementById('boot-fail').hidden || "
                                   "(window.edgekb && edgekb.ready ? 'started' : false)", 30)
        assert shown is True, "the cut page started as if whole"
        assert proxy.cuts == 1
        await connected(tab, timeout=60)  # the guard loaded the page again
        assert await tab.evaluate("performance.getEntriesByType('navigation')[0].type") == \
            "reload"
        assert await tab.evaluate(f"!document.querySelector('{ASK}').disabled")
    finally:
        await tab.close()


async def test_a_question_asked_offline_survives_a_reload_and_goes_when_the_link_returns(
        browser: Browser, page_server: Server, admin: Login, proxy: FaultProxy) -> None:
    await open_page(browser, proxied(proxy), admin)
    # The service worker keeps the page's shell: a reload without a link still opens it.
    assert await browser.evaluate("navigator.serviceWorker.ready.then(r => !!r.active)")
    proxy.go_down()
    await browser.wait_for("document.querySelector('[data-testid=conn]').textContent"
                           ".startsWith('Offline')", timeout=30)
    assert await browser.evaluate(f"document.querySelector('{ASK}').textContent") == "Ask later"
    question = "How often is the belt conveyor's take-up checked?"
    await ask(browser, question)
    waiting = await card_when(browser, -1, ("waiting",), timeout=10)
    assert "sent when the link returns" in waiting["status"]
    await browser.navigate(proxied(proxy))  # reload with the link down
    restored = await card_when(browser, -1, ("waiting",), timeout=30)
    assert restored["question"] == question and restored["id"] == waiting["id"]
    proxy.come_back()
    card = await card_when(browser, -1, FINAL, timeout=ANSWER_S, count=1)
    assert card["stage"] in ANSWERED, card
    await shows_stored_answer(browser, page_server, card)
    assert await browser.evaluate("localStorage.getItem('edgekb.pending')") == "{}"


async def test_stop_ends_its_own_card_while_the_next_question_waits_its_turn(
        browser: Browser, page_server: Server, admin: Login) -> None:
    first = "What are the lockout steps?"
    await open_page(browser, page_server.url + "?q=" + first.replace(" ", "%20"),
                    admin)
    await card_when(browser, 0, ("queued", "starting", "retrieving", "found", "reading",
                                 "generating", *FINAL), timeout=30)
    await ask(browser, "What does the PC-20 controller error E-204 mean?")
    waiting = await card_when(browser, 1, ("queued", *FINAL), timeout=30)
    assert "1 answer ahead" in waiting["status"] and "about" in waiting["status"], waiting
    await first_words(browser, 0)
    await browser.click("#cards > .card:nth-child(1) [data-testid=stop]")
    stopped = await card_when(browser, 0, FINAL, timeout=60)
    assert stopped["stage"] == "cancelled" and stopped["status"] == "Stopped", stopped
    second = await card_when(browser, 1, FINAL, timeout=ANSWER_S)
    assert second["stage"] in ANSWERED, second
    assert len(await cards(browser)) == 2  # ?q= asked once


async def test_an_admin_uploads_with_progress_reindexes_and_deletes(
        browser: Browser, page_server: Server, admin: Login, tmp_path: Path) -> None:
    manual = tmp_path / "zx9-gearbox.md"
    manual.write_text("# ZX-9 Gearbox\n\n## Oil change\n\nChange the ZX-9 gearbox oil every "
                      "900 operating hours with 4.5 L of ISO VG 220 gear oil.\n")
    await open_page(browser, page_server.url, admin)
    await browser.click("[data-testid=docs]")
    status = await browser.wait_for("(() => { const s = document.querySelector("
                                    "'[data-testid=admin-status]').textContent;"
                                    " return s.includes('connected') ? s : null; })()", 30)
    assert status.startswith("The model is ") and "Data disk:" in status, status
    await browser.evaluate("document.querySelector('[data-testid=upload] input[name=kb]')"
                           ".value = 'uploads'")
    await browser.set_files("[data-testid=upload-files]", [manual])
    await browser.click("[data-testid=upload-submit]")
    log = await browser.wait_for("(() => { const l = document.querySelector("
                                 "'[data-testid=upload-log]').innerText;"
                                 " return l.includes('Done') ? l : null; })()", 120)
    assert "added: zx9-gearbox.md (1 chunk)" in log and "Done: 1 added" in log, log
    kb = "document.querySelector('[data-testid=kb-list]')"
    await browser.wait_for(f"{kb}.innerText.includes('ZX-9 Gearbox')", 30)
    await browser.click("[aria-label='Reindex uploads']")
    reindexed = await browser.wait_for(f"(() => {{ const t = {kb}.innerText;"
                                       " return t.includes('Done') ? t : null; })()", 120)
    assert "updated: zx9-gearbox.md (1 chunk)" in reindexed, reindexed
    # Settled once its documents are listed again (a reindexed document has a new id).
    await browser.wait_for("!document.querySelector(\"[aria-label='Reindex uploads']\")"
                           ".disabled", 30)
    await browser.evaluate("window.confirm = () => true")
    await browser.click("[aria-label='Delete zx9-gearbox.md']")
    await browser.wait_for(f"!{kb}.innerText.includes('uploads')", 30)
    async with aiohttp.ClientSession(headers=page_server.headers) as http:
        async with http.get(page_server.url + "api/kbs") as response:
            names = [k["name"] for k in (await response.json())["kbs"]]
    assert names == ["default"]


async def test_stop_then_ask_again_answers(browser: Browser, page_server: Server,
                                           admin: Login) -> None:
    """Stop, then ask again: the stopped card stays stopped and the next question is answered
    (its answer not empty: the cancelled one does not poison the conversation)."""
    await open_page(browser, page_server.url, admin)
    await ask(browser, DEMO_QUESTION)
    await first_words(browser)
    await browser.click("#cards > .card:nth-child(1) [data-testid=stop]")
    stopped = await card_when(browser, 0, FINAL, timeout=60)
    assert stopped["stage"] == "cancelled" and stopped["status"] == "Stopped", stopped
    await ask(browser, "What does the AC-75 compressor do when it overheats?")
    card = await card_when(browser, 1, FINAL, timeout=ANSWER_S, count=2)
    assert card["stage"] in ANSWERED, card
    assert card["answer"].strip(), card
    await shows_stored_answer(browser, page_server, card)
    assert (await cards(browser))[0]["stage"] == "cancelled"


async def test_login_screen_signs_in_and_out(browser: Browser, page_server: Server,
                                             models_cache: Path) -> None:
    env = edgekb_env(models_cache)
    added = subprocess.run([sys.executable, "-m", "edgekb", "users", "add", "tech1",
                            "--password-stdin", "--data-dir", str(page_server.data_dir)],
                           input="wrench-and-gauge\n", env=env, capture_output=True, text=True,
                           timeout=60, check=False)
    assert added.returncode == 0, added.stderr
    await browser.navigate(page_server.url)
    await browser.wait_for("!document.querySelector('[data-testid=login]').hidden", timeout=30)
    assert await browser.evaluate("document.querySelector('#ask-form').hidden") is True
    await browser.type_into("[data-testid=login-name]", "tech1")
    await browser.type_into("[data-testid=login-password]", "not-the-password")
    await browser.click("[data-testid=login-submit]")
    await browser.wait_for("document.querySelector('#notice').textContent.includes('wrong')",
                           timeout=30)
    await browser.type_into("[data-testid=login-password]", "wrench-and-gauge")
    await browser.click("[data-testid=login-submit]")
    await connected(browser)
    # The token is in an HttpOnly cookie: the page's script cannot read it.
    assert "edgekb_token" not in await browser.evaluate("document.cookie")
    assert await browser.evaluate("document.querySelector('[data-testid=docs]').hidden"), \
        "a user who is no admin sees no documents panel"
    await ask(browser, DEMO_QUESTION)
    card = await card_when(browser, -1, FINAL, timeout=ANSWER_S)
    assert card["stage"] in ANSWERED, card
    await browser.click("[data-testid=logout]")
    await browser.wait_for("!document.querySelector('[data-testid=login]').hidden", timeout=30)
    await browser.navigate(page_server.url)  # a reload stays signed out
    await browser.wait_for("!document.querySelector('[data-testid=login]').hidden", timeout=30)
