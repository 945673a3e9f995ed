"""`edgekb users|token|tls|audit`: the security commands (parsing and output only).

They work on the data dir directly, while a server runs too: users live in SQLite (WAL allows a
second writer), keys and revocations in auth/keys.json, which the server re-reads when it
changes, so `users remove` or `token revoke` takes effect on a running server at once.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

EXIT_USAGE = 2


def add_commands(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    users = sub.add_parser("users", help="people who sign in on the web page")
    users_sub = users.add_subparsers(dest="users_command", required=True)
    add = users_sub.add_parser("add", help="add a user (asks for the password)")
    common(add)
    add.add_argument("name")
    add.add_argument("--role", choices=("admin", "user"), default="user")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of stdin")
    common(users_sub.add_parser("list", help="every user and role"))
    remove = users_sub.add_parser("remove", help="remove a user and end their logins")
    common(remove)
    remove.add_argument("name")
    passwd = users_sub.add_parser("passwd", help="set a new password and end old logins")
    common(passwd)
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true")

    token = sub.add_parser("token", help="tokens for devices and scripts; signing keys")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    issue = token_sub.add_parser("issue", help="print a signed token")
    common(issue)
    issue.add_argument("--sub", required=True, help="who the token is for (a device, a script)")
    issue.add_argument("--role", choices=("admin", "user"), default="user")
    issue.add_argument("--ttl", default="8h", help="lifetime: 30m, 8h, 7d (default 8h)")
    issue.add_argument("--json", action="store_true", help="token with its claims as JSON")
    revoke = token_sub.add_parser("revoke", help="stop tokens working before they expire")
    common(revoke)
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--jti", help="one token, by its id (printed by issue --json)")
    which.add_argument("--sub", help="every token issued so far to this subject")
    revoke.add_argument("--expires", type=float, default=0.0,
                        help="with --jti: the token's exp (default: now + auth.max_token_ttl_h)")
    rotate = token_sub.add_parser("rotate-key", help="sign with a new key; old tokens keep "
                                  "working until they expire")
    common(rotate)
    rotate.add_argument("--retire-now", action="store_true",
                        help="after a leak: old keys stop verifying at once (all sign in again)")

    tls = sub.add_parser("tls", help="certificates for https and wss")
    tls_sub = tls.add_subparsers(dest="tls_command", required=True)
    selfsigned = tls_sub.add_parser("self-signed", help="make a self-signed pair in the data dir")
    common(selfsigned)
    selfsigned.add_argument("--name", action="append", default=[],
                            help="another DNS name or IP address clients use (repeatable)")
    selfsigned.add_argument("--days", type=int, default=825)

    audit = sub.add_parser("audit", help="read the audit trail")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    tail = audit_sub.add_parser("tail", help="the last lines, oldest first")
    common(tail)
    tail.add_argument("-n", "--lines", type=int, default=20)
    tail.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    tail.add_argument("--json", action="store_true", help="raw JSON lines")


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        from .users import UserError
        raise UserError("the two passwords differ")
    return first


def _audit(settings: Any) -> Any:
    from .audit import AuditLog
    return AuditLog(settings.audit_path, settings.audit.max_mb * 2**20, settings.audit.keep,
                    settings.audit.question_text)


def _authority(settings: Any) -> Any:
    from .tokens import token_authority
    return token_authority(settings)


def cmd_users(args: argparse.Namespace, settings: Any) -> int:
    from . import users
    from .store import Store

    store = Store(settings.db_path)
    audit = _audit(settings)
    operator = f"cli:{getpass.getuser()}"
    try:
        if args.users_command == "list":
            for user in users.list_users(store):
                changed = time.strftime("%Y-%m-%d %H:%M", time.localtime(user.updated_at))
                print(f"{user.name:<32} {user.role:<6} password set {changed}")
            return 0
        if args.users_command == "add":
            users.check_name(args.name)
            user = users.add_user(store, args.name, args.role, _read_password(args))
            audit.record("user_added", user=operator, target=user.name, role=user.role)
            print(f"added {user.role} {user.name}", file=sys.stderr)
        elif args.users_command == "passwd":
            users.set_password(store, args.name, _read_password(args))
            _authority(settings).revoke_subject(args.name)
            audit.record("password_changed", user=operator, target=args.name)
            print(f"new password for {args.name}; their earlier logins are ended",
                  file=sys.stderr)
        else:
            users.remove_user(store, args.name)
            _authority(settings).revoke_subject(args.name)
            audit.record("user_removed", user=operator, target=args.name)
            print(f"removed {args.name}; their logins are ended", file=sys.stderr)
        return 0
    finally:
        store.close()
        audit.close()


def cmd_token(args: argparse.Namespace, settings: Any) -> int:
    from .tokens import parse_ttl

    authority = _authority(settings)
    audit = _audit(settings)
    operator = f"cli:{getpass.getuser()}"
    try:
        if args.token_command == "issue":
            token, principal = authority.issue(args.sub, args.role, parse_ttl(args.ttl))
            audit.record("token_issued", user=operator, target=principal.sub,
                         role=principal.role, jti=principal.jti, expires=principal.expires)
            if args.json:
                print(json.dumps({"token": token, "sub": principal.sub, "role": principal.role,
                                  "jti": principal.jti, "expires": principal.expires}))
            else:
                print(token)
        elif args.token_command == "revoke":
            if args.jti:
                expires = args.expires or time.time() + authority.max_ttl_s
                authority.revoke_token(args.jti, expires)
                audit.record("token_revoked", user=operator, jti=args.jti)
                print(f"token {args.jti} revoked", file=sys.stderr)
            else:
                authority.revoke_subject(args.sub)
                audit.record("token_revoked", user=operator, target=args.sub)
                print(f"every token of {args.sub} issued until now is revoked", file=sys.stderr)
        else:
            keys = authority.store.rotate(retire_now=args.retire_now)
            audit.record("key_rotated", user=operator, kid=keys.current.kid,
                         retire_now=args.retire_now)
            kept = len(keys.keys) - 1
            print(f"signing with key {keys.current.kid}; {kept} older key(s) still verify "
                  "until their tokens expire" if kept else
                  f"signing with key {keys.current.kid}; every older token stopped working",
                  file=sys.stderr)
        return 0
    finally:
        audit.close()


def cmd_tls(args: argparse.Namespace, settings: Any) -> int:
    from .tls import make_self_signed

    cert, key = make_self_signed(settings.data_dir / "tls", args.name, args.days)
    print(f"certificate {cert}\nprivate key {key}\nserve it with:\n"
          f"  --set tls.certificate={cert} --set tls.private_key={key}\n"
          "(browsers warn about a self-signed certificate until told to trust it)")
    return 0


def cmd_audit(args: argparse.Namespace, settings: Any) -> int:
    from .audit import follow, read_lines

    path = settings.audit_path
    if not path.exists():
        print(f"no audit log at {path} yet", file=sys.stderr)
        return 0 if not args.follow else _follow(path, args.json, follow)
    for entry in read_lines(path, max(1, args.lines)):
        _print_entry(entry, args.json)
    return _follow(path, args.json, follow) if args.follow else 0


def _follow(path: Any, as_json: bool, follow: Any) -> int:
    while not path.exists():
        time.sleep(0.5)
    for entry in follow(path):
        _print_entry(entry, as_json)
    return 0


def _print_entry(entry: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(entry, ensure_ascii=False), flush=True)
        return
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(entry.get("time", 0))))
    core = {"time", "event", "user", "address", "request", "outcome"}
    extra = " ".join(f"{k}={v}" for k, v in entry.items() if k not in core)
    print(f"{when} {entry.get('event', '?'):<18} {entry.get('outcome', ''):<14} "
          f"{entry.get('user') or '-':<16} {entry.get('address') or '-':<15} {extra}".rstrip(),
          flush=True)


def token_from_env(explicit: str | None) -> str | None:
    """`edgekb ask --token`, else $EDGEKB_TOKEN."""
    return explicit or os.environ.get("EDGEKB_TOKEN") or None
