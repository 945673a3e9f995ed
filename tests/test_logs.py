"""Log lines as an operator reads them: one line per event, human or JSON, with the connection
and request ids; syslog priorities for the journal; a log file rotated by size."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from conftest import DEMO_QUESTION, collect, edgekb_env, receive_json, start_server

SNIPPET = """
import logging, sys
from edgekb import logs
logs.setup("INFO", sys.argv[1])
token = logs.connection_id.set("c7")
logs.request_id.set("S1/r1")
log = logging.getLogger("edgekb.test")
log.warning("disk %s", "low")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("request failed")
logs.connection_id.reset(token)
log.info("no connection here")
"""


def run_snippet(fmt: str, tmp_path: Path, journal: bool = False) -> list[str]:
    """Run the snippet with stderr to a file; with ``journal``, tell it (as systemd does
    through $JOURNAL_STREAM) that this file is the journal's stream."""
    err = tmp_path / f"stderr-{fmt}-{journal}"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with err.open("w") as out:
        if journal:
            st = os.fstat(out.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run([sys.executable, "-c", SNIPPET, fmt], env=env, stderr=out, check=True,
                       timeout=60)
    return err.read_text().splitlines()


def test_human_lines_carry_the_ids_and_keep_a_traceback_on_one_line(tmp_path: Path) -> None:
    lines = run_snippet("human", tmp_path)
    assert len(lines) == 3  # three events, three lines
    assert lines[0].endswith("WARNING edgekb.test conn=c7 req=S1/r1: disk low")
    assert lines[0][:4].isdigit()  # a timestamp first
    assert "ERROR edgekb.test conn=c7 req=S1/r1: request failed | Traceback" in lines[1]
    assert "ZeroDivisionError" in lines[1]
    assert lines[2].endswith("INFO edgekb.test req=S1/r1: no connection here")


def test_json_lines_are_objects_with_the_ids(tmp_path: Path) -> None:
    records = [json.loads(line) for line in run_snippet("json", tmp_path)]
    assert [r["msg"] for r in records] == ["disk low", "request failed", "no connection here"]
    assert records[0]["level"] == "WARNING" and records[0]["logger"] == "edgekb.test"
    assert records[0]["conn"] == "c7" and records[0]["req"] == "S1/r1"
    assert "ZeroDivisionError" in records[1]["exc"]
    assert records[2]["conn"] is None and isinstance(records[2]["ts"], float)


def test_under_the_journal_lines_start_with_the_syslog_priority(tmp_path: Path) -> None:
    lines = run_snippet("human", tmp_path, journal=True)
    assert lines[0] == "<4>WARNING edgekb.test conn=c7 req=S1/r1: disk low"  # no timestamp
    assert lines[1].startswith("<3>ERROR")
    assert lines[2].startswith("<6>INFO")
    record = json.loads(run_snippet("json", tmp_path, journal=True)[0].removeprefix("<4>"))
    assert record["msg"] == "disk low"


def test_the_log_file_is_rotated_by_size(tmp_path: Path) -> None:
    path = tmp_path / "log" / "edgekb.log"
    writer = ("import logging, sys\nfrom pathlib import Path\nfrom edgekb import logs\n"
              "logs.setup('INFO', 'json', Path(sys.argv[1]), file_max_mb=1, file_backups=2)\n"
              "for n in range(8000):\n"  # about 3.5 MB of lines
              "    logging.getLogger('edgekb.rotation').info('line %d %s', n, 'x' * 400)\n")
    subprocess.run([sys.executable, "-c", writer, str(path)], check=True, timeout=120,
                   stderr=subprocess.DEVNULL)
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["edgekb.log", "edgekb.log.1", "edgekb.log.2"]
    assert all(p.stat().st_size <= 1024 * 1024 for p in path.parent.iterdir())
    last = json.loads(path.read_text().splitlines()[-1])
    assert last["msg"].startswith("line 7999 ")


@pytest.fixture
def json_server(tmp_path: Path, models_cache: Path, demo_data_dir: Path):  # type: ignore[no-untyped-def]
    copy = tmp_path / "data"
    subprocess.run(["cp", "-a", str(demo_data_dir), str(copy)], check=True)
    env = edgekb_env(models_cache, EDGEKB_LOGGING__LEVEL="INFO", EDGEKB_GENERATION__THREADS="1")
    server = start_server(copy, env, "--log-format", "json", "--set", "generation.max_tokens=24")
    yield server
    server.stop()


async def test_a_real_server_logs_json_lines_with_connection_and_request_ids(
        json_server) -> None:  # type: ignore[no-untyped-def]
    async with aiohttp.ClientSession(headers=json_server.headers) as http, http.ws_connect(
            json_server.ws_url, protocols=("edgekb.v2",)) as ws:
        welcome = await receive_json(ws)
        await ws.send_json({"type": "ask", "id": "q1", "text": DEMO_QUESTION})
        events = await collect(ws, "q1")
        assert events[-1]["type"] == "done"
    await asyncio.sleep(0.5)
    json_server.stop()
    records = [json.loads(line) for line in json_server.log.read_text().splitlines()
               if line.startswith("{")]
    connected = [r for r in records if r["msg"].startswith("connection from")]
    ended = [r for r in records if r["msg"].startswith("request done")]
    assert len(connected) == 1 and len(ended) == 1, records
    assert connected[0]["conn"] and ended[0]["conn"] == connected[0]["conn"]
    assert ended[0]["req"] == f"{welcome['session']}/q1"
