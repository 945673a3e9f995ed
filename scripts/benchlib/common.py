"""What every benchmark shares: the result sheet, logging, process memory, percentiles."""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgekb.boards import llm_name
from edgekb.config import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
# Loopback only: every load this benchmark makes targets this address.
HOST = "127.0.0.1"
QUIET = False


def log(message: str) -> None:
    if not QUIET:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def models_cache() -> Path:
    """The model cache scripts/test fills, unless EDGEKB_MODELS__CACHE_DIR names another."""
    return Path(os.environ.get("EDGEKB_MODELS__CACHE_DIR") or REPO / ".cache" / "models")


def edgekb_env() -> dict[str, str]:
    """Environment for edgekb (processes and settings): no stray EDGEKB_* settings, the cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKB_")}
    env["EDGEKB_MODELS__CACHE_DIR"] = str(models_cache())
    return env


def bench_settings(data_dir: Path) -> Settings:
    """edgekb's default settings on ``data_dir``, with the benchmark's model cache, and
    ``models.llm: auto`` resolved as the server resolves it on this machine (the raw baseline
    must load the same model)."""
    settings = load_settings(None, env=edgekb_env(), overrides={"data_dir": data_dir})
    return replace(settings, models=replace(settings.models, llm=llm_name(settings)))


def benchlib_env() -> dict[str, str]:
    """Environment for this package's own helper processes (python -m benchlib.X)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "scripts"),
                                                      env.get("PYTHONPATH")]))
    return env


@dataclass
class Sheet:
    """Figures (numbers or null) and, for each, a note saying what it compares and how often."""

    figures: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def put(self, key: str, value: float | None, note: str, digits: int = 3) -> None:
        if isinstance(value, float):
            value = round(value, digits) if math.isfinite(value) else None
        self.figures[key] = value
        self.notes[key] = note

    def detail(self, key: str, value: Any) -> None:
        self.details[key] = value


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process (or of one of its threads: the main thread,
    tid == pid, runs the event loop), from /proc; 0.0 when it is gone."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status_kb(pid: int, field_name: str) -> int:
    """A memory line of /proc/PID/status in KiB (VmRSS, VmHWM), 0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def raise_nofile(wanted: int) -> int:
    """Raise this process's open-file limit toward ``wanted`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft if soft != resource.RLIM_INFINITY else wanted
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator
