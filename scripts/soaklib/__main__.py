"""scripts/soak: the real server behind a bad link, many resuming clients, every seq checked.

The server runs in a network namespace of its own, reached from here only over a veth pair with
tbf bandwidth limits and random loss (badlink.py). Even-numbered clients talk to it straight
over that link; odd-numbered ones through the fault proxy of tests/faultproxy.py (on 127.0.0.1
here, latency plus random cuts of every connection), which itself dials over the bad link.
Prints a table (or one JSON object with --json); exit status 0 only when nothing was lost,
duplicated or failed. Everything it made is removed at the end, also on errors and signals.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

import serverproc  # scripts/ is on the path, as for .server

from .badlink import BadLink, bad_link
from .client import Stats, demo_questions, run_client
from .server import REPO, SERVER_PORT, Server, edgekb_env, prepare_data_dir

sys.path.insert(0, str(REPO / "tests"))
from faultproxy import FaultProxy  # a test helper, reused as is

PROXY_LATENCY_S = 0.08
PROXY_CUT_EVERY_S = (3.0, 10.0)
PROGRESS_EVERY_S = 10.0
WARMUP_SHARE = 0.5    # RSS "after warm-up" once every client had an answer, or by this share
READY_TIMEOUT_S = 300.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0,
                        help="seconds during which clients start questions (default 600)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--rate-kbit", type=int, default=256,
                        help="link bandwidth each way, kbit/s (default 256)")
    parser.add_argument("--loss-pct", type=float, default=5.0,
                        help="random packet loss each way, percent (default 5)")
    parser.add_argument("--drain", type=float, default=180.0,
                        help="seconds a request in flight at the end may still take (default 180)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra server setting, e.g. generation.threads=1 (repeatable)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: pid)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.drain < 0 or not 1 <= args.clients <= 100 or args.rate_kbit < 8 \
            or not 0 <= args.loss_pct < 100:
        parser.error("need --duration > 0, --drain >= 0, 1 <= --clients <= 100, --rate-kbit >= 8, "
                     "0 <= --loss-pct < 100")
    return args


def log(text: str) -> None:
    print(f"soak: {text}", file=sys.stderr, flush=True)


class _NamespaceLoop(asyncio.SelectorEventLoop):
    """tests/faultproxy.py dials its target on 127.0.0.1 only; this loop sends those dials
    to the server's address in the namespace instead. Nothing else is redirected."""

    def __init__(self) -> None:
        super().__init__()
        self.redirect: dict[tuple[str, int], str] = {}

    async def create_connection(self, protocol_factory: Any, host: Any = None,
                                port: Any = None, **kwargs: Any) -> Any:
        host = self.redirect.get((host, port), host)
        return await super().create_connection(protocol_factory, host, port, **kwargs)


async def _cut_at_random(proxy: FaultProxy, until: float, rng: random.Random) -> None:
    while time.monotonic() < until:
        await asyncio.sleep(rng.uniform(*PROXY_CUT_EVERY_S))
        proxy.cut()


async def soak(args: argparse.Namespace, server: Server, link: BadLink,
               seed: int, token: str) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, _NamespaceLoop)
    loop.redirect[("127.0.0.1", SERVER_PORT)] = link.ns_addr
    proxy = await FaultProxy(SERVER_PORT).start()
    if proxy.port == SERVER_PORT:  # the redirect would also catch the clients' dials
        await proxy.close()
        raise RuntimeError("the proxy got the server's port number: run again")
    proxy.latency_s = PROXY_LATENCY_S
    rng = random.Random(seed)
    questions = demo_questions()
    stats = Stats()
    rss: dict[str, float | None] = {"start": server.rss_mib(), "after_warmup": None}
    peak = rss["start"] or 0.0
    start = time.monotonic()
    stop_at = start + args.duration
    give_up_at = stop_at + args.drain
    warmup_s: float | None = None
    cutter = asyncio.create_task(_cut_at_random(proxy, stop_at, rng))
    clients = [asyncio.create_task(run_client(
        i, proxy.ws_url() if i % 2 else server.url, stop_at, give_up_at, stats, questions,
        rng.randrange(1 << 30), token)) for i in range(args.clients)]
    next_progress = start + PROGRESS_EVERY_S
    try:
        pending = set(clients)
        while pending and time.monotonic() < give_up_at + 30:  # clients stop by give_up_at
            _, pending = await asyncio.wait(pending, timeout=1.0)
            now = time.monotonic()
            current = server.rss_mib()
            peak = max(peak, current or 0.0)
            if warmup_s is None and (stats.completed >= args.clients
                                     or now >= start + args.duration * WARMUP_SHARE):
                rss["after_warmup"], warmup_s = current, round(now - start, 1)
            if now >= next_progress:
                next_progress += PROGRESS_EVERY_S
                log(f"t={now - start:.0f}s completed={stats.completed} resumes={stats.resumes} "
                    f"lost={stats.lost_events} dup={stats.duplicated_events} "
                    f"errors={sum(stats.errors.values())} rss={current} MiB")
        for task in clients:
            if not task.done():
                stats.errors["client:stuck"] += 1
        for task in clients:
            if task.done() and not task.cancelled() and task.exception() is not None:
                stats.errors[f"client:{type(task.exception()).__name__}"] += 1
    finally:
        for task in (*clients, cutter):
            task.cancel()
        await asyncio.gather(*clients, cutter, return_exceptions=True)
        await proxy.close()
    rss["end"] = server.rss_mib()
    elapsed = time.monotonic() - start
    return report(args, stats, rss, peak, warmup_s, proxy.cuts, elapsed, seed)


