"""scripts/install and scripts/uninstall for real, in a throwaway Debian booted with systemd
(tests/throwaway_root.py): the service installs from this checkout, starts as the user edgekb
under the hardened unit, answers questions, is restarted by systemd when its keep-alives stop,
upgrades in place keeping data and settings, and uninstalls keeping the data unless purged.

Needs root, debootstrap and systemd-nspawn (scripts/test installs them on Debian) and the
network (Debian and PyPI, as on a real board). The llama-cpp-python wheel built by
scripts/setup and pip's hnswlib wheel are lent to the installer (read-only) so that nothing
compiles; the models come from the test's model cache through --models-from and are verified
by sha256 as downloaded ones are.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from conftest import DEMO_QUESTION, REPO, collect, receive_json
from throwaway_root import Container, missing_tools

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="booting a throwaway root needs root"),
    pytest.mark.skipif(bool(missing_tools()), reason=f"missing {missing_tools()} (scripts/test"
                       " installs debootstrap and systemd-container on Debian)"),
]

SRC = "/usr/local/src/edgekb"
CONF = "/etc/edgekb/edgekb.yaml"
EDGEKB = "/opt/edgekb/venv/bin/edgekb"
HOST_CA = "/srv/host-ca.crt"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wheels_to_lend(tmp_path: Path) -> tuple[dict[Path, str], bool]:
    """Binds for the wheels this machine built already, and whether they suffice to install
    without a compiler."""
    binds: dict[Path, str] = {}
    llama = Path.home() / ".cache" / "edgekb" / "wheels"
    if list(llama.glob("llama-cpp-python-*/llama_cpp_python-*.whl")):
        binds[llama] = "/root/.cache/edgekb/wheels"
    flat = tmp_path / "wheels"
    flat.mkdir()
    for wheel in (Path.home() / ".cache" / "pip" / "wheels").rglob("hnswlib-*.whl"):
        shutil.copy(wheel, flat)
    binds[flat] = "/srv/edgekb-wheels"
    return binds, llama in binds and any(flat.iterdir())


@dataclass
class Box:
    """The booted container, and whether wheels built here let it install without a compiler."""

    container: Container
    prebuilt: bool

    def run(self, command: str, timeout_s: float = 600, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return self.container.run(command, timeout_s, check, env)


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory, models_cache: Path) -> Iterator[Box]:
    where = tmp_path_factory.mktemp("install")
    binds, prebuilt = _wheels_to_lend(where)
    binds[models_cache] = "/srv/edgekb-models"
    # The certificates this machine trusts (a TLS-inspecting proxy's, on some CI networks).
    binds[Path(os.environ.get("PIP_CERT") or ssl.get_default_verify_paths().cafile)] = \
        HOST_CA
    container = Container.unpack(where, binds, where / "console.log")
    # The checkout as a user would copy it: tracked and new files, nothing ignored.
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           check=True, capture_output=True).stdout
    target = container.root / SRC.lstrip("/")
    target.mkdir(parents=True)
    subprocess.run(["tar", "--null", "-T", "-", "-cf", str(where / "src.tar")], cwd=REPO,
                   input=files, check=True)
    subprocess.run(["tar", "-C", str(target), "-xf", str(where / "src.tar")], check=True)
    container.boot()
    try:
        yield Box(container, prebuilt)
    finally:
        container.stop()
        shutil.rmtree(container.root, ignore_errors=True)


def install(box: Box, *options: str) -> tuple[str, float]:
    flags = ["--models-from", "/srv/edgekb-models", *options]
    if box.prebuilt:
        flags.append("--no-build-tools")
    started = time.monotonic()
    result = box.run(f"{SRC}/scripts/install {' '.join(flags)}", timeout_s=1800,
                     env={"PIP_FIND_LINKS": "/srv/edgekb-wheels", "PIP_CERT": HOST_CA,
                          "SSL_CERT_FILE": HOST_CA})
    return result.stdout, time.monotonic() - started


def service(box: Box) -> dict[str, str]:
    shown = box.run("systemctl show edgekb.service -p ActiveState -p SubState -p MainPID"
                    " -p NRestarts -p Result").stdout
    return dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)


def test_install_upgrade_uninstall_in_a_booted_debian(box: Box) -> None:
    port = _free_port()
    out, first_s = install(box, "--demo", "--port", str(port))
    match = re.search(r"edgekb is ready on (http://[\d.]+:\d+/)", out)
    assert match, out
    url = match[1]
    assert url == f"http://127.0.0.1:{port}/"

    # Running as edgekb under the hardened unit, ready, answering.
    state = service(box)
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
    # This machine has more than a 1 GB board: it runs the bigger LLM, with room for it.
    memory = box.run("systemctl show edgekb.service -p MemoryMax --value").stdout.strip()
    assert memory == str(1400 * 1024 * 1024)
    uid = box.run("id -u edgekb").stdout.strip()
    assert box.run(f"stat -c %u /proc/{state['MainPID']}").stdout.strip() == uid
    assert box.run("stat -c '%U %a' /var/lib/edgekb").stdout.split() == ["edgekb", "700"]
    with urllib.request.urlopen(f"{url}healthz", timeout=30) as reply:
        assert reply.status == 200
    # Short answers keep the test quick; a restart takes the changed settings.
    box.run(f"printf 'generation:\\n  max_tokens: 32\\n  threads: 1\\n' >> {CONF}"
            " && systemctl restart edgekb")
    # Sign-in is on in the installed service: a token as an operator issues one on the box.
    token = box.run(f"runuser -u edgekb -- {EDGEKB} token issue --sub install-test "
                    f"--role admin --config {CONF}").stdout.strip()
    auth = {"Authorization": f"Bearer {token}"}
    session, events = asyncio.run(_ask(url, auth, DEMO_QUESTION))
    assert events[-1]["type"] == "done" and any(e["type"] in ("sources", "source")
                                                for e in events)

    # The unit as systemd sees it where it is installed.
    verify = box.run("systemd-analyze verify /etc/systemd/system/edgekb.service", check=False)
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify
    security = box.run("systemd-analyze security --no-pager edgekb.service").stdout
    exposure = float(re.search(r"Overall exposure level for edgekb\.service: (\d+\.\d)",
                               security)[1])  # type: ignore[index]
    assert exposure <= 3.0, security
    journal = box.run("journalctl -u edgekb.service -o cat --no-pager").stdout
    assert f"edgekb ready on http://127.0.0.1:{port}/" in journal
    # Priorities reach the journal: INFO lines are not warnings.
    warnings = box.run("journalctl -u edgekb.service -p warning -o cat --no-pager").stdout
    assert "verifying and loading the LLM" in journal and \
        "verifying and loading the LLM" not in warnings
    doctor = box.run(f"runuser -u edgekb -- {EDGEKB} doctor --config {CONF}", check=False)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr

    # A process that stops sending keep-alives is killed and restarted by systemd. (Quicker
    # limits for the test; the datagram test shows a stuck event loop stops the keep-alives.)
    box.run("mkdir -p /etc/systemd/system/edgekb.service.d && printf '[Service]\\n"
            "WatchdogSec=4s\\nTimeoutAbortSec=3s\\n' > /etc/systemd/system/edgekb.service.d/"
            "test.conf && systemctl daemon-reload && systemctl restart edgekb.service")
    stalled = service(box)
    box.run(f"kill -STOP {stalled['MainPID']}")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        now = service(box)
        if now["NRestarts"] != stalled["NRestarts"] and now["SubState"] == "running":
            break
        time.sleep(1)
    assert int(now["NRestarts"]) == int(stalled["NRestarts"]) + 1, now
    assert now["MainPID"] != stalled["MainPID"]
    assert "Watchdog timeout" in box.run("journalctl -u edgekb.service --no-pager").stdout
    box.run("rm /etc/systemd/system/edgekb.service.d/test.conf && systemctl daemon-reload")

    # Upgrade in place: settings and data kept.
    box.run(f"printf '# kept by upgrades\\nretention:\\n  max_mb: 128\\n' >> {CONF}")
    box.run(f"echo '# a newer checkout' >> {SRC}/edgekb/__init__.py")  # same version number
    out, upgrade_s = install(box)
    assert "# a newer checkout" in box.run(
        "cat /opt/edgekb/venv/lib/python3*/site-packages/edgekb/__init__.py").stdout
    assert "upgraded and running" in out and "kept the existing" in out, out
    assert "max_mb: 128" in box.run(f"cat {CONF}").stdout
    history = asyncio.run(_history(url, auth, session))
    assert [t["question"] for t in history] == [DEMO_QUESTION]
    kbs = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"{url}api/kbs", headers=auth), timeout=30).read())["kbs"]
    assert kbs and kbs[0]["documents"] >= 4

    # Uninstall keeps the data; --purge removes it.
    box.run(f"{SRC}/scripts/uninstall")
    assert box.run("systemctl cat edgekb.service", check=False).returncode != 0
    assert box.run("test -e /opt/edgekb", check=False).returncode != 0
    assert box.run("test -s /var/lib/edgekb/edgekb.db && test -f " + CONF,
                   check=False).returncode == 0
    box.run(f"{SRC}/scripts/uninstall --purge")
    assert box.run("test -e /var/lib/edgekb || test -e /etc/edgekb || id edgekb",
                   check=False).returncode != 0
    print(f"install {first_s:.0f} s, upgrade {upgrade_s:.0f} s")


async def _ask(url: str, auth: dict[str, str], question: str) -> tuple[str, list[dict]]:
    async with aiohttp.ClientSession(headers=auth) as http, http.ws_connect(
            f"{url}ws", protocols=("edgekb.v2",)) as ws:
        welcome = await receive_json(ws)
        await ws.send_json({"type": "ask", "id": "q1", "text": question})
        return welcome["session"], await collect(ws, "q1")


async def _history(url: str, auth: dict[str, str], session: str) -> list[dict]:
    async with aiohttp.ClientSession(headers=auth) as http, http.ws_connect(
            f"{url}ws?session={session}", protocols=("edgekb.v2",)) as ws:
        await receive_json(ws)
        await ws.send_json({"type": "history"})
        return (await receive_json(ws))["turns"]
