"""The conversation core in-process, on a scripted answer engine: refusals, grace timers, turns
in prompts, event sizes, running requests in `welcome`, shutdown and restart, a full disk.

Millisecond tests of timing-dependent logic; the real-model end-to-end tests (test_protocol.py
and others) prove that the real parts fit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from core_helpers import Core, Peer, start_core, text_of, until

from edgekb import events


@pytest.fixture
async def core(aiohttp_client, tmp_path: Path) -> Core:  # type: ignore[no-untyped-def]
    return await start_core(aiohttp_client, tmp_path / "data", **{"sessions.grace_s": 5,
                                                                  "storage.min_free_mb": 0})


async def ask_until_held(peer: Peer, request_id: str) -> list[dict]:  # type: ignore[type-arg]
    """Ask the default script (held after two pieces); its frames up to the hold."""
    await peer.send({"type": "ask", "id": request_id, "text": "held"})
    seen = []
    for _ in range(20):
        seen.append(await peer.next_of(request_id))
        if seen[-1]["type"] == "delta" and text_of(seen) == "Close the":
            return seen
    raise AssertionError(f"not held where expected: {seen}")


def rows(data_dir: Path, sql: str) -> list[tuple]:  # type: ignore[type-arg]
    with contextlib.closing(sqlite3.connect(data_dir / "edgekb.db")) as db:
        return db.execute(sql).fetchall()


async def test_a_refused_question_leaves_no_trace_and_its_id_stays_free(aiohttp_client,
                                                                        tmp_path: Path) -> None:
    core = await start_core(aiohttp_client, tmp_path / "data", **{
        "queue.max_waiting": 1, "storage.min_free_mb": 0})
    core.engine.default.hold_after = 1
    peer = await core.connect()
    await peer.send({"type": "ask", "id": "a", "text": "first"})
    await peer.send({"type": "ask", "id": "b", "text": "second"})
    await until(lambda: core.engine.started == ["first"])
    await until(lambda: core.conversations.queue.waiting == 1)
    await peer.send({"type": "ask", "id": "c", "text": "third"})
    refusal = await peer.next_of("c")
    assert refusal["type"] == "error" and refusal["code"] == "busy", refusal
    assert "seq" not in refusal and refusal["retry_after"] > 0
    assert rows(core.data_dir, "SELECT id FROM requests ORDER BY id") == [("a",), ("b",)]
    core.engine.gate.set()
    await peer.until_end("a")
    await peer.until_end("b")
    await peer.send({"type": "ask", "id": "c", "text": "third"})
    answer = await peer.until_end("c")
    assert answer[-1]["type"] == "done" and answer[-1]["finish"] == "stop"
    turns = rows(core.data_dir, "SELECT request_id, finish FROM turns ORDER BY request_id")
    assert turns == [("a", "stop"), ("b", "stop"), ("c", "stop")]


async def test_only_answered_turns_reach_a_later_prompt(core: Core) -> None:
    core.engine.script("stopped one", hold_after=1)
    peer = await core.connect()
    await peer.send({"type": "ask", "id": "s", "text": "stopped one"})
    first = await peer.next_of("s")
    assert first["type"] == "queued"
    await until(lambda: "stopped one" in core.engine.started)
    await peer.send({"type": "cancel", "id": "s"})
    end = (await peer.until_end("s"))[-1]
    assert end["type"] == "done" and end["finish"] == "cancelled"
    await peer.send({"type": "ask", "id": "ok", "text": "answered one"})
    await peer.until_end("ok")
    await peer.send({"type": "ask", "id": "next", "text": "follow-up"})
    await peer.until_end("next")
    assert core.engine.histories["follow-up"] == ["answered one"], core.engine.histories
    # The stopped turn is still in the conversation's history, with how it ended.
    await peer.send({"type": "history"})
    history = await peer.next_of(None)
    assert [(t["id"], t["finish"]) for t in history["turns"]] == [
        ("s", "cancelled"), ("ok", "stop"), ("next", "stop")]


async def test_a_returning_follower_restarts_the_grace_time(aiohttp_client,
                                                           tmp_path: Path) -> None:
    core = await start_core(aiohttp_client, tmp_path / "data", **{
        "sessions.grace_s": 0.6, "storage.min_free_mb": 0})
    core.engine.default.hold_after = 1
    peer = await core.connect()
    await peer.send({"type": "ask", "id": "r", "text": "held"})
    await until(lambda: core.engine.started == ["held"])
    await peer.close()                      # t=0: nobody follows; a timer starts
    await asyncio.sleep(0.3)
    back = await core.connect(peer.session)  # t=0.3: followed again
    await back.send({"type": "resume", "id": "r", "after": 0})
    await back.next_of("r")
    await back.close()                      # t=0.35: gone again; the first timer must not count
    await asyncio.sleep(0.45)               # t=0.8: past the first timer, inside the second
    run = core.conversations.live[(peer.session, "r")]
    assert not run.finished, "the first grace timer cancelled an answer someone had followed"
    await until(lambda: run.finished, timeout=3)
    final = json.loads(run.frames[-1])
    assert final["type"] == "done" and final["finish"] == "cancelled"


async def test_every_request_event_fits_the_size_bound(core: Core) -> None:
    long_id = "x" * 64
    core.engine.script("long", sources=4, snippet="压力" * 400 + ' "quoted"\n' * 40,
                       pieces=["word " * 300, "液压" * 500, "\\" * 700])
    peer = await core.connect()
    await peer.send({"type": "ask", "id": long_id, "text": "long"})
    frames = await peer.until_end(long_id)  # Peer.receive checks each frame against the bound
    assert sum(f["type"] == "source" for f in frames) == 4
    text = text_of(frames)
    assert text == "word " * 300 + "液压" * 500 + "\\" * 700, "split deltas lost characters"
    done = frames[-1]
    assert done["chars"] == len(text) and done["sha256"] == events.text_digest(text)
    assert "text" not in done


async def test_welcome_names_running_requests_so_a_new_page_can_follow(core: Core) -> None:
    core.engine.default.hold_after = 2
    peer = await core.connect()
    await peer.send({"type": "ask", "id": "live", "text": "held"})
    await until(lambda: core.engine.started == ["held"])
    await asyncio.sleep(0.05)
    reloaded = await core.connect(peer.session)
    assert reloaded.welcome["resumed"] is True
    running = reloaded.welcome["running"]
    assert [r["id"] for r in running] == ["live"] and running[0]["seq"] >= 1
    await reloaded.send({"type": "resume", "id": "live", "after": 0})
    core.engine.gate.set()
    mine = await reloaded.until_end("live")
    theirs = await peer.until_end("live")
    assert [f["seq"] for f in mine] == list(range(1, len(mine) + 1))
    assert text_of(mine) == text_of(theirs) == "Close the discharge valve."


async def test_session_ids_are_issued_by_the_server(core: Core) -> None:
    chosen = await core.connect("AAAAAAAAAAAA")
    assert chosen.session != "AAAAAAAAAAAA" and chosen.welcome["resumed"] is False
    await chosen.send({"type": "hello", "session": "AAAAAAAA\n"})
    refusal = await chosen.next_of(None)
    assert refusal["type"] == "error" and refusal["code"] == "invalid_field"
    await chosen.send({"type": "ask", "id": "q1", "text": "anything"})
    await chosen.until_end("q1")
    again = await core.connect(chosen.session)
    assert again.session == chosen.session and again.welcome["resumed"] is True


async def test_json_nested_too_deep_is_bad_json(core: Core) -> None:
    peer = await core.connect()
    await peer.ws.send_str("[" * 5000 + "]" * 5000)
    error = await peer.next_of(None)
    assert error["type"] == "error" and error["code"] == "bad_json"
    await peer.send({"type": "ping"})
    assert (await peer.next_of(None))["type"] == "pong"


async def test_http_errors_have_one_json_body(core: Core) -> None:
    cases = [("GET", "/no/such/page", 404, "not_found"),
             ("PUT", "/api/kbs", 405, "method_not_allowed"),
             ("DELETE", "/api/kbs/default/documents/" + "9" * 30, 404, "not_found"),
             ("GET", "/api/kbs/Bad%0A/documents", 400, "invalid_kb"),
             ("POST", "/api/kbs/default/reindex", 404, "not_found"),
             ("POST", "/api/kbs/default/documents", 503, "unavailable")]
    for method, path, status, code in cases:
        response = await core.client.request(method, path)
        body = await response.json()
        assert (response.status, body["error"]["code"]) == (status, code), (path, body)
        assert body["error"]["message"]


async def test_below_the_disk_floor_questions_are_refused_and_status_says_so(
        aiohttp_client, tmp_path: Path) -> None:
    core = await start_core(aiohttp_client, tmp_path / "data", **{
        "storage.min_free_mb": 1 << 20})  # a terabyte: more than this disk has
    peer = await core.connect()
    await peer.send({"type": "ask", "id": "q", "text": "anything"})
    refusal = await peer.next_of("q")
    assert refusal["code"] == "disk_full" and "seq" not in refusal
    status = await (await core.client.get("/api/status")).json()
    assert status["storage"]["ok"] is False and status["storage"]["floor_mb"] == 1 << 20
    assert rows(core.data_dir, "SELECT count(*) FROM requests") == [(0,)]


async def test_shutdown_interrupts_and_the_restarted_server_resumes_exactly(
        aiohttp_client, tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = await start_core(aiohttp_client, data, **{"storage.min_free_mb": 0})
    first.engine.default.hold_after = 2
    peer = await first.connect()
    seen = await ask_until_held(peer, "r")
    await first.client.close()  # graceful shutdown: the answer ends `interrupted`
    second = await start_core(aiohttp_client, data, **{"storage.min_free_mb": 0})
    again = await second.connect(peer.session)
    await again.send({"type": "resume", "id": "r", "after": seen[-1]["seq"]})
    rest = await again.until_end("r")
    assert rest[0]["seq"] == seen[-1]["seq"] + 1, "an event was lost or repeated over the restart"
    assert rest[-1]["code"] == "interrupted" and rest[-1]["chars"] == len(text_of(seen + rest))


async def test_resumes_racing_the_writer_never_repeat_or_lose_an_event(core: Core) -> None:
    core.engine.script("long", pieces=[f"w{i} " for i in range(400)])
    peer = await core.connect()
    await peer.send({"type": "ask", "id": "r", "text": "long"})
    assert (await peer.next_of("r"))["type"] == "queued"  # the server has the question
    got: list[dict] = []  # type: ignore[type-arg]
    for _ in range(200):  # resume again and again while the answer is being written
        other = await core.connect(peer.session)
        await other.send({"type": "resume", "id": "r", "after": got[-1]["seq"] if got else 0})
        for _ in range(3):
            frame = await other.next_of("r")
            assert frame["seq"] == (got[-1]["seq"] if got else 0) + 1
            got.append(frame)
            if frame["type"] == "done":
                break
        await other.close()
        if got[-1]["type"] == "done":
            break
    assert got[-1]["type"] == "done"
    assert text_of(got) == "".join(f"w{i} " for i in range(400))


# --- a real full filesystem ------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MB tmpfs: a real filesystem that fills up (needs root, as CI has)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave_bytes: int = 0) -> Path:
    """Fill the filesystem until at most ``leave_bytes`` are free (bounded by its size)."""
    filler = disk / "filler"
    block = b"\0" * 65536
    with filler.open("wb") as out:
        for _ in range(16 * 16 + 1):
            if os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize <= leave_bytes + len(block):
                break
            out.write(block)
            out.flush()
        with contextlib.suppress(OSError):
            for _ in range(64):
                out.write(b"\0" * 4096)
                out.flush()
                if os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize <= leave_bytes:
                    break
    return filler


async def test_a_write_failure_on_a_full_disk_ends_the_answer_typed_and_releases_nothing_unsaved(
        aiohttp_client, small_disk: Path) -> None:
    data = small_disk / "data"
    first = await start_core(aiohttp_client, data, **{"storage.min_free_mb": 0})
    first.engine.default.hold_after = 2
    peer = await first.connect()
    seen = await ask_until_held(peer, "r")
    filler = fill(small_disk)
    first.engine.gate.set()
    rest = await peer.until_end("r")
    end = rest[-1]
    assert end["type"] == "error" and end["code"] == "storage_error", end
    assert "seq" not in end, "an event that could not be stored got a seq"
    released = [f for f in rest[:-1]]
    assert all(f["seq"] == seen[-1]["seq"] + 1 + i for i, f in enumerate(released))
    assert text_of(seen + released) + end["text"] == "Close the discharge valve."
    # A new question on the full disk gets a typed error too, not silence.
    await peer.send({"type": "ask", "id": "r2", "text": "another"})
    refusal = await peer.next_of("r2")
    assert refusal["type"] == "error" and refusal["code"] == "storage_error"
    filler.unlink()
    await first.client.close()
    second = await start_core(aiohttp_client, data, **{"storage.min_free_mb": 0})
    again = await second.connect(peer.session)
    last = (released or seen)[-1]["seq"]
    await again.send({"type": "resume", "id": "r", "after": last})
    after = await again.until_end("r")
    assert [f["seq"] for f in after] == [last + 1], "the restarted log disagrees with the client"
    assert after[0]["code"] == "interrupted"


async def test_the_disk_floor_refuses_questions_before_writes_fail(aiohttp_client,
                                                                    small_disk: Path) -> None:
    core = await start_core(aiohttp_client, small_disk / "data", **{"storage.min_free_mb": 8})
    peer = await core.connect()
    await peer.send({"type": "ask", "id": "ok", "text": "room enough"})
    assert (await peer.until_end("ok"))[-1]["type"] == "done"
    fill(small_disk, leave_bytes=4 * 2**20)
    await asyncio.sleep(1.1)  # free space is read at most once a second
    await peer.send({"type": "ask", "id": "no", "text": "no room"})
    refusal = await peer.next_of("no")
    assert refusal["code"] == "disk_full" and "seq" not in refusal
    status = await (await core.client.get("/api/status")).json()
    assert status["storage"]["ok"] is False


async def test_a_connection_closed_for_its_rate_gets_its_close_frame_at_once(
        aiohttp_client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The server ends a hammering client (4029) while its writer is busy sending the refusals
    and followers of cancelled requests are still attached: the close frame comes at once, not
    when the client gives up."""
    core = await start_core(aiohttp_client, tmp_path / "data", **{
        "limits.questions_per_minute": 20, "storage.min_free_mb": 0})
    core.engine.script("hammer", hold_after=1)  # answers stay open until cancelled
    peer = await core.connect()
    for n in range(24):
        await peer.send({"type": "ask", "id": f"q{n}", "text": "hammer"})
    refused: set[str] = set()
    for _ in range(200):
        if {f"q{n}" for n in range(20, 24)} <= refused:
            break
        frame = await peer.receive()
        if frame["type"] == "error" and "seq" not in frame:
            assert frame["code"] in ("busy", "rate_limited"), frame
            refused.add(frame["id"])
    for n in range(24):
        await peer.send({"type": "cancel", "id": f"q{n}"})
    for n in range(24, 40):
        await peer.send({"type": "ask", "id": f"q{n}", "text": "hammer"})
    for _ in range(500):  # the frames still queued for it, then the close
        msg = await asyncio.wait_for(peer.ws.receive(), 5)
        if msg.type != aiohttp.WSMsgType.TEXT:
            break
    assert msg.type == aiohttp.WSMsgType.CLOSE and peer.ws.close_code == 4029, msg


