"""What the web page needs of the server, in-process on the scripted answer engine: hints while
typing (never beside a decode), "see also" in the request log, a user's conversations over HTTP
(list, one with its running requests, rename, delete), unknown knowledge bases.

Millisecond tests of the timing-dependent logic; tests/test_web_page.py drives the real page
against the real server and models.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import pytest
from core_helpers import Core, Peer, start_core, text_of, until

from edgekb import sessions
from edgekb.store import Store


@pytest.fixture
async def core(aiohttp_client, tmp_path: Path) -> Core:  # type: ignore[no-untyped-def]
    return await start_core(aiohttp_client, tmp_path / "data", **{"sessions.grace_s": 5,
                                                                  "storage.min_free_mb": 0})


def rows(data_dir: Path, sql: str) -> list[tuple]:  # type: ignore[type-arg]
    with contextlib.closing(sqlite3.connect(data_dir / "edgekb.db")) as db:
        return db.execute(sql).fetchall()


async def hold_an_answer(core: Core, peer: Peer, request_id: str = "held") -> None:
    core.engine.script("held question", hold_after=1)
    await peer.send({"type": "ask", "id": request_id, "text": "held question"})
    await until(lambda: "held question" in core.engine.started)


async def no_frame_for(peer: Peer, seconds: float) -> None:
    with pytest.raises(asyncio.TimeoutError):
        frame = await peer.receive(timeout=seconds)
        raise AssertionError(f"unexpected frame: {frame}")


# --- typing and hints -------------------------------------------------------------------------

async def test_typing_gets_a_hint_naming_the_passages_before_the_question(core: Core) -> None:
    peer = await core.connect()
    await peer.send({"type": "typing", "text": "  reset the   pump after"})
    hint = await peer.next_of(None)
    assert hint["type"] == "hint" and hint["kind"] == "typing", hint
    assert hint["text"] == "reset the pump after"  # the text it answers, as compared
    assert hint["sources"][0]["title"] == "P-200 manual"
    assert "snippet" not in hint["sources"][0]  # a hint is small: titles and places only
    assert core.engine.lookups == ["reset the pump after"]


async def test_short_text_and_bad_typing_frames(core: Core) -> None:
    peer = await core.connect()
    await peer.send({"type": "typing", "text": "re"})
    await no_frame_for(peer, 0.2)
    await peer.send({"type": "typing", "text": 42})
    error = await peer.next_of(None)
    assert error["type"] == "error" and error["code"] == "invalid_field"
    assert error["field"] == "text"
    assert core.engine.lookups == []


async def test_typing_waits_while_an_answer_runs_and_the_latest_text_wins(core: Core) -> None:
    peer = await core.connect()
    await hold_an_answer(core, peer)
    for text in ("how do I", "how do I reset", "how do I reset the pump"):
        await peer.send({"type": "typing", "text": text})
    await asyncio.sleep(0.2)
    assert core.engine.lookups == [], "looked up while an answer was being written"
    core.engine.gate.set()
    frames = await peer.until_end("held")
    assert frames[-1]["type"] == "done"
    hint = await peer.next_of(None)
    assert hint["type"] == "hint" and hint["text"] == "how do I reset the pump"
    assert core.engine.lookups == ["how do I reset the pump"]  # one lookup, the latest text
    assert core.engine.overlaps == 0


async def test_a_question_waits_for_the_lookup_in_flight_never_decoding_beside_it(
        core: Core) -> None:
    core.engine.lookup_gate = asyncio.Event()
    peer = await core.connect()
    await peer.send({"type": "typing", "text": "pump overpressure"})
    await until(lambda: core.engine.lookups == ["pump overpressure"])
    await peer.send({"type": "ask", "id": "q", "text": "pump overpressure trip"})
    await asyncio.sleep(0.1)
    assert core.engine.started == [], "the answer started while a lookup ran"
    core.engine.lookup_gate.set()
    frames = await peer.until_end("q")
    assert frames[-1]["type"] == "done" and text_of(frames) == "Close the discharge valve."
    assert core.engine.overlaps == 0
    hint = await peer.next_of(None)
    assert hint["type"] == "hint" and hint["text"] == "pump overpressure"


async def test_see_also_is_part_of_the_request_log_and_replays(core: Core) -> None:
    core.engine.script("seal torque", see_also=True)
    peer = await core.connect()
    await peer.send({"type": "ask", "id": "s", "text": "seal torque"})
    frames = await peer.until_end("s")
    kinds = [f["type"] for f in frames]
    assert kinds[-2:] == ["hint", "done"], kinds
    assert frames[-2]["kind"] == "see_also" and frames[-2]["seq"] == frames[-1]["seq"] - 1
    await peer.send({"type": "resume", "id": "s", "after": 0})
    replayed = await peer.until_end("s")
    assert replayed == frames


# --- knowledge bases --------------------------------------------------------------------------

async def test_an_unknown_knowledge_base_is_not_found_and_nothing_is_stored(core: Core) -> None:
    peer = await core.connect()
    await peer.send({"type": "ask", "id": "k", "text": "anything", "kbs": ["line-9"]})
    error = await peer.next_of("k")
    assert error["type"] == "error" and error["code"] == "not_found", error
    assert "line-9" in error["message"] and "seq" not in error
    assert rows(core.data_dir, "SELECT id FROM requests") == []


async def test_examples_of_an_empty_appliance_are_empty(core: Core) -> None:
    response = await core.client.get("/api/examples")
    assert response.status == 200
    assert await response.json() == {"kbs": [], "questions": []}


# --- conversations over HTTP ------------------------------------------------------------------

async def test_the_conversation_list_names_each_by_its_first_question_newest_first(
        core: Core) -> None:
    first = await core.connect()
    await first.send({"type": "ask", "id": "a", "text": "How do I bleed the   hydraulic line?"})
    await first.until_end("a")
    second = await core.connect()
    await second.send({"type": "ask", "id": "b", "text": "x" * 200})
    await second.until_end("b")
    listing = await (await core.client.get("/api/sessions")).json()
    assert [s["id"] for s in listing["sessions"]] == [second.session, first.session]
    newest, older = listing["sessions"]
    assert older["title"] == "How do I bleed the hydraulic line?" and older["named"] is False
    assert len(newest["title"]) == 80 and newest["title"].endswith("…")
    assert older["turns"] == 1
    # A new question moves a conversation to the top.
    await first.send({"type": "ask", "id": "c", "text": "and the filter?"})
    await first.until_end("c")
    listing = await (await core.client.get("/api/sessions")).json()
    assert [s["id"] for s in listing["sessions"]] == [first.session, second.session]
    assert listing["sessions"][0]["turns"] == 2


async def test_rename_and_its_validation(core: Core) -> None:
    peer = await core.connect()
    await peer.send({"type": "ask", "id": "a", "text": "first question"})
    await peer.until_end("a")
    url = f"/api/sessions/{peer.session}"
    response = await core.client.patch(url, json={"title": "  Line 3\n pump\x00 "})
    assert response.status == 200
    assert (await response.json())["session"]["title"] == "Line 3 pump"
    listing = await (await core.client.get("/api/sessions")).json()
    assert listing["sessions"][0]["title"] == "Line 3 pump"
    assert listing["sessions"][0]["named"] is True
    too_long = await core.client.patch(url, json={"title": "t" * 121})
    assert too_long.status == 400
    assert (await too_long.json())["error"]["code"] == "invalid_field"
    not_json = await core.client.patch(url, data="title=x")
    assert not_json.status == 400
    reset = await core.client.patch(url, json={"title": ""})
    assert (await reset.json())["session"]["title"] == "first question"


async def test_someone_elses_or_an_unknown_conversation_is_not_found(core: Core) -> None:
    store = Store(core.data_dir / "edgekb.db")
    try:
        sessions.begin_request(store, "Othersession1", "someone-else", "r1", "theirs")
    finally:
        store.close()
    for method, path, body in (("GET", "/api/sessions/Othersession1", None),
                               ("PATCH", "/api/sessions/Othersession1", {"title": "mine"}),
                               ("DELETE", "/api/sessions/Othersession1", None),
                               ("GET", "/api/sessions/no-such-session", None),
                               ("DELETE", "/api/sessions/bad%0Aid", None)):
        response = await core.client.request(method, path, json=body)
        assert response.status == 404, (method, path, response.status)
        assert (await response.json())["error"]["code"] == "not_found"
    assert (await (await core.client.get("/api/sessions")).json()) == {"sessions": []}
    assert rows(core.data_dir, "SELECT title FROM sessions") == [(None,)]


async def test_a_running_request_is_listed_with_its_question_for_another_device(
        core: Core) -> None:
    peer = await core.connect()
    await hold_an_answer(core, peer)
    other = await core.connect(peer.session)
    assert [r["id"] for r in other.welcome["running"]] == ["held"]
    detail = await (await core.client.get(f"/api/sessions/{peer.session}")).json()
    assert detail["running"][0]["id"] == "held"
    assert detail["running"][0]["question"] == "held question"
    await other.send({"type": "resume", "id": "held", "after": 0})
    core.engine.gate.set()
    mine, theirs = await peer.until_end("held"), await other.until_end("held")
    assert mine == theirs and mine[-1]["type"] == "done"


async def test_deleting_a_conversation_stops_its_answer_and_forgets_everything(
        core: Core) -> None:
    peer = await core.connect()
    await peer.send({"type": "ask", "id": "done-one", "text": "kept until deleted"})
    await peer.until_end("done-one")
    await hold_an_answer(core, peer)
    response = await core.client.delete(f"/api/sessions/{peer.session}")
    assert response.status == 200 and (await response.json()) == {"deleted": peer.session}
    frames = await peer.until_end("held")
    assert frames[-1]["type"] == "done" and frames[-1]["finish"] == "cancelled"
    for table in ("sessions", "requests", "events", "turns"):
        assert rows(core.data_dir, f"SELECT count(*) FROM {table}") == [(0,)], table
    assert (await (await core.client.get("/api/sessions")).json()) == {"sessions": []}
    again = await core.connect(peer.session)
    assert again.welcome["resumed"] is False and again.session != peer.session
