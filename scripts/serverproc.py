"""What the bench and the soak scripts share about the `edgekb serve` processes they start."""

from __future__ import annotations

import re
import subprocess

READY = re.compile(r"edgekb ready on http://([\d.]+):(\d+)/")


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