async def test_idle_time_counts_from_the_end_of_the_last_answer(aiohttp_client,
                                                                tmp_path: Path) -> None:
    """An answer that takes longer than the idle timeout: all of it arrives, and the
    connection lives on for the idle time after it ends before closing with 4008."""
    core = await start_core(aiohttp_client, tmp_path / "data", **{
        "server.idle_timeout_s": 0.6, "server.heartbeat_s": 30, "server.pong_timeout_s": 0.4,
        "storage.min_free_mb": 0})  # the sweeper looks every 0.1 s; no pings meanwhile
    core.engine.default.hold_after = 1
    peer = await core.connect()
    await peer.send({"type": "ask", "id": "slow", "text": "held"})
    await until(lambda: core.engine.started == ["held"])
    await asyncio.sleep(1.0)  # longer than the idle timeout, with no frame from the client
    core.engine.gate.set()
    frames = await peer.until_end("slow")
    ended = time.monotonic()
    assert frames[-1]["type"] == "done" and text_of(frames) == "Close the discharge valve."
    msg = await asyncio.wait_for(peer.ws.receive(), 5)
    assert msg.type == aiohttp.WSMsgType.CLOSE and peer.ws.close_code == 4008, msg
    assert time.monotonic() - ended > 0.45, "closed as idle right after a long answer"
