"""The systemd units as systemd reads them: `systemd-analyze verify` finds nothing wrong, the
hardening keeps `systemd-analyze security` exposure at or below 3.0, and socket activation
(systemd's own systemd-socket-activate) hands the server its listening socket."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import READY, REPO, edgekb_env

UNIT = REPO / "systemd" / "edgekb.service"
SOCKET_UNIT = REPO / "systemd" / "edgekb.socket"
INSTALLED_EXEC = "/opt/edgekb/venv/bin/edgekb"
MAX_EXPOSURE = 3.0

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is missing (scripts/test installs systemd on Debian)")


def _local_copy(tmp_path: Path, text: str) -> Path:
    """The unit with ExecStart pointing at this checkout's edgekb, which verify requires to
    exist; scripts/install's test checks the unit where it really is installed."""
    path = tmp_path / "edgekb.service"
    path.write_text(text.replace(INSTALLED_EXEC, str(Path(sys.executable).parent / "edgekb")))
    return path


def _verify(*paths: Path) -> str:
    result = subprocess.run(["systemd-analyze", "verify", *map(str, paths)],
                            capture_output=True, text=True, timeout=60, check=False)
    return (result.stdout + result.stderr).strip() + ("" if result.returncode == 0 else
                                                      f"\n(exit status {result.returncode})")


@needs_systemd_analyze
def test_units_verify_cleanly_and_a_broken_one_does_not(tmp_path: Path) -> None:
    unit = _local_copy(tmp_path, UNIT.read_text())
    shutil.copy(SOCKET_UNIT, tmp_path / "edgekb.socket")
    assert _verify(unit, tmp_path / "edgekb.socket") == ""
    broken = tmp_path / "broken" / "edgekb.service"
    broken.parent.mkdir()
    broken.write_text(unit.read_text().replace("WatchdogSec=", "WatchdogSek="))
    assert "Unknown key 'WatchdogSek'" in _verify(broken)


def test_the_unit_asks_for_what_the_appliance_relies_on() -> None:
    settings = dict(line.split("=", 1) for line in UNIT.read_text().splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["Restart"] == "on-failure" and int(settings["WatchdogSec"].rstrip("s")) > 0
    assert settings["User"] == "edgekb" and settings["ProtectSystem"] == "strict"
    assert settings["StateDirectory"] == settings["ConfigurationDirectory"] == "edgekb"
    assert settings["LogsDirectory"] == "edgekb"
    memory_max_mb = int(settings["MemoryMax"].rstrip("M"))
    assert memory_max_mb < 1024  # fits a 1 GB board, with room for the system


@needs_systemd_analyze
def test_hardening_exposure_is_at_most_three(tmp_path: Path) -> None:
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                             str(_local_copy(tmp_path, UNIT.read_text()))],
                            capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for edgekb\.service: (\d+\.\d)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= MAX_EXPOSURE, result.stdout


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate is missing (part of systemd)")
def test_socket_activation_serves_on_the_socket_systemd_passes(
        tmp_path: Path, models_cache: Path, demo_data_dir: Path) -> None:
    port = _free_port()
    log = tmp_path / "activate.log"
    with log.open("w") as out:
        # The port edgekb would choose itself is another one: it must use the passed socket.
        env = edgekb_env(models_cache)
        passed = [f"-E{key}={value}" for key, value in env.items() if key.startswith("EDGEKB_")]
        activator = subprocess.Popen(  # it hands the program only the variables named by -E
            ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", *passed, sys.executable,
             "-m", "edgekb", "serve", "--data-dir", str(demo_data_dir), "--port", "1"],
            env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "Listening on" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        # The first connection starts edgekb; it waits in the socket's backlog meanwhile.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=180) as reply:
            assert reply.status == 200
        match = READY.search(log.read_text())
        assert match and int(match[3]) == port, log.read_text()
    finally:
        activator.terminate()
        try:
            activator.wait(timeout=60)
        except subprocess.TimeoutExpired:
            activator.kill()
            activator.wait(timeout=10)
