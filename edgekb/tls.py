"""TLS for https and wss: the server's SSL context, and a self-signed pair for a first install.

`edgekb tls self-signed` runs the openssl binary (present on Debian and Raspberry Pi OS): it adds
nothing to the server's memory and no Python package to the install, where the cryptography
package would add about 11 MB of RSS to every process that imports PyJWT once it is installed
(scripts/bench_tls_cert measures both). The key is an ECDSA P-256 key (fast handshakes on a
Pi), written mode 0600; the certificate names localhost, this host's name and the names and
addresses given, so browsers that are told to trust it match it.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
from pathlib import Path

from .errors import EdgekbError

DEFAULT_DAYS = 825  # the longest validity Apple platforms accept for a TLS server certificate


class TlsError(EdgekbError):
    code = "tls_invalid"


def server_context(certificate: str, private_key: str) -> ssl.SSLContext | None:
    """The SSL context for the configured pair; None when TLS is not configured."""
    if not certificate and not private_key:
        return None
    if not certificate or not private_key:
        raise TlsError("set both tls.certificate and tls.private_key (or neither)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certificate, private_key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot load tls.certificate {certificate} with tls.private_key "
                       f"{private_key}: {exc}") from None
    return context


def subject_names(extra: list[str]) -> list[str]:
    """subjectAltName entries: localhost, this host, loopback, and what the admin named."""
    host = socket.gethostname()
    names = ["localhost", host, f"{host}.local", "127.0.0.1", "::1", *extra]
    entries, seen = [], set()
    for name in names:
        if not name or name.lower() in seen:
            continue
        seen.add(name.lower())
        try:
            ipaddress.ip_address(name)
            entries.append(f"IP:{name}")
        except ValueError:
            entries.append(f"DNS:{name}")
    return entries


def make_self_signed(folder: Path, names: list[str], days: int = DEFAULT_DAYS) -> tuple[Path, Path]:
    """cert.pem and key.pem in ``folder`` (the key mode 0600), written atomically."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise TlsError("the openssl program is needed: apt-get install openssl")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    with tempfile.TemporaryDirectory(dir=folder, prefix=".new-") as tmp:
        tmp_cert, tmp_key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        command = [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                   "ec_paramgen_curve:prime256v1", "-nodes", "-sha256", "-days", str(days),
                   "-subj", f"/CN={socket.gethostname()}", "-keyout", str(tmp_key),
                   "-out", str(tmp_cert), "-addext",
                   "subjectAltName=" + ",".join(subject_names(names)),
                   "-addext", "extendedKeyUsage=serverAuth"]
        old_umask = os.umask(0o077)
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                                    check=False)
        finally:
            os.umask(old_umask)
        if result.returncode != 0:
            raise TlsError(f"openssl failed: {result.stderr.strip()[-500:]}")
        os.chmod(tmp_key, 0o600)
        os.replace(tmp_key, key)
        os.replace(tmp_cert, cert)
    return cert, key
