"""/healthz, /readyz and /metrics: for systemd, load balancers and Prometheus.

- /healthz: the process answers (its event loop runs). Nothing else is checked, so a restart
  is never triggered by a full disk that a restart would not fix.
- /readyz: this appliance can answer now: models and index loaded, the store takes a write,
  the data disk is above its floor, and it is not shutting down. 503 with every failed check
  otherwise, so a load balancer sends questions elsewhere.
- /metrics: Prometheus text format (metrics.py). Access (`metrics.access`): `loopback` (the
  default) serves clients on this machine without a credential (a local scraper or agent, as
  node_exporter is run) and refuses every other; `token` serves any client with a valid
  credential (a Bearer token), loopback included, through the access layer like every other
  route. Counts only: no question, user, session or document name is in it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import keys
from .access import ACCESS, Forbidden
from .http_errors import error_response
from .requester import client_address
from .store import Store

STORE_PROBE_TIMEOUT_S = 2.0
STORE_PROBE_EVERY_S = 5.0  # a write probe is an fsync on an SD card: at most this often


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    checks = await _readiness(request.app)
    failed = {name: why for name, why in checks.items() if why != "ok"}
    if failed:
        return error_response(503, "not_ready", "; ".join(f"{k}: {v}" for k, v in failed.items()),
                              checks=checks)
    return web.json_response({"status": "ready", "checks": checks})


async def _readiness(app: web.Application) -> dict[str, str]:
    core = app[keys.CONVERSATIONS]
    engines = keys.LLM in app or keys.EMBEDDER in app  # the tests' scripted answers load neither
    models = keys.ANSWERS in app and (not engines or keys.LLM in app and keys.EMBEDDER in app)
    checks = {
        "models": "ok" if models else "not loaded",
        "index": "ok" if keys.LIBRARY in app or not engines else "not loaded",
        "store": await _store_probe(app),
        "disk": "ok",
        "server": "shutting down" if core.closing else "ok",
    }
    storage = core.storage()
    if not storage["ok"]:
        checks["disk"] = (f"{storage['free_mb']} MB free, under the floor of "
                          f"{storage['floor_mb']} MB")
    return checks


_PROBE = web.AppKey("store_probe", dict)


async def _store_probe(app: web.Application) -> str:
    """Whether the store takes a write: one small transaction through the one writer, with a
    deadline (a writer stuck behind a failing disk counts as not ready)."""
    cached = app[_PROBE]
    if time.monotonic() - cached.get("at", -STORE_PROBE_EVERY_S) < STORE_PROBE_EVERY_S:
        return cached["result"]

    def probe(db: Store) -> None:
        db.set_meta("ready_probe_at", f"{time.time():.0f}")

    try:
        await asyncio.wait_for(app[keys.STORE].write(probe), STORE_PROBE_TIMEOUT_S)
        result = "ok"
    except asyncio.TimeoutError:
        result = f"no write within {STORE_PROBE_TIMEOUT_S:.0f} s"
    except Exception as exc:  # noqa: BLE001 - any failure to write means not ready; say which
        result = f"write failed: {type(exc).__name__}: {exc}"
    cached.update(at=time.monotonic(), result=result)
    return result


async def metrics(request: web.Request) -> web.Response:
    app = request.app
    if app[keys.SETTINGS].metrics.access == "loopback" and not _is_loopback(request):
        raise Forbidden("/metrics is served to this machine only (metrics.access: loopback);"
                        " set metrics.access to token to serve it to signed-in clients")
    await _read_gauges(app)
    body = await asyncio.get_running_loop().run_in_executor(
        None, generate_latest, app[keys.METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _is_loopback(request: web.Request) -> bool:
    try:
        return ipaddress.ip_address(client_address(request)).is_loopback
    except ValueError:
        return False


async def _read_gauges(app: web.Application) -> None:
    metrics = app[keys.METRICS]
    metrics.connections.labels("ws").set(len(app[keys.CONNECTIONS]))
    for kind in ("sse", "openai"):
        metrics.connections.labels(kind).set(sum(1 for s in app[keys.STREAMS] if s.kind == kind))
    metrics.queue_waiting.set(app[keys.CONVERSATIONS].queue.waiting)
    library = app.get(keys.LIBRARY)
    if library is not None:
        metrics.index_vectors.set(sum(len(library.get(kb)) for kb in library.kbs()))

    def counts(db: Store) -> tuple[int, int]:
        docs = db.documents()
        return len(docs), sum(d.chunk_count for d in docs)

    documents, chunks = await app[keys.STORE].read(counts)
    metrics.documents.set(documents)
    metrics.chunks.set(chunks)


def setup_health(app: web.Application) -> None:
    app[_PROBE] = {}
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.on_startup.append(_metrics_access)


async def _metrics_access(app: web.Application) -> None:
    """on_startup, after security_context made the access layer (cleanup_ctx runs first)."""
    if app[keys.SETTINGS].metrics.access == "loopback":
        app[ACCESS].public_paths.add("/metrics")  # no credential; the handler checks loopback
