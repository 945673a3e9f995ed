"""A throwaway Debian system booted with its own systemd, for testing scripts/install for real.

The root is made by Debian's debootstrap (minbase plus systemd: a bare server, no Python)
once, and cached as a tarball (EDGEKB_ROOTFS_CACHE, default ~/.cache/edgekb/rootfs), so a
rerun only unpacks it. systemd-nspawn boots it: systemd runs as PID 1 of the container, with
journald and the real service manager, so units start, notify, are watched and restarted as on
a Raspberry Pi. The container shares the host's network (the installer reaches Debian and PyPI;
the test reaches the service on a loopback port it chose).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = "systemd,systemd-sysv,dbus"
ROOTFS_CACHE = Path(os.environ.get("EDGEKB_ROOTFS_CACHE",
                                   Path.home() / ".cache" / "edgekb" / "rootfs"))
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def missing_tools() -> list[str]:
    return [tool for tool in ("debootstrap", "systemd-nspawn", "nsenter")
            if shutil.which(tool) is None]


def base_tarball() -> Path:
    """The cached root of a minimal Debian with systemd; built once (about 2 minutes)."""
    arch = {"x86_64": "amd64", "aarch64": "arm64"}[platform.machine()]
    tarball = ROOTFS_CACHE / f"debian-{SUITE}-{arch}-systemd.tar"
    if tarball.exists():
        return tarball
    ROOTFS_CACHE.mkdir(parents=True, exist_ok=True)
    build = ROOTFS_CACHE / f"build-{os.getpid()}"
    try:
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}",
                        SUITE, str(build), MIRROR], check=True, timeout=1200,
                       stdout=subprocess.DEVNULL)
        partial = tarball.with_suffix(".partial")
        subprocess.run(["tar", "-C", str(build), "--numeric-owner", "-cf", str(partial), "."],
                       check=True, timeout=600)
        partial.rename(tarball)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return tarball


class Container:
    """One booted throwaway root; ``run`` executes a shell command inside it as root."""

    def __init__(self, root: Path, binds: dict[Path, str], log: Path) -> None:
        self.root = root
        self.binds = binds
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.leader = 0

    @classmethod
    def unpack(cls, where: Path, binds: dict[Path, str], log: Path) -> Container:
        root = where / "root"
        root.mkdir()
        subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-xf", str(base_tarball())],
                       check=True, timeout=600)
        return cls(root, binds, log)

    def boot(self, timeout_s: float = 120) -> None:
        binds = [f"--bind-ro={source}:{target}" for source, target in self.binds.items()]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--boot",
                 "--console=pipe", f"--machine=edgekb-test-{os.getpid()}", "-D",
                 str(self.root), *binds], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not self.leader and time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the container did not boot:\n{self.log.read_text()}")
            self.leader = self._init_pid()
            time.sleep(0.2)
        assert self.leader, f"no init in the container after {timeout_s} s"
        left = max(1.0, deadline - time.monotonic())
        state = self.run("systemctl is-system-running --wait", timeout_s=left, check=False)
        assert state.stdout.strip() in ("running", "degraded"), state.stdout + state.stderr

    def _init_pid(self) -> int:
        """The container's PID 1: a child of systemd-nspawn, pid 1 in its own namespace."""
        assert self.process is not None
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                status = dict(line.split(":\t", 1) for line in
                              (entry / "status").read_text().splitlines() if ":\t" in line)
            except OSError:
                continue
            if status.get("PPid", "").strip() == str(self.process.pid) and \
                    status.get("NSpid", "").split()[-1:] == ["1"]:
                return int(entry.name)
        return 0

    def run(self, command: str, timeout_s: float = 600, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        variables = {"PATH": CONTAINER_PATH, "HOME": "/root", "LANG": "C.UTF-8",
                     "TERM": "dumb", **(env or {})}
        result = subprocess.run(
            ["nsenter", f"--target={self.leader}", "--all", "--root", "--wd", "env", "-i",
             *[f"{k}={v}" for k, v in variables.items()], "bash", "-c", command],
            capture_output=True, text=True, timeout=timeout_s, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"in the container, `{command}` exited with"
                                 f" {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # nspawn asks the container's systemd to power off
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
