"""A bad link: a network namespace joined to the root namespace by a veth pair.

Each end's egress is limited by `tc tbf` (this kernel has no netem) and each end's ingress drops
packets at random with an nftables netdev rule, so both directions lose and both are slow.
Everything made here is removed by the context manager, also when setup fails half-way.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# Soak links take their /30 from here; one that overlaps a local address or route is skipped.
POOL = ipaddress.ip_network("10.203.0.0/16")
TOOLS = {"ip": "iproute2", "tc": "iproute2", "nft": "nftables"}


@dataclass(frozen=True)
class BadLink:
    namespace: str
    host_dev: str
    ns_dev: str
    host_addr: str
    ns_addr: str
    table: str  # nftables table, the same name in both namespaces

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.namespace]


def _run(*args: str, stdin: str | None = None) -> None:
    result = subprocess.run(list(args), input=stdin, text=True, capture_output=True, timeout=60,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip()}")


def ensure_tools() -> None:
    """Install iproute2 / nftables when missing (they are not in every container image)."""
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return
    print(f"soak: installing {' '.join(missing)}", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, timeout=600,
                   env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def _pick_subnet(seed: int) -> ipaddress.IPv4Network:
    """A /30 of POOL overlapping no local address or route; the seed spreads concurrent runs."""
    used: list[ipaddress.IPv4Network] = []
    for cmd in (["ip", "-o", "-4", "addr", "show"], ["ip", "-4", "route", "show", "table", "all"]):
        out = subprocess.run(cmd, text=True, capture_output=True, timeout=30, check=True).stdout
        for word in out.split():
            try:
                used.append(ipaddress.ip_network(word, strict=False))  # type: ignore[arg-type]
            except ValueError:
                continue
    subnets = list(POOL.subnets(new_prefix=30))
    for i in range(len(subnets)):  # bounded by the pool size
        candidate = subnets[(seed + i) % len(subnets)]
        if not any(candidate.overlaps(net) for net in used if net.version == 4):
            return candidate
    raise RuntimeError(f"no free /30 left in {POOL}")


def _loss_table(table: str, device: str, loss_pct: float) -> str:
    # numgen draws 0..9999, so loss can be given to a hundredth of a percent.
    threshold = round(loss_pct * 100)
    return (f'table netdev {table} {{\n'
            f'  chain loss {{ type filter hook ingress device "{device}" priority 0;\n'
            f'    numgen random mod 10000 < {threshold} drop; }}\n'
            f'}}\n')


@contextmanager
def bad_link(tag: int, rate_kbit: int, loss_pct: float) -> Iterator[BadLink]:
    ensure_tools()
    subnet = _pick_subnet(tag)
    host_addr, ns_addr = (str(a) for a in subnet.hosts())
    link = BadLink(namespace=f"edgekb-soak-{tag}", host_dev=f"eks{tag}h", ns_dev=f"eks{tag}n",
                   host_addr=host_addr, ns_addr=ns_addr, table=f"edgekb_soak_{tag}")
    ns = ["ip", "-n", link.namespace]
    # tbf drops a packet bigger than its bucket: at least two full frames, or 20 ms of data.
    burst = max(4096, rate_kbit * 1000 // 8 // 50)
    tbf = ["root", "tbf", "rate", f"{rate_kbit}kbit", "burst", str(burst), "latency", "300ms"]
    made_namespace = made_table = False
    try:
        _run("ip", "netns", "add", link.namespace)
        made_namespace = True
        _run("ip", "link", "add", link.host_dev, "type", "veth", "peer", "name", link.ns_dev,
             "netns", link.namespace)
        _run("ip", "addr", "add", f"{host_addr}/30", "dev", link.host_dev)
        _run("ip", "link", "set", link.host_dev, "up")
        _run(*ns, "addr", "add", f"{ns_addr}/30", "dev", link.ns_dev)
        _run(*ns, "link", "set", link.ns_dev, "up")
        _run(*ns, "link", "set", "lo", "up")
        _run("tc", "qdisc", "add", "dev", link.host_dev, *tbf)
        _run("tc", "-n", link.namespace, "qdisc", "add", "dev", link.ns_dev, *tbf)
        if loss_pct > 0:
            made_table = True
            _run("nft", "-f", "-", stdin=_loss_table(link.table, link.host_dev, loss_pct))
            _run(*link.exec_prefix(), "nft", "-f", "-",
                 stdin=_loss_table(link.table, link.ns_dev, loss_pct))
        yield link
    finally:
        _teardown(link, made_namespace, made_table)


def _teardown(link: BadLink, made_namespace: bool, made_table: bool) -> None:
    """Best effort, each step on its own: one failure must not leave the rest behind."""
    steps: list[list[str]] = []
    if made_table:
        steps.append(["nft", "delete", "table", "netdev", link.table])
    steps.append(["ip", "link", "del", link.host_dev])  # takes its peer (and tbf) with it
    if made_namespace:
        steps.append(["ip", "netns", "del", link.namespace])  # the ns-side nft table goes too
    for step in steps:
        subprocess.run(step, capture_output=True, timeout=60, check=False)
    leftovers = []
    names = subprocess.run(["ip", "netns", "list"], text=True, capture_output=True,
                           timeout=30, check=False).stdout
    if link.namespace in names.split():
        leftovers.append(f"namespace {link.namespace}")
    if subprocess.run(["ip", "link", "show", link.host_dev], capture_output=True,
                      timeout=30, check=False).returncode == 0:
        leftovers.append(f"device {link.host_dev}")
    if made_table and subprocess.run(["nft", "list", "table", "netdev", link.table],
                                     capture_output=True, timeout=30, check=False).returncode == 0:
        leftovers.append(f"nft table netdev {link.table}")
    if leftovers:
        print(f"soak: could not remove {', '.join(leftovers)}", file=sys.stderr)
