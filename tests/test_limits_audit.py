"""The counters and the audit trail on their own: deterministic clocks, real files, real
processes killed mid-write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgekb.audit import AuditLog, read_lines
from edgekb.limits import (
    ConnectionCounter,
    LoginThrottle,
    QuestionRate,
    RateLimited,
    ServerFull,
    TooManyConnections,
    client_address,
    connection_ceiling,
    parse_networks,
)
from edgekb.tokens import KeyStore, TokenAuthority, TokenRequestInvalid, Unauthorized, parse_ttl


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_question_rate_allows_a_burst_then_one_per_refill_with_retry_after() -> None:
    clock = Clock()
    rate = QuestionRate(30, clock)
    for _ in range(30):
        rate.take("ann")
    with pytest.raises(RateLimited) as refused:
        rate.take("ann")
    assert refused.value.code == "rate_limited" and refused.value.retry_after == pytest.approx(2)
    rate.take("bob")  # another user has a budget of their own
    clock.now += 2.0
    rate.take("ann")  # one question back every 2 s (30 a minute)
    with pytest.raises(RateLimited):
        rate.take("ann")


def test_login_throttle_doubles_the_wait_and_forgets_on_success() -> None:
    clock = Clock()
    throttle = LoginThrottle(5, clock)
    for _ in range(5):
        throttle.check("10.0.0.9")
        throttle.failed("10.0.0.9")
    waits = []
    for _ in range(4):
        with pytest.raises(RateLimited) as refused:
            throttle.check("10.0.0.9")
        waits.append(refused.value.retry_after)
        clock.now += refused.value.retry_after
        throttle.check("10.0.0.9")
        throttle.failed("10.0.0.9")
    assert waits == [1.0, 2.0, 4.0, 8.0]
    throttle.check("10.0.0.8")  # other addresses are not slowed
    clock.now += 16
    throttle.succeeded("10.0.0.9")
    throttle.check("10.0.0.9")


def test_connection_counter_caps_per_address_and_in_total() -> None:
    counter = ConnectionCounter(per_address=2, total=3)
    counter.acquire("a")
    counter.acquire("a")
    with pytest.raises(TooManyConnections):
        counter.acquire("a")
    counter.acquire("b")
    with pytest.raises(ServerFull):
        counter.acquire("c")
    counter.release("a")
    counter.acquire("proxy", counted=False)  # only the total applies to a trusted proxy
    assert counter.open == 3


def test_connection_ceiling_stays_below_the_descriptor_limit() -> None:
    assert connection_ceiling(2000, fd_limit=1024, in_use=40) < 1024 - 40
    assert connection_ceiling(100, fd_limit=1 << 20, in_use=40) == 100


def test_forwarded_address_is_believed_only_from_a_trusted_proxy() -> None:
    proxies = parse_networks(["10.0.0.1", "172.16.0.0/12"])
    forwarded = {"X-Forwarded-For": "6.6.6.6, 192.168.1.50, 172.16.3.4"}
    assert client_address("10.0.0.1", forwarded, proxies) == "192.168.1.50"
    assert client_address("192.168.1.77", forwarded, proxies) == "192.168.1.77"
    assert client_address("10.0.0.1", {"X-Forwarded-For": "not-an-ip"}, proxies) == "10.0.0.1"
    assert client_address("10.0.0.1", {}, proxies) == "10.0.0.1"


def test_ttl_parsing() -> None:
    assert parse_ttl("8h") == 8 * 3600 and parse_ttl("30m") == 1800 and parse_ttl("90") == 90
    for bad in ("", "h", "-1h", "soon"):
        with pytest.raises(TokenRequestInvalid):
            parse_ttl(bad)


# --- audit ----------------------------------------------------------------------------------

def test_audit_lines_hold_the_fields_and_never_secrets(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log", 1 << 20, 3)
    log.record("login", user="ann", address="10.1.1.1", request="r1", outcome="ok",
               password="hunter2", token="eyJ.x.y", csrf="c", question="how do I?", role="user")
    log.close()
    (line,) = read_lines(tmp_path / "audit.log", 10)
    assert set(line) == {"time", "event", "user", "address", "request", "outcome", "role"}
    assert "hunter2" not in (tmp_path / "audit.log").read_text()
    asked = AuditLog(tmp_path / "q.log", 1 << 20, 3, question_text=True)
    asked.record("question", question="how do I?")
    asked.close()
    assert read_lines(tmp_path / "q.log", 1)[0]["question"] == "how do I?"


def test_audit_rotates_by_size_and_keeps_a_bounded_number_of_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path, max_bytes=4000, keep=3)
    for n in range(400):
        log.record("question", user=f"u{n}", request=str(n))
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.log", "audit.log.1", "audit.log.2", "audit.log.3"]
    assert all(p.stat().st_size <= 4000 for p in tmp_path.iterdir())
    last = read_lines(path, 5)
    assert [line["request"] for line in last] == ["395", "396", "397", "398", "399"]


def test_a_flood_of_one_refusal_is_coalesced_and_counted_exactly(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log", 1 << 20, 3)
    for _ in range(1000):
        log.record("connection_refused", address="10.9.9.9", coalesce="refused:10.9.9.9")
    log.record("connection_refused", address="10.9.9.8", coalesce="refused:10.9.9.8")
    time.sleep(2.5)  # the window ends: its summary is written without another event
    lines = read_lines(tmp_path / "audit.log", 100)
    assert [(line["address"], line.get("count", 1)) for line in lines] == [
        ("10.9.9.9", 1), ("10.9.9.8", 1), ("10.9.9.9", 999)]
    for _ in range(5):
        log.record("connection_refused", address="10.9.9.9", coalesce="refused:10.9.9.9")
    log.close()  # what is held is written on close too
    assert sum(line.get("count", 1) for line in read_lines(tmp_path / "audit.log", 100)) == 1006


def test_kill_9_loses_no_line_that_was_recorded_and_a_torn_line_is_skipped(
        tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    writer = subprocess.Popen([sys.executable, "-c", f"""
