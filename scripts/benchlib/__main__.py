"""scripts/bench [--quick] [--json-only] [--out FILE]: every benchmark, one JSON document.

Figures are ratios against the raw library measured in the same run wherever there is one (the
machine is noisy, ratios travel); each figure has a note saying what it compares and how many
runs. A benchmark that fails leaves its figures null, its error under "errors", and the exit
status 1; the others still run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import common, index, ingest, memory_profile, retrieval_eval, serving
from .common import Sheet, log, raise_nofile

# Targets from the issues; the table marks each figure against its aim.
AIMS: dict[str, tuple[str, float]] = {
    "stream_ratio": (">=", 0.97),
    "queue_position_ms_max": ("<", 100),
    "wire_bytes_ratio": ("<=", 0.15),
    "wire_bytes_ratio_compressed": ("<=", 0.15),
    "wire_bytes_ratio_sse": ("<=", 0.15),
    "embed_ratio": (">=", 0.9),
    # issue 14: the 1 GB board and several technicians at once
    "rss_startup_mb_1gb": ("<=", 450),
    "rss_peak_answer_mb_1gb": ("<=", 550),
    "ttft_overhead_ms": ("<=", 30),
    "prompt_read_ratio": (">=", 0.95),
    "followup_ttft_ratio": ("<=", 0.5),
    "stream_ratio_100_followers": (">=", 0.95),
    "loop_lag_p99_ms": ("<=", 10),
    "batch_throughput_ratio_4": (">=", 1.8),
    "batch_identical_answers": (">=", 1.0),
}
# Thousands of client sockets here, as many in the servers, which inherit this limit.
CLIENT_NOFILE = 12_000
# Figures each step owns: a step that fails leaves them null rather than absent.
EXPECTED = {
    "index": ("query_p50_ms_10k", "query_p99_ms_10k", "recall_at_5_10k",
              "query_p99_ms_embed_10k"),
    "ingest": ("embed_ratio", "embed_ratio_min", "rss_peak_ingest_mb"),
    "retrieval": ("hit_at_3_hybrid", "hit_at_3_vector", "hit_at_3_keyword"),
    "serving": ("stream_ratio", "ttft_overhead_ms", "prompt_read_ratio", "followup_ttft_ratio",
                "queue_position_ms_max", "wire_bytes_ratio", "wire_bytes_ratio_compressed",
                "wire_bytes_ratio_sse",
                "rss_per_idle_conn_kb", "loop_lag_p99_ms", "stream_ratio_100_followers_paired",
                "fanout_event_loop_cores",
                "fanout_bench_client_cores", "rss_startup_mb", "startup_s",
                "rss_peak_answer_mb", "batch_throughput_ratio_2", "batch_throughput_ratio_4",
                "batch_throughput_ceiling_4",
                "batch_stream_ratio_4_min", "ttft_while_3_decode_ms", "batch_identical_answers",
                "raw_batch_decode_ratio_4", "decode_ratio_threads1_followers0",
                "decode_ratio_threads2_followers0"),
    "memory": ("rss_startup_mb_1gb", "rss_peak_answer_mb_1gb", "gc_full_collect_ms",
               "gc_full_collect_ms_frozen", "rss_onnxruntime_mb",
               "rss_llm_weights_mb", "rss_llm_context_mb", "rss_state_cache_mb"),
}


def _versions() -> dict[str, str]:
    names = ("edgekb", "llama_cpp_python", "onnxruntime", "hnswlib", "aiohttp", "numpy")
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "?"
    return found


def _meets(key: str, value: Any) -> str:
    if key not in AIMS or value is None:
        return ""
    op, target = AIMS[key]
    good = {">=": value >= target, "<=": value <= target, "<": value < target}[op]
    return f"{'ok' if good else 'MISS'} (aim {op} {target})"


def table(doc: dict[str, Any]) -> str:
    lines = [f"{'figure':<30} {'value':>12}  aim"]
    for key, value in doc.items():
        if (isinstance(value, (int, float)) and not isinstance(value, bool)) or value is None:
            shown = "null" if value is None else f"{value:g}"
            lines.append(f"{key:<30} {shown:>12}  {_meets(key, value)}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (under 5 minutes on 2 quiet cores)")
    parser.add_argument("--json-only", action="store_true",
                        help="only the JSON document: no progress or table on stderr")
    parser.add_argument("--out", type=Path, help="also write the JSON document to FILE")
    args = parser.parse_args()
    common.QUIET = args.json_only
    # SIGTERM unwinds like an error, so servers are stopped and the work dir removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    raise_nofile(CLIENT_NOFILE)
    sheet = Sheet()
    errors: dict[str, str] = {}
    started = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="edgekb-bench-") as tmp:
        work = Path(tmp)
        steps: list[tuple[str, Callable[[], None]]] = [
            ("index", lambda: index.run(sheet, work, args.quick)),
            ("ingest", lambda: ingest.run(sheet, work, args.quick)),
            ("retrieval", lambda: retrieval_eval.run(sheet)),
            ("serving", lambda: asyncio.run(serving.run(sheet, work, args.quick))),
            ("memory", lambda: asyncio.run(memory_profile.run(sheet, work, args.quick))),
        ]
        for name, step in steps:
            step_started = time.perf_counter()
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the rest
                errors[name] = "".join(traceback.format_exception(exc, limit=-4))
                log(f"{name}: FAILED: {exc!r}")
                for key in EXPECTED[name]:
                    if key not in sheet.figures:
                        sheet.put(key, None, f"not measured: the {name} benchmark failed "
                                  "(see errors)")
            sheet.detail(f"{name}_s", round(time.perf_counter() - step_started, 1))
    doc: dict[str, Any] = {
        "quick": args.quick,
        **sheet.figures,
        "bench_s": round(time.perf_counter() - started, 1),
        "notes": sheet.notes,
        "aims": {k: f"{op} {v}" for k, (op, v) in AIMS.items()},
        "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg(), "python": platform.python_version(),
                    "versions": _versions()},
        "details": sheet.details,
        "errors": errors,
    }
    text = json.dumps(doc, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    if not args.json_only:
        print(table(doc), file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
