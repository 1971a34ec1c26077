"""The pool's trust: a secret token, and mutual TLS keyed by it.

A pool token is 256 random bits (``secrets``), written as hex to a file of mode 0600.
Every member of the pool holds the same file. From the token, each side derives the
same Ed25519 key with HKDF-SHA256 (``cryptography``) and the same self-signed
certificate (Ed25519 signatures are deterministic, and every field is fixed), so the
certificate is identical wherever the token is. The coordinator serves TLS 1.3 with
it and requires the agent to present it too; each side trusts only that certificate.
So a connection completes only between two holders of the token, and it is
encrypted:

- the token itself never travels; each side proves it holds the derived key inside
  TLS 1.3's handshake (Python's ``ssl``, OpenSSL), fresh randoms on both sides, so a
  recorded handshake replayed later fails;
- someone without the token can neither join nor pose as the coordinator.

Python's ``ssl`` has no TLS-PSK before 3.13, which is why the key becomes a
certificate. No primitive here is written by hand: HKDF, Ed25519, X.509 and TLS are
``cryptography``'s and OpenSSL's. What the token does not protect (every member can
pose as any other; gloo's data connections) is in docs/security.md.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import ssl
import stat
import tempfile
from functools import lru_cache
from pathlib import Path

from edgepool.errors import SpecError

TOKEN_BYTES = 32
SERVER_NAME = "edgepool-pool"  # the name in the pool certificate; TLS checks it
_HEX = re.compile(r"^[0-9a-f]{64}$")


def new_token(path: str | Path) -> Path:
    """Write a fresh token to ``path`` (mode 0600). An existing file is never overwritten."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise SpecError(f"{path} exists; a token is never overwritten (remove it first, or choose another file)")
    if not path.parent.is_dir():
        raise SpecError(f"cannot write the token to {path}: {path.parent} is not a folder")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise SpecError(f"cannot write the token to {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(TOKEN_BYTES) + "\n")
    os.chmod(path, 0o600)  # whatever the umask
    return path


def read_token(path: str | Path | None) -> bytes:
    """The token in ``path``: a regular file of 64 hex digits that only its owner can read."""
    if path is None:
        raise SpecError("no pool token: pass --token FILE (the file `edgepool token new` or `edgepool serve` wrote)")
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise SpecError(f"cannot read the pool token {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode) or st.st_size > 256:
        raise SpecError(f"the pool token {path} is not a token file (64 hex digits); make one with `edgepool token new`")
    if st.st_mode & 0o077:
        raise SpecError(f"the pool token {path} can be read by others (mode {stat.S_IMODE(st.st_mode):o}); "
                        f"run `chmod 600 {path}`")
    text = path.read_bytes().decode("ascii", errors="replace").strip()
    if not _HEX.match(text):
        raise SpecError(f"the pool token {path} is not a token file (64 hex digits); make one with `edgepool token new`")
    return bytes.fromhex(text)


@lru_cache(maxsize=8)
def _material(token: bytes) -> tuple[bytes, bytes]:
    """(private key PEM, certificate PEM), the same wherever the token is."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    from cryptography.x509.oid import NameOID

    seed = HKDF(hashes.SHA256(), 32, salt=b"edgepool pool", info=b"edgepool tls key v1").derive(token)
    key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
    utc = datetime.timezone.utc
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1 + int.from_bytes(hashlib.sha256(seed).digest()[:15], "big"))
            .not_valid_before(datetime.datetime(2000, 1, 1, tzinfo=utc))
            .not_valid_after(datetime.datetime(2999, 1, 1, tzinfo=utc))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
            .sign(key, None))
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return pem_key, cert.public_bytes(serialization.Encoding.PEM)


def pool_id(token: bytes) -> str:
    """A short public name of the pool (a hash of its certificate), to check two hosts hold the same token."""
    return hashlib.sha256(_material(token)[1]).hexdigest()[:12]


def tls_context(token: bytes, *, server: bool) -> ssl.SSLContext:
    """TLS 1.3, both sides present the pool certificate, and trust nothing else."""
    pem_key, pem_cert = _material(token)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    with tempfile.TemporaryDirectory(prefix="edgepool-tls-") as d:  # ssl loads keys from files only; 0700
        f = Path(d) / "pool.pem"
        fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem_key + pem_cert)
        ctx.load_cert_chain(f)
    ctx.load_verify_locations(cadata=pem_cert.decode())
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not server:
        ctx.check_hostname = True
    return ctx