import sys
from pathlib import Path
from edgekb.audit import AuditLog
log = AuditLog(Path({str(path)!r}), 1 << 30, 2)
n = 0
while True:
    log.record("question", request=str(n))
    print(n, flush=True)
    n += 1
"""], stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    acknowledged = -1
    for _ in range(5000):
        acknowledged = int(writer.stdout.readline())
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=10)
    writer.stdout.close()
    requests = [int(line["request"]) for line in read_lines(path, 1 << 20)]
    assert requests[: acknowledged + 1] == list(range(acknowledged + 1))
    with path.open("ab") as handle:
        handle.write(b'{"time": 1, "event": "tor')  # what a power cut may leave
    assert read_lines(path, 3)[-1]["request"] == str(requests[-1])


# --- keys: rotation and revocation, seen by a running authority --------------------------------

def authority(data_dir: Path) -> TokenAuthority:
    return TokenAuthority(KeyStore(data_dir, max_ttl_s=3600), algorithms=["HS256"],
                          issuer="edgekb", audience="edgekb", leeway_s=0, max_ttl_s=3600)


def test_the_first_key_is_made_private_and_rotation_logs_nobody_out(tmp_path: Path) -> None:
    server = authority(tmp_path)
    path = tmp_path / "auth" / "keys.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "auth").stat().st_mode & 0o777 == 0o700
    old_token, _ = server.issue("ann", "user", 600)
    cli = authority(tmp_path)  # another process: the CLI
    cli.store.rotate()
    new_token, _ = server.issue("bob", "user", 600)  # the server signs with the new key
    assert json.loads(path.read_text())["keys"][-1]["kid"] == \
        __import__("jwt").get_unverified_header(new_token)["kid"]
    assert server.verify(old_token, "header").sub == "ann"  # still valid
    cli.store.rotate(retire_now=True)  # after a leak
    for token in (old_token, new_token):
        with pytest.raises(Unauthorized):
            server.verify(token, "header")


def test_revocations_by_the_cli_reach_a_running_authority_at_once(tmp_path: Path) -> None:
    server = authority(tmp_path)
    ann, ann_principal = server.issue("ann", "user", 600)
    bob, _ = server.issue("bob", "user", 600)
    cli = authority(tmp_path)
    cli.revoke_token(ann_principal.jti, ann_principal.expires)
    with pytest.raises(Unauthorized, match="revoked"):
        server.verify(ann, "header")
    assert server.verify(bob, "header").sub == "bob"
    cli.revoke_subject("bob")
    with pytest.raises(Unauthorized, match="revoked"):
        server.verify(bob, "header")
    time.sleep(0.01)  # tokens issued after the revocation work
    fresh, _ = server.issue("bob", "user", 600)
    assert server.verify(fresh, "header").sub == "bob"


def test_a_token_longer_than_the_maximum_ttl_is_not_issued(tmp_path: Path) -> None:
    with pytest.raises(TokenRequestInvalid, match="max_token_ttl"):
        authority(tmp_path).issue("ann", "user", 7200)
    assert os.listdir(tmp_path / "auth")
