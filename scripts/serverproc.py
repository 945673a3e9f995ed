"""What the bench and the soak scripts share about the `edgekb serve` processes they start."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

READY = re.compile(r"edgekb ready on http://([\d.]+):(\d+)/")
# Benchmarks and the soak measure the engine and the protocol, not the per-client limits (those
# have tests/test_security.py and scripts/bench_security): lift the caps a load generator hits.
UNLIMITED = ("limits.questions_per_minute=100000", "limits.connections_per_address=100000",
             "limits.connections_total=100000")


def issue_token(data_dir: Path, env: dict[str, str], sub: str = "bench") -> str:
    """An admin token for the data dir, made as an operator makes one (`edgekb token issue`);
    the first one also makes the data dir's signing key."""
    result = subprocess.run([sys.executable, "-m", "edgekb", "token", "issue", "--sub", sub,
                             "--role", "admin", "--ttl", "24h", "--data-dir", str(data_dir)],
                            env=env, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"edgekb token issue failed:\n{result.stderr[-2000:]}")
    return result.stdout.strip()


def stop(process: subprocess.Popen, grace_s: float = 30) -> int | None:
    """SIGTERM (a graceful shutdown), then SIGKILL if it takes longer than ``grace_s``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    return process.returncode
