"""The real edgekb server for the soak: demo data dir, `serve` inside the namespace, its RSS."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import serverproc

from .badlink import BadLink

REPO = Path(__file__).resolve().parents[2]
# The namespace is the server's own, so this port is always free there.
SERVER_PORT = 8080
PR_SET_PDEATHSIG = 1


def edgekb_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEKB_")}
    env["EDGEKB_MODELS__CACHE_DIR"] = os.environ.get(
        "EDGEKB_MODELS__CACHE_DIR", str(REPO / ".cache" / "models"))
    return env


def prepare_data_dir(data_dir: Path, env: dict[str, str]) -> None:
    result = subprocess.run([sys.executable, "-m", "edgekb", "ingest", "--demo", "--data-dir",
                             str(data_dir)], env=env, text=True, capture_output=True, timeout=900,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(f"edgekb ingest --demo failed:\n{result.stderr}")


def _die_with_parent() -> None:
    # If the soak is killed outright, the server must not outlive it inside a deleted namespace.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Server:
    def __init__(self, link: BadLink, data_dir: Path, log: Path, env: dict[str, str],
                 settings: list[str]) -> None:
        self.url = f"ws://{link.ns_addr}:{SERVER_PORT}/ws"
        self.log = log
        sets = [arg for setting in settings for arg in ("--set", setting)]
        with log.open("w") as log_file:
            # `ip netns exec` execs the command itself, so this pid is the server's.
            self.process = subprocess.Popen(
                [*link.exec_prefix(), sys.executable, "-m", "edgekb", "serve", "--data-dir",
                 str(data_dir), "--host", link.ns_addr, "--port", str(SERVER_PORT), *sets],
                env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO,
                preexec_fn=_die_with_parent)  # noqa: PLW1509 (no threads exist yet)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if serverproc.READY.search(self.log.read_text()):
                cmdline = Path(f"/proc/{self.process.pid}/cmdline").read_bytes()
                if b"edgekb" not in cmdline:
                    raise RuntimeError("the server pid is not the edgekb process")
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n"
                                   f"{self.tail()}")
            time.sleep(0.2)
        raise RuntimeError(f"server not ready in {timeout:.0f} s:\n{self.tail()}")

    def rss_mib(self) -> float | None:
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        return round(int(match[1]) / 1024, 1) if match else None

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int | None:
        return serverproc.stop(self.process)
