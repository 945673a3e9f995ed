"""scripts/soak-retention: does the data dir stay flat under endless questions?

The real server on a loopback port with the demo manuals, retention capped at --max-mb (ages
off: only the size cap works) and a sweep every --sweep-s seconds; --clients clients ask the
demo questions one after another, a new session every few questions, for --duration seconds.
Every --sample-s seconds the data dir's size (all files, WAL included), the WAL's and the bytes
the conversation tables use are sampled. Prints a table, or one JSON object with --json.
--max-mb 0 is the baseline: no cap, the growth retention prevents.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import serverproc

QUESTIONS = ["How do I reset the pump after an overpressure trip?",
             "What pressure does the relief valve open at?",
             "How often should the seals be inspected?",
             "What does error E-204 mean?",
             "How do I calibrate the flow sensor?"]
QUESTIONS_PER_SESSION = 4
ANSWER_TIMEOUT_S = 300.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/soak-retention",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--max-mb", type=float, default=0.25,
                        help="retention.max_mb (0: no cap)")
    parser.add_argument("--sweep-s", type=float, default=15.0,
                        help="retention.sweep_interval_s")
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def edgekb_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKB_")}
    env["EDGEKB_MODELS__CACHE_DIR"] = os.environ.get(
        "EDGEKB_MODELS__CACHE_DIR", str(REPO / ".cache" / "models"))
    return env


def sample(data_dir: Path, started: float, answers: int) -> dict[str, Any]:
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    wal = data_dir / "edgekb.db-wal"
    conn = sqlite3.connect(f"{(data_dir / 'edgekb.db').as_uri()}?mode=ro", uri=True)
    try:
        used = conn.execute(
            "SELECT coalesce(sum(pgsize - unused), 0) FROM dbstat WHERE aggregate = TRUE AND name"
            " IN (SELECT name FROM sqlite_schema WHERE tbl_name IN"
            " ('sessions', 'requests', 'events', 'turns'))").fetchone()[0]
        turns = conn.execute("SELECT count(*) FROM turns").fetchone()[0]
    finally:
        conn.close()
    return {"t_s": round(time.monotonic() - started, 1), "answers": answers,
            "data_dir_kb": sum(p.stat().st_size for p in files) // 1024,
            "wal_kb": (wal.stat().st_size if wal.exists() else 0) // 1024,
            "conversations_kb": used // 1024, "turns_kept": turns}


async def client(url: str, token: str, number: int, until: float, counter: list[int]) -> None:
    asked = 0
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
        while time.monotonic() < until:
            async with http.ws_connect(url, protocols=("edgekb.v2",)) as ws:
                await ws.receive_json(timeout=30)  # welcome: a new session
                for _ in range(QUESTIONS_PER_SESSION):
                    if time.monotonic() >= until:
                        return
                    request = f"c{number}-{asked}"
                    await ws.send_json({"type": "ask", "id": request,
                                        "text": QUESTIONS[(asked + number) % len(QUESTIONS)]})
                    asked += 1
                    deadline = time.monotonic() + ANSWER_TIMEOUT_S
                    while time.monotonic() < deadline:
                        event = json.loads((await asyncio.wait_for(
                            ws.receive(), deadline - time.monotonic())).data)
                        if event.get("id") == request and event["type"] in ("done", "error"):
                            counter[0] += event["type"] == "done"
                            break


async def soak(args: argparse.Namespace, data_dir: Path, url: str, token: str
               ) -> list[dict[str, Any]]:
    started = time.monotonic()
    until = started + args.duration
    counter = [0]
    clients = [asyncio.create_task(client(url, token, n, until, counter))
               for n in range(args.clients)]
    samples = [sample(data_dir, started, 0)]
    while not all(task.done() for task in clients):
        await asyncio.wait(clients, timeout=args.sample_s)
        samples.append(sample(data_dir, started, counter[0]))
        if not args.json:
            print(samples[-1], file=sys.stderr, flush=True)
    for task in clients:
        task.result()  # a client that failed fails the soak
    return samples


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = edgekb_env()
    with tempfile.TemporaryDirectory(prefix="edgekb-retention-soak-") as tmp:
        data_dir = Path(tmp) / "data"
        subprocess.run([sys.executable, "-m", "edgekb", "ingest", "--demo", "--data-dir",
                        str(data_dir)], env=env, check=True, capture_output=True, timeout=900)
        log = Path(tmp) / "serve.log"
        settings = {"retention.max_mb": args.max_mb, "retention.sweep_interval_s": args.sweep_s,
                    "retention.sessions_days": 0, "retention.turns_days": 0,
                    "retention.request_logs_days": 0}
        sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
        # Auth is on, as shipped; the per-user question rate would only throttle the load.
        sets += [arg for item in serverproc.UNLIMITED for arg in ("--set", item)]
        token = serverproc.issue_token(data_dir, env)
        with log.open("w") as out:
            server = subprocess.Popen(
                [sys.executable, "-m", "edgekb", "--log-level", "INFO", "serve", "--data-dir",
                 str(data_dir), "--host", "127.0.0.1", "--port", "0", *sets],
                env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not (match := serverproc.READY.search(log.read_text())):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server not ready:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
            samples = asyncio.run(soak(args, data_dir, f"ws://127.0.0.1:{match[2]}/ws", token))
        finally:
            serverproc.stop(server)
        sweeps = len(re.findall(r"retention: deleted", log.read_text()))
    half = [s for s in samples if s["t_s"] >= args.duration / 2]
    report = {"max_mb": args.max_mb, "clients": args.clients, "duration_s": args.duration,
              "answers": samples[-1]["answers"], "sweeps_that_deleted": sweeps,
              "data_dir_kb": {"start": samples[0]["data_dir_kb"],
                              "second_half_min": min(s["data_dir_kb"] for s in half),
                              "second_half_max": max(s["data_dir_kb"] for s in half),
                              "max": max(s["data_dir_kb"] for s in samples),
                              "end": samples[-1]["data_dir_kb"]},
              "conversations_kb_max": max(s["conversations_kb"] for s in samples),
              "wal_kb_max": max(s["wal_kb"] for s in samples), "samples": samples}
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            if key != "samples":
                print(f"{key:>22}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
