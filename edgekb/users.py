"""People who sign in on the web page: names, roles and scrypt password hashes in SQLite.

Roles: ``admin`` manages documents, users and reindexing; ``user`` asks and sees their own
sessions. Passwords are hashed with the standard library's scrypt (a per-user random salt, the
parameters stored with each hash so they can be raised later) and compared in constant time. A
name that does not exist costs the same scrypt run as a wrong password, so timing does not tell
which names exist. Blocking functions over a ``Store``: the server calls them on a thread.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import re
import time
from dataclasses import dataclass

from .errors import EdgekbError
from .store import Store
from .tokens import ROLES

# 32 MiB and about 150 ms on the 2-core development VM (0.5 s on a Pi 4): slow enough to make
# guessing expensive, light enough for a board that also runs an LLM. Logins are serialised on
# one thread, so concurrent logins never multiply the memory.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 15, 8, 1
_MAXMEM = 64 * 1024 * 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 1024


class UserError(EdgekbError):
    code = "invalid_user"


class UnknownUser(UserError):
    code = "unknown_user"


@dataclass(frozen=True)
class User:
    name: str
    role: str
    created_at: float
    updated_at: float


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise UserError(f"user name {name!r}: use 1-64 of A-Z a-z 0-9 _ . @ -, "
                        "starting with a letter or digit")
    return name


def check_password(password: str) -> str:
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise UserError(f"a password needs {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} "
                        "characters")
    return password


def hash_password(password: str, salt: bytes | None = None,
                  n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """``scrypt$n$r$p$salt$hash``, salt and hash in base64."""
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM,
                            dklen=32)
    return "$".join(["scrypt", str(n), str(r), str(p), base64.b64encode(salt).decode(),
                     base64.b64encode(digest).decode()])


@functools.cache
def _dummy_hash() -> str:
    """Checked against when the name does not exist, so both cases take one scrypt run."""
    return hash_password("not a password", salt=b"\0" * 16)


def password_matches(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = base64.b64decode(hash_password(password, base64.b64decode(salt), int(n),
                                                int(r), int(p)).rsplit("$", 1)[1])
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def add_user(store: Store, name: str, role: str, password: str) -> User:
    check_name(name)
    if role not in ROLES:
        raise UserError(f"role {role!r}: expected one of {', '.join(ROLES)}")
    hashed = hash_password(check_password(password))
    now = time.time()
    with store.transaction():
        if store.conn.execute("SELECT 1 FROM users WHERE name=?", (name,)).fetchone():
            raise UserError(f"user {name!r} already exists (edgekb users passwd to change "
                            "the password)")
        store.conn.execute("INSERT INTO users (name, role, password, created_at, updated_at)"
                           " VALUES (?,?,?,?,?)", (name, role, hashed, now, now))
    return User(name, role, now, now)


def set_password(store: Store, name: str, password: str) -> None:
    hashed = hash_password(check_password(password))
    with store.transaction():
        cur = store.conn.execute("UPDATE users SET password=?, updated_at=? WHERE name=?",
                                 (hashed, time.time(), name))
    if cur.rowcount != 1:
        raise UnknownUser(f"no user {name!r}")


def remove_user(store: Store, name: str) -> None:
    with store.transaction():
        cur = store.conn.execute("DELETE FROM users WHERE name=?", (name,))
    if cur.rowcount != 1:
        raise UnknownUser(f"no user {name!r}")


def list_users(store: Store) -> list[User]:
    rows = store.conn.execute(
        "SELECT name, role, created_at, updated_at FROM users ORDER BY name").fetchall()
    return [User(*row) for row in rows]


def password_row(store: Store, name: str) -> tuple[User, str] | None:
    """The user and their stored hash (SQLite only; the scrypt check is ``check_login``)."""
    if not _NAME.match(name):
        return None
    row = store.conn.execute("SELECT name, role, password, created_at, updated_at FROM users"
                             " WHERE name=?", (name,)).fetchone()
    return (User(row[0], row[1], row[3], row[4]), row[2]) if row else None


def check_login(row: tuple[User, str] | None, password: str) -> User | None:
    """The user when the password matches, else None, after one scrypt run either way."""
    stored = row[1] if row else _dummy_hash()
    ok = password_matches(password[:MAX_PASSWORD_CHARS], stored)
    return row[0] if row and ok else None
