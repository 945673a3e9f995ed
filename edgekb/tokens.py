"""Signed tokens: the signing keys in the data dir, issuing, verifying and revoking JWTs.

Every credential the appliance accepts is a JWT (a login from the page, a device token from
`edgekb token issue`). Verification trusts nothing in the token's header: the key is picked by
`kid`, and the algorithm must be both in the configured allow-list and the one that key was made
for, so `alg: none` and HS/RS confusion (an RSA public key used as an HMAC secret) fail before
any signature is checked. `exp`, `iat`, `iss`, `aud`, `sub`, `jti` and `role` are required.

Keys, revoked token ids and per-user "not before" times live in one JSON file, <data_dir>/auth/
keys.json (mode 0600), written atomically under a lock by the server and the CLI alike; a
verifier re-reads it when it changed (one stat per check), so a revocation or a rotation made by
the CLI takes effect on a running server at once. Rotation makes a new signing key and keeps the
old ones for verification until every token they signed has expired: nobody is logged out.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

from .config import Settings, split_list
from .errors import EdgekbError

ROLES = ("admin", "user")
REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub", "jti"]
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
EXTERNAL_KID = "external"
_SECRET_BYTES = 32  # 256-bit HMAC keys, as RFC 7518 asks for HS256
_TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
KEY_RETENTION_MARGIN_S = 600.0
VERIFIED_CACHE = 1024  # beyond the longest token life: clock skew, leeway


class Unauthorized(EdgekbError):
    """A missing, malformed, expired, revoked or wrongly signed credential."""

    code = "unauthorized"


class TokenRequestInvalid(EdgekbError):
    """`token issue` was asked for something it must not sign."""

    code = "invalid_token_request"


@dataclass(frozen=True)
class Principal:
    """Who a verified credential belongs to."""

    sub: str
    role: str
    jti: str
    expires: float
    issued: float
    csrf: str = ""       # set for page logins: the value a state-changing request must echo
    via: str = "none"    # header | cookie | subprotocol | none (auth disabled)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class SigningKey:
    kid: str
    alg: str
    secret: bytes
    created: float
    retired: float | None = None


@dataclass
class KeyFile:
    """The parsed keys.json: signing keys (newest last) and revocations."""

    keys: list[SigningKey] = field(default_factory=list)
    revoked: dict[str, float] = field(default_factory=dict)      # jti -> exp (pruned after)
    not_before: dict[str, float] = field(default_factory=dict)   # sub -> tokens older refused

    @property
    def current(self) -> SigningKey:
        return next(k for k in reversed(self.keys) if k.retired is None)

    def to_json(self) -> str:
        return json.dumps({
            "keys": [{"kid": k.kid, "alg": k.alg, "created": k.created, "retired": k.retired,
                      "secret": base64.urlsafe_b64encode(k.secret).decode()} for k in self.keys],
            "revoked": self.revoked, "not_before": self.not_before}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> KeyFile:
        raw = json.loads(text)
        keys = [SigningKey(k["kid"], k["alg"], base64.urlsafe_b64decode(k["secret"]),
                           float(k["created"]), k.get("retired")) for k in raw["keys"]]
        return cls(keys, {str(j): float(e) for j, e in raw.get("revoked", {}).items()},
                   {str(s): float(t) for s, t in raw.get("not_before", {}).items()})


def parse_ttl(text: str) -> float:
    """"8h" -> 28800.0; units s, m, h, d."""
    text = text.strip().lower()
    number, unit = (text[:-1], text[-1]) if text and text[-1] in _TTL_UNITS else (text, "s")
    try:
        value = float(number) * _TTL_UNITS[unit]
    except ValueError:
        raise TokenRequestInvalid(f"--ttl {text!r}: expected a duration like 30m, 8h or 7d") \
            from None
    if not 0 < value < float("inf"):
        raise TokenRequestInvalid(f"--ttl {text!r}: must be more than 0")
    return value


class KeyStore:
    """keys.json in <data_dir>/auth: read-modify-write under a lock, atomic replace."""

    def __init__(self, data_dir: Path, algorithm: str = "HS256",
                 max_ttl_s: float = 720 * 3600) -> None:
        self.dir = data_dir / "auth"
        self.path = self.dir / "keys.json"
        self.algorithm = algorithm if algorithm in HMAC_ALGORITHMS else "HS256"
        # A retired key verifies this long after it stopped signing: its last tokens expire.
        self.retention_s = max_ttl_s + KEY_RETENTION_MARGIN_S

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def read(self) -> KeyFile:
        """The key file, made with a first key when there is none yet."""
        try:
            return KeyFile.from_json(self.path.read_text())
        except FileNotFoundError:
            return self.update(lambda keys: None)

    def update(self, change: Any) -> KeyFile:
        """Apply ``change(KeyFile)`` under the lock and store the result durably."""
        with self._locked():
            try:
                keys = KeyFile.from_json(self.path.read_text())
            except FileNotFoundError:
                keys = KeyFile()
            if not any(k.retired is None for k in keys.keys):
                keys.keys.append(self._new_key())
            change(keys)
            self._prune(keys)
            self._write(keys.to_json())
            return keys

    def _new_key(self) -> SigningKey:
        return SigningKey("k-" + secrets.token_hex(6), self.algorithm,
                          secrets.token_bytes(_SECRET_BYTES), time.time())

    def rotate(self, retire_now: bool = False) -> KeyFile:
        """A new signing key; the old ones keep verifying until their tokens expired (or, with
        ``retire_now`` after a leak, are dropped at once: everybody signs in again)."""
        def change(keys: KeyFile) -> None:
            now = time.time()
            keys.keys = [] if retire_now else [
                SigningKey(k.kid, k.alg, k.secret, k.created,
                           k.retired if k.retired is not None else now) for k in keys.keys]
            keys.keys.append(self._new_key())
        return self.update(change)

    def _prune(self, keys: KeyFile) -> None:
        """Forget what can no longer matter: keys retired longer ago than any token lives,
        revocations of tokens that expired anyway (the file stays small)."""
        now = time.time()
        keys.keys = [k for k in keys.keys
                     if k.retired is None or k.retired + self.retention_s > now]
        keys.revoked = {jti: exp for jti, exp in keys.revoked.items() if exp > now}

    def _write(self, text: str) -> None:
        tmp = self.path.with_name(".keys.json.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class TokenAuthority:
    """Issues and verifies tokens against the key file, which it re-reads when it changes."""

    def __init__(self, store: KeyStore, *, algorithms: list[str], issuer: str, audience: str,
                 leeway_s: float, max_ttl_s: float, external_key: Any = None,
                 external_alg: str = "") -> None:
        self.store = store
        self.algorithms = [a for a in algorithms if a.lower() != "none"]
        self.issuer = issuer
        self.audience = audience
        self.leeway_s = leeway_s
        self.max_ttl_s = max_ttl_s
        self.external_key = external_key
        self.external_alg = external_alg
        self._stamp: tuple[int, int, int] | None = None
        self._keys = KeyFile()
        # Tokens already verified with the current key file -> their claims. PyJWT takes
        # about 100 us a token; a page or a script sends the same token many times.
        self._verified: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.refresh()

    def refresh(self) -> None:
        """Re-read keys.json when its inode, size or mtime changed (a stat per call)."""
        try:
            st = self.store.path.stat()
        except FileNotFoundError:
            self._keys = self.store.read()
            st = self.store.path.stat()
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self._stamp:
            self._keys = KeyFile.from_json(self.store.path.read_text())
            self._stamp = stamp
            self._verified.clear()  # a key may be gone: verify every token afresh

    def issue(self, sub: str, role: str, ttl_s: float, csrf: str = "") -> tuple[str, Principal]:
        if role not in ROLES:
            raise TokenRequestInvalid(f"role {role!r}: expected one of {', '.join(ROLES)}")
        if not sub or len(sub) > 128 or sub != sub.strip():
            raise TokenRequestInvalid("the subject must be 1-128 characters, no outer spaces")
        if ttl_s > self.max_ttl_s:
            raise TokenRequestInvalid(f"ttl of {ttl_s:.0f} s is over auth.max_token_ttl_h "
                                      f"({self.max_ttl_s / 3600:g} h)")
        self.refresh()
        key = self._keys.current
        now = time.time()
        claims: dict[str, Any] = {"iss": self.issuer, "aud": self.audience, "sub": sub,
                                  "role": role, "iat": round(now, 3), "exp": int(now + ttl_s),
                                  "jti": secrets.token_urlsafe(12)}
        if csrf:
            claims["csrf"] = csrf
        token = jwt.encode(claims, key.secret, algorithm=key.alg, headers={"kid": key.kid})
        return token, _principal(claims, "issued")

    def verify(self, token: str, via: str) -> Principal:
        self.refresh()
        claims = self._verified.get(token)
        if claims is None:
            claims = self._decode(token)
            self._verified[token] = claims
            while len(self._verified) > VERIFIED_CACHE:
                self._verified.popitem(last=False)
        else:  # verified before with these keys: only what changes with time is checked
            self._verified.move_to_end(token)
            if claims["exp"] <= time.time() - self.leeway_s:
                del self._verified[token]
                raise Unauthorized("the token has expired; sign in again")
        if claims["jti"] in self._keys.revoked:
            raise Unauthorized("the token was revoked")
        if claims["iat"] < self._keys.not_before.get(claims["sub"], 0):
            raise Unauthorized("the token was revoked; sign in again")
        return _principal(claims, via)

    def still_valid(self, principal: Principal) -> bool:
        """Whether a credential verified earlier (an open WebSocket's) has neither expired nor
        been revoked since: a dict lookup and a stat."""
        self.refresh()
        return principal.expires > time.time() - self.leeway_s and \
            principal.jti not in self._keys.revoked and \
            principal.issued >= self._keys.not_before.get(principal.sub, 0)

    def _decode(self, token: str) -> dict[str, Any]:
        """The claims of a token whose header, key, signature and claims are all valid."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("the token is not a well-formed JWT") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in self.algorithms:
            raise Unauthorized(f"tokens signed with {alg!r} are not accepted")
        key, key_alg = self._key_for(kid)
        if key_alg != alg:
            raise Unauthorized("the token's algorithm does not match its key")
        try:
            claims = jwt.decode(token, key, algorithms=[key_alg], audience=self.audience,
                                issuer=self.issuer, leeway=self.leeway_s,
                                options={"require": REQUIRED_CLAIMS, "strict_aud": True})
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the token has expired; sign in again") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"the token lacks the {exc.claim!r} claim") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"the token was refused: {exc}") from None
        if claims.get("role") not in ROLES:
            raise Unauthorized("the token carries no valid role")
        if not isinstance(claims["sub"], str) or not isinstance(claims["jti"], str):
            raise Unauthorized("the token's sub and jti must be strings")
        return claims

    def _key_for(self, kid: Any) -> tuple[Any, str]:
        for key in self._keys.keys:
            if key.kid == kid:
                return key.secret, key.alg
        if self.external_key is not None:  # not one of ours: the other issuer's, or nobody's
            return self.external_key, self.external_alg
        raise Unauthorized("the token's signing key is unknown (rotated out?)")

    def revoke_token(self, jti: str, expires: float) -> None:
        self.store.update(lambda keys: keys.revoked.__setitem__(jti, expires))
        self.refresh()

    def revoke_subject(self, sub: str) -> None:
        """Every token of ``sub`` issued until now stops working (a removed user, a lost
        device); tokens issued afterwards work."""
        # Our tokens carry iat in milliseconds, so "until now" is exact.
        self.store.update(lambda keys: keys.not_before.__setitem__(sub, time.time()))
        self.refresh()


def _principal(claims: dict[str, Any], via: str) -> Principal:
    return Principal(claims["sub"], claims["role"], claims["jti"], float(claims["exp"]),
                     float(claims["iat"]), str(claims.get("csrf", "")), via)


def load_external_key(path: Path) -> tuple[Any, str]:
    """A PEM public key of another issuer and the one algorithm it verifies."""
    try:
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
    except ImportError:
        raise EdgekbError("auth.public_key_file needs the cryptography package: "
                          "pip install 'edgekb[sso]'") from None
    try:
        key = load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise EdgekbError(f"auth.public_key_file {path}: not a PEM public key ({exc})") from None
    if isinstance(key, rsa.RSAPublicKey):
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1":
        return key, "ES256"
    raise EdgekbError(f"auth.public_key_file {path}: only RSA and P-256 keys are supported")


def token_authority(settings: Settings) -> TokenAuthority:
    """The authority for the configured keys and rules (server and CLI alike)."""
    auth = settings.auth
    algorithms = split_list(auth.algorithms)
    hmac_alg = next((a for a in algorithms if a.startswith("HS")), "HS256")
    external, external_alg = (None, "")
    if auth.public_key_file:
        external, external_alg = load_external_key(Path(auth.public_key_file).expanduser())
    max_ttl_s = auth.max_token_ttl_h * 3600
    return TokenAuthority(KeyStore(settings.data_dir, hmac_alg, max_ttl_s),
                          algorithms=algorithms, issuer=auth.issuer, audience=auth.audience,
                          leeway_s=auth.leeway_s, max_ttl_s=max_ttl_s, external_key=external,
                          external_alg=external_alg)