def report(args: argparse.Namespace, stats: Stats, rss: dict[str, float | None], peak: float,
           warmup_s: float | None, cuts: int, elapsed: float, seed: int) -> dict[str, Any]:
    warm, end = rss["after_warmup"], rss["end"]
    growth = round(end - warm, 1) if warm is not None and end is not None else None
    ok = (stats.completed > 0 and stats.lost_events == 0 and stats.duplicated_events == 0
          and stats.text_mismatches == 0 and not stats.errors)
    return {
        "ok": ok,
        "elapsed_s": round(elapsed, 1),
        "duration_s": args.duration,
        "clients": args.clients,
        "clients_via_proxy": args.clients // 2,
        "rate_kbit": args.rate_kbit,
        "loss_pct": args.loss_pct,
        "proxy_latency_ms": round(PROXY_LATENCY_S * 1000),
        "server_settings": args.set,
        "seed": seed,
        "requests_started": stats.started,
        "requests_completed": stats.completed,
        "resumes": stats.resumes,
        "reasks": stats.reasks,
        "client_drops": stats.client_drops,
        "proxy_cuts": cuts,
        "link_losses": stats.link_losses,
        "events": stats.events,
        "lost_events": stats.lost_events,
        "duplicated_events": stats.duplicated_events,
        "text_mismatches": stats.text_mismatches,
        "errors": dict(sorted(stats.errors.items())),
        "request_s": _spread(stats.request_s),
        "server_total_s": _spread(stats.server_total_s),
        "warmup_s": warmup_s,
        "rss_mib": {"start": rss["start"], "after_warmup": warm, "end": end, "peak": peak,
                    "growth_after_warmup": growth},
    }


def _spread(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    return {"p50": round(ordered[len(ordered) // 2], 1) if ordered else None,
            "max": round(ordered[-1], 1) if ordered else None}


def table(result: dict[str, Any]) -> str:
    rows: list[tuple[str, Any]] = []
    for key, value in result.items():
        if key == "rss_mib":
            rows += [(f"server RSS {name} (MiB)", v) for name, v in value.items()]
        elif key in ("request_s", "server_total_s"):
            rows += [(f"{key.replace('_', ' ')} {name}", v) for name, v in value.items()]
        elif key == "errors":
            rows += [(f"errors {code}", n) for code, n in value.items()] or [("errors", 0)]
        else:
            rows.append((key.replace("_", " "), value))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _terminate(signum: int, _frame: object) -> NoReturn:
    raise SystemExit(128 + signum)  # unwinds through every finally: cleanup still runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    tag = os.getpid()
    seed = tag if args.seed is None else args.seed
    env = edgekb_env()
    try:
        result = _run(args, tag, seed, env)
    except RuntimeError as exc:
        log(f"failed: {exc}")
        return 2
    except KeyboardInterrupt:
        log("interrupted")  # everything was already removed on the way out
        return 130
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0 if result["ok"] else 1


def _run(args: argparse.Namespace, tag: int, seed: int, env: dict[str, str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="edgekb-soak-") as tmp:
        data_dir = Path(tmp) / "data"
        log("ingesting the demo manuals")
        prepare_data_dir(data_dir, env)
        token = serverproc.issue_token(data_dir, env, sub="soak")
        with bad_link(tag, args.rate_kbit, args.loss_pct) as link:
            log(f"namespace {link.namespace}: server {link.ns_addr}, here {link.host_addr}, "
                f"{args.rate_kbit} kbit/s, {args.loss_pct}% loss each way")
            queue_cap = min(100, max(3, args.clients))
            server = Server(link, data_dir, Path(tmp) / "serve.log", env, [
                "generation.max_tokens=64", f"queue.max_per_user={queue_cap}",
                f"queue.max_waiting={max(16, args.clients)}", *serverproc.UNLIMITED,
                *args.set])
            try:
                server.wait_ready(READY_TIMEOUT_S)
                log(f"server ready (pid {server.process.pid}); {args.clients} clients for "
                    f"{args.duration:.0f} s")
                with asyncio.Runner(loop_factory=_NamespaceLoop) as runner:
                    result = runner.run(soak(args, server, link, seed, token))
            finally:
                code = server.stop()
                log(f"server stopped (exit status {code})")
    return result


if __name__ == "__main__":
    sys.exit(main())
