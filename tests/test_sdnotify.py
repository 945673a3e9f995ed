"""systemd's notify protocol through a real Unix datagram socket: STATUS while starting, READY
only once the models and the index are loaded, WATCHDOG keep-alives from the event loop, and
none while the loop is stalled on purpose (systemd would then restart the service)."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import READY, edgekb_env
from notifysocket import NotifySocket

from edgekb.sdnotify import Notifier, Watchdog, watchdog_interval_s


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> NotifySocket:
    sock = NotifySocket(abstract=f"edgekb-test-{os.getpid()}-{time.monotonic_ns()}") \
        if request.param == "abstract" else NotifySocket(tmp_path / "notify")
    yield sock
    sock.close()


def test_messages_reach_the_socket_and_the_variable_is_taken(notify_socket: NotifySocket
                                                             ) -> None:
    env = notify_socket.env()
    notifier = Notifier.from_env(env)
    assert "NOTIFY_SOCKET" not in env  # a child process cannot speak for the service
    notifier.status("loading   the\nLLM")
    notifier.ready("serving on http://127.0.0.1:8080/")
    notifier.stopping("shutting down")
    notifier.close()
    got = [m.fields for m in notify_socket.drain(wait_s=2)]
    assert got[0] == {"STATUS": "loading the LLM"}  # one line, whatever the text held
    assert got[1]["READY"] == "1" and got[1]["MAINPID"] == str(os.getpid())
    assert got[1]["STATUS"] == "serving on http://127.0.0.1:8080/"
    assert got[2] == {"STOPPING": "1", "STATUS": "shutting down"}


def test_outside_systemd_nothing_is_sent() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled and not notifier.send("READY=1")
    assert watchdog_interval_s({}) is None


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_this_pid() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000",
                                "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}) is None


async def test_a_stalled_loop_stops_the_keepalives_a_busy_thread_does_not_keep_them(
        notify_socket: NotifySocket) -> None:
    notifier = Notifier(notify_socket.address)
    watchdog = Watchdog(notifier, interval_s=0.05)
    stop_thread = threading.Event()
    # Like the LLM worker: a thread that keeps running while the loop is stuck.
    busy = threading.Thread(target=lambda: stop_thread.wait(5))
    busy.start()
    watchdog.start()
    try:
        await asyncio.sleep(0.5)
        stalled_from = time.time()
        time.sleep(1.0)  # noqa: ASYNC251 (the point: the loop is stuck, no callback runs)
        stalled_to = time.time()
        await asyncio.sleep(0.5)
    finally:
        watchdog.stop()
        notifier.close()
        stop_thread.set()
        busy.join()
    beats = notify_socket.keepalives()
    before = [t for t in beats if t < stalled_from]
    during = [t for t in beats if stalled_from + 0.02 < t < stalled_to]
    after = [t for t in beats if t >= stalled_to]
    assert len(before) >= 3, beats
    assert during == [], "a keep-alive was sent while the event loop was stuck"
    assert after and after[0] - before[-1] >= 0.95


def test_the_real_server_reports_start_up_then_ready_and_pings_until_its_loop_stalls(
        tmp_path: Path, models_cache: Path, demo_data_dir: Path) -> None:
    """`edgekb serve` under a notify socket; SIGUSR1 makes the test's wrapper sleep on the
    event loop thread, as a handler stuck in blocking code would."""
    sock = NotifySocket(tmp_path / "notify")
    env = edgekb_env(models_cache, **sock.env(WATCHDOG_USEC="1000000"))  # keep-alive / 0.5 s
    wrapper = ("import signal, sys, time\n"
               "signal.signal(signal.SIGUSR1, lambda *_: time.sleep(4))\n"
               "from edgekb.cli import main\n"
               "sys.exit(main(sys.argv[1:]))\n")
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", wrapper, "serve", "--data-dir", str(demo_data_dir),
             "--host", "127.0.0.1", "--port", "0"], env=env, stdout=out,
            stderr=subprocess.STDOUT)
    try:
        ready = sock.wait_for("READY", timeout_s=180)
        match = READY.search(log.read_text())
        assert match, "READY=1 came before the server said it was ready"
        # Ready means answering: the HTTP side is up at that moment.
        with urllib.request.urlopen(f"http://127.0.0.1:{match[3]}/healthz", timeout=10) as r:
            assert r.status == 200
        statuses = [m.fields["STATUS"] for m in sock.messages if "STATUS" in m]
        loading = [s for s in statuses if "loading" in s]
        assert any("LLM" in s for s in loading) and any("index" in s for s in loading)
        assert statuses[-1].startswith("serving on http://127.0.0.1:")
        assert ready.fields["MAINPID"] == str(process.pid)
        beats = [m.at for m in sock.messages if "WATCHDOG" in m]
        assert beats and beats[0] < ready.at  # pinging while the models loaded

        time.sleep(2)
        stalled_from = time.time()
        process.send_signal(signal.SIGUSR1)
        time.sleep(6)
        beats = sock.keepalives()
        pairs = [(a, b) for a, b in itertools.pairwise(beats) if a > ready.at]
        regular = [b - a for a, b in pairs if b < stalled_from]
        assert regular and max(regular) < 1.5, regular
        assert max(b - a for a, b in pairs) >= 3.5, "keep-alives went on while the loop slept"
        assert beats[-1] > stalled_from + 4  # and they resumed with the loop

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert "STOPPING" in sock.wait_for("STOPPING", timeout_s=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        sock.close()
