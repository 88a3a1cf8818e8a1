"""Trust in the mesh: a mesh CA, node and client identities, mutual TLS 1.3, a signed revocation list.

Zero trust.  Discovery (mDNS) is a hint; a peer is a member only when all of these hold:

1. it completed a mutual TLS 1.3 handshake with a certificate issued by the mesh CA
   (``server_context`` / ``client_context``: only the mesh CA is trusted, never the system's);
2. that certificate names the node id its ``Hello`` claims, with a role that allows what it
   claims to be (``check_peer``: a client certificate may not act as a node);
3. neither its name nor its serial is on the CA-signed revocation list (``check_peer``).

Files.  The CA directory lives on the operator's machine, never on a node::

    ca.key        ECDSA P-256 private key, PKCS#8 PEM, mode 0600
    ca.crt        self-signed CA certificate (CA:true, pathlen 0, keyCertSign + cRLSign)
    revoked.json  the current signed revocation list (see ``RevocationList``)
    issued.json   every certificate issued: name, role, serial, validity, fingerprint (unsigned, local)

An identity directory (one per node or caller, made by ``ca_issue``)::

    cert.pem      the certificate: CN=name, SAN URI meshai:<role>:<name>, EKU (node: serverAuth +
                  clientAuth; client: clientAuth), the X25519 public key in a private extension
    key.pem       its ECDSA P-256 private key, PKCS#8 PEM, mode 0600
    ca.pem        the mesh CA certificate (the only trust anchor)
    x25519.key    X25519 private key for encrypted model packages, PKCS#8 PEM, mode 0600
    x25519.pub    its public key, SubjectPublicKeyInfo PEM (also inside cert.pem, see ``x25519_from_cert``)
    revoked.json  the newest revocation list this identity has seen (refreshed from peers)

Names are 1-63 characters of ``[A-Za-z0-9._-]`` starting with a letter or digit (one DNS label).
A revoked name can never be issued again; an issued, unrevoked name is issued again only with
``replace=True``, which revokes the old certificates' serials (rotation, e.g. after a key leak).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import logging
import math
import os
import re
import ssl
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, ParamSpec, Protocol, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshai.errors import ConfigError, MeshaiError, SecurityError
from meshai.protocol.messages import ROLES

try:  # CA operations lock the CA directory where the platform can
    import fcntl
except ImportError:  # pragma: no cover - not on Linux
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "ISSUED",
    "REVOKED",
    "ROLES",
    "Identity",
    "PeerIdentity",
    "RevocationList",
    "adopt_revocations",
    "ca_init",
    "ca_issue",
    "ca_revoke",
    "cert_fingerprint",
    "check_name",
    "check_peer",
    "client_context",
    "load_identity",
    "load_revocations",
    "newer",
    "peer_id_from_cert",
    "save_revocations",
    "server_context",
    "x25519_from_cert",
]

log = logging.getLogger(__name__)
_P = ParamSpec("_P")
_R = TypeVar("_R")

# CA directory
CA_KEY: Final = "ca.key"
CA_CERT: Final = "ca.crt"
REVOKED: Final = "revoked.json"
ISSUED: Final = "issued.json"
_LOCK = ".lock"
# identity directory
CERT: Final = "cert.pem"
KEY: Final = "key.pem"
CA_PEM: Final = "ca.pem"
X25519_KEY: Final = "x25519.key"
X25519_PUB: Final = "x25519.pub"
_IDENTITY_FILES = (CERT, KEY, CA_PEM, X25519_KEY, X25519_PUB)

URI_SCHEME: Final = "meshai"
X25519_OID: Final = x509.ObjectIdentifier("2.25.181400016590189416212914315287993186297")
"""Private (UUID-based) extension OID: the identity's X25519 public key as a DER OCTET STRING."""

REVOCATIONS_FORMAT: Final = "meshai-revocations/1"
_ISSUED_FORMAT = "meshai-issued/1"
MAX_REVOCATION_BYTES: Final = 1 << 20
"""A revocation list from a peer larger than this is refused unread."""
MAX_REVOKED: Final = 20_000
"""At most this many names, and as many serials, in a revocation list."""

MAX_DAYS: Final = 36_500
BACKDATE: Final = dt.timedelta(hours=1)
"""Certificates start this long before issuance, for nodes whose clocks are a little behind."""

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_SERIAL_RE = re.compile(r"[1-9a-f][0-9a-f]{0,39}")
_MAX_SERIAL = 1 << 159  # RFC 5280: at most 20 octets, positive


# --------------------------------------------------------------------------- small helpers


def check_name(name: object) -> str:
    """Return ``name`` if it is a valid identity name (1-63 of [A-Za-z0-9._-], alnum first); ConfigError."""
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise ConfigError(
            f"identity name must be 1-63 characters of [A-Za-z0-9._-] starting with a letter or digit, "
            f"got {name!r}"
        )
    return name


def _check_role(role: object) -> str:
    if role not in ROLES:
        raise ConfigError(f"role must be one of {ROLES}, got {role!r}")
    assert isinstance(role, str)
    return role


def _check_days(days: object) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise ConfigError(f"days must be an integer in 1..{MAX_DAYS}, got {days!r}")
    return days


def _now(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    if not isinstance(now, dt.datetime) or now.tzinfo is None:
        raise ConfigError(f"now must be a timezone-aware datetime, got {now!r}")
    return now.astimezone(dt.UTC)


def _when(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cert_fingerprint(cert: x509.Certificate | bytes) -> str:
    """SHA-256 hex of a certificate's DER (``Advert.fingerprint``); takes a certificate, DER or PEM."""
    if isinstance(cert, x509.Certificate):
        der = cert.public_bytes(serialization.Encoding.DER)
    elif cert.lstrip().startswith(b"-----BEGIN"):
        der = _load_cert(cert, "certificate").public_bytes(serialization.Encoding.DER)
    else:
        der = bytes(cert)
    return hashlib.sha256(der).hexdigest()


def _load_cert(data: bytes, what: str) -> x509.Certificate:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise SecurityError(f"{what} is not a valid X.509 certificate: {exc}") from None


def _as_cert(ca: x509.Certificate | bytes) -> x509.Certificate:
    return ca if isinstance(ca, x509.Certificate) else _load_cert(ca, "CA certificate")


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _private_pem(key: ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename) with exactly ``mode``."""
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SecurityError(f"{what} {path} is missing") from None
    except OSError as exc:
        raise SecurityError(f"cannot read {what} {path}: {exc.strerror}") from None


def _filesystem(what: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Decorator: an OSError (permissions, a full disk) becomes a ConfigError saying what failed."""

    def wrap(func: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(func)
        def inner(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return func(*args, **kwargs)
            except OSError as exc:
                raise ConfigError(f"cannot {what}: {exc}") from None

        return inner

    return wrap


@contextlib.contextmanager
def _locked(ca_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the CA directory (serialises issue and revoke)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(ca_dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- revocation list


def _serial_hex(serial: int) -> str:
    return format(serial, "x")


@dataclass(frozen=True)
class RevocationList:
    """The CA-signed list of revoked names and serials; ``version`` only grows.

    Wire and file form (``to_bytes``): canonical JSON (sorted keys, no spaces, ASCII)::

        {"format":"meshai-revocations/1","issued_at":1767225600.5,"names":["n3"],
         "serials":["5f1c…"],"signature":"<base64 DER ECDSA-SHA256>","version":4}

    ``serials`` are lowercase hex without ``0x``.  The signature covers the same JSON without the
    ``signature`` key.  Build one only through ``ca_init``/``ca_revoke`` or ``from_bytes``; trust
    one only after ``verify``.
    """

    version: int
    names: frozenset[str]
    serials: frozenset[int]
    issued_at: float
    signature: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if (
            isinstance(self.version, bool)
            or not isinstance(self.version, int)
            or not 0 <= self.version < 2**53
        ):
            raise ConfigError(f"revocation list version must be an integer in 0..2**53, got {self.version!r}")
        if not isinstance(self.names, frozenset) or not isinstance(self.serials, frozenset):
            raise ConfigError("revocation list names and serials must be frozensets")
        if len(self.names) > MAX_REVOKED or len(self.serials) > MAX_REVOKED:
            raise ConfigError(f"revocation list holds more than {MAX_REVOKED} names or serials")
        for name in self.names:
            check_name(name)
        for serial in self.serials:
            if isinstance(serial, bool) or not isinstance(serial, int) or not 0 < serial < _MAX_SERIAL:
                raise ConfigError(f"revoked serial must be a positive integer under 2**159, got {serial!r}")
        issued_at = self.issued_at
        if (
            isinstance(issued_at, bool)
            or not isinstance(issued_at, int | float)
            or not math.isfinite(issued_at)
        ):
            raise ConfigError(f"revocation list issued_at must be a finite number, got {issued_at!r}")
        object.__setattr__(self, "issued_at", float(issued_at))
        if not isinstance(self.signature, bytes):
            raise ConfigError(f"revocation list signature must be bytes, got {type(self.signature).__name__}")

    def _payload(self) -> dict[str, Any]:
        return {
            "format": REVOCATIONS_FORMAT,
            "version": self.version,
            "names": sorted(self.names),
            "serials": [_serial_hex(s) for s in sorted(self.serials)],
            "issued_at": self.issued_at,
        }

    def signed_bytes(self) -> bytes:
        """The canonical bytes the CA signs (everything but the signature)."""
        return _canonical(self._payload())

    def to_bytes(self) -> bytes:
        """Canonical JSON of the list with its signature (the form in ``revoked.json`` and on the wire)."""
        payload = self._payload()
        payload["signature"] = base64.b64encode(self.signature).decode("ascii")
        return _canonical(payload)

    @classmethod
    def from_bytes(cls, data: bytes) -> RevocationList:
        """Parse ``to_bytes`` output from anyone; SecurityError if malformed.  Does NOT verify: call ``verify``."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise SecurityError(f"revocation list must be bytes, got {type(data).__name__}")
        if len(data) > MAX_REVOCATION_BYTES:
            raise SecurityError(f"revocation list of {len(data)} bytes exceeds {MAX_REVOCATION_BYTES}")
        try:
            doc = json.loads(
                bytes(data).decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_bad
            )
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            keys = {"format", "version", "names", "serials", "issued_at", "signature"}
            if set(doc) != keys:
                raise ValueError(f"keys must be {sorted(keys)}, got {sorted(doc)}")
            if doc["format"] != REVOCATIONS_FORMAT:
                raise ValueError(f"format must be {REVOCATIONS_FORMAT!r}, got {doc['format']!r}")
            names, serials, sig = doc["names"], doc["serials"], doc["signature"]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError("names must be a list of strings")
            if not isinstance(serials, list) or not all(
                isinstance(s, str) and _SERIAL_RE.fullmatch(s) for s in serials
            ):
                raise ValueError("serials must be a list of lowercase hex strings")
            if len(names) > MAX_REVOKED or len(serials) > MAX_REVOKED:
                raise ValueError(f"more than {MAX_REVOKED} names or serials")
            if len(set(names)) != len(names) or len(set(serials)) != len(serials):
                raise ValueError("duplicate names or serials")
            if not isinstance(sig, str) or len(sig) > 256:
                raise ValueError("signature must be a short base64 string")
            signature = base64.b64decode(sig.encode("ascii"), validate=True)
            return cls(
                version=doc["version"],
                names=frozenset(names),
                serials=frozenset(int(s, 16) for s in serials),
                issued_at=doc["issued_at"],
                signature=signature,
            )
        except (
            ValueError,
            ConfigError,
            UnicodeError,
        ) as exc:  # JSONDecodeError, binascii.Error are ValueErrors
            raise SecurityError(f"malformed revocation list: {exc}") from None

    def verify(self, ca: x509.Certificate | bytes) -> None:
        """Return if the mesh CA (certificate or its PEM/DER) signed this list; SecurityError otherwise."""
        ca_cert = _as_cert(ca)
        key = ca_cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise SecurityError("the mesh CA certificate does not hold an ECDSA key")
        try:
            key.verify(self.signature, self.signed_bytes(), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise SecurityError(
                f"revocation list v{self.version} is not signed by the mesh CA ({_subject(ca_cert)})"
            ) from None

    def is_revoked(self, name: str, serial: int | None = None) -> bool:
        """True if ``name`` is revoked, or ``serial`` (when given) is."""
        return name in self.names or (serial is not None and serial in self.serials)

    def _signed(self, ca_key: ec.EllipticCurvePrivateKey) -> RevocationList:
        unsigned = dataclasses.replace(self, signature=b"")
        sig = ca_key.sign(unsigned.signed_bytes(), ec.ECDSA(hashes.SHA256()))
        return dataclasses.replace(self, signature=sig)


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate keys")
    return out


def _bad(constant: str) -> None:
    raise ValueError(f"{constant} is not allowed")


def newer(a: RevocationList | None, b: RevocationList) -> RevocationList:
    """The newer of two (verified) lists: ``b`` if its version is higher than ``a``'s, else ``a``."""
    return b if a is None or b.version > a.version else a


def adopt_revocations(
    current: RevocationList | None, data: bytes, ca: x509.Certificate | bytes
) -> RevocationList:
    """Parse and verify a list received from a peer; return it if newer than ``current``, else ``current``.

    SecurityError if ``data`` is malformed or not signed by the mesh CA.  ``result is not current``
    means a newer list was adopted: save it (``save_revocations``), re-check open channels, pass it on.
    """
    received = RevocationList.from_bytes(data)
    received.verify(ca)
    return newer(current, received)


def load_revocations(path: str | os.PathLike[str], ca: x509.Certificate | bytes) -> RevocationList:
    """Read and verify ``revoked.json`` (``path`` is the file or a directory holding it); SecurityError."""
    p = Path(path)
    if p.is_dir():
        p = p / REVOKED
    crl = RevocationList.from_bytes(_read(p, "revocation list"))
    crl.verify(ca)
    return crl


@_filesystem("save the revocation list")
def save_revocations(path: str | os.PathLike[str], crl: RevocationList) -> bool:
    """Atomically write a verified ``crl`` to ``path`` (file or directory) unless the file already holds
    one at least as new; return whether it wrote.  An unreadable existing file is replaced."""
    p = Path(path)
    if p.is_dir():
        p = p / REVOKED
    with contextlib.suppress(OSError, SecurityError):
        if RevocationList.from_bytes(p.read_bytes()).version >= crl.version:
            return False
    _write(p, crl.to_bytes())
    return True


# --------------------------------------------------------------------------- certificates and identities


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def _meshai_uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [
        u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(f"{URI_SCHEME}:")
    ]


def _cert_identity(cert: x509.Certificate) -> tuple[str, str, int]:
    """(name, role, serial) of a certificate; SecurityError if it carries no meshai identity."""
    cns = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    uris = _meshai_uris(cert)
    if len(uris) > 1:
        raise SecurityError(f"certificate {_subject(cert)!r} names several meshai identities: {uris}")
    if uris:
        parts = uris[0].split(":")
        if len(parts) != 3 or parts[1] not in ROLES or _NAME_RE.fullmatch(parts[2]) is None:
            raise SecurityError(f"certificate {_subject(cert)!r} has a malformed meshai identity {uris[0]!r}")
        _, role, name = parts
        if cns and cns != [name]:
            raise SecurityError(f"certificate for {name!r} has a different common name {cns!r}")
        return name, role, cert.serial_number
    # No meshai URI: fall back to the common name, with the least privilege.
    if len(cns) == 1 and _NAME_RE.fullmatch(cns[0]) is not None:
        return cns[0], "client", cert.serial_number
    raise SecurityError(f"certificate {_subject(cert)!r} carries no meshai identity")


def peer_id_from_cert(der: bytes) -> tuple[str, str, int]:
    """(name, role, serial) from a certificate (DER or PEM): the SAN URI ``meshai:<role>:<name>``, or
    else the common name with role ``client``; SecurityError for a certificate without a meshai identity."""
    return _cert_identity(_load_cert(der, "peer certificate"))


def x25519_from_cert(cert: x509.Certificate | bytes) -> bytes:
    """The raw 32-byte X25519 package key a mesh certificate carries; SecurityError if it has none.

    Take it from a certificate the mesh CA signed (a peer's, after the handshake) to encrypt a
    package for that node without trusting anything else it says.
    """
    c = cert if isinstance(cert, x509.Certificate) else _load_cert(cert, "certificate")
    try:
        ext = c.extensions.get_extension_for_oid(X25519_OID).value
    except x509.ExtensionNotFound:
        raise SecurityError(f"certificate {_subject(c)!r} carries no X25519 package key") from None
    value = ext.value if isinstance(ext, x509.UnrecognizedExtension) else b""
    if len(value) != 34 or value[:2] != b"\x04\x20":
        raise SecurityError(f"certificate {_subject(c)!r} has a malformed X25519 package key")
    return value[2:]


@dataclass(frozen=True)
class Identity:
    """A node's or caller's credentials, as loaded (and checked) by ``load_identity``.

    ``x25519_private``/``x25519_public`` are the raw 32-byte package keys.  Private fields are
    left out of ``repr``.
    """

    name: str
    role: str
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    ca_pem: bytes = field(repr=False)
    x25519_private: bytes = field(repr=False)
    x25519_public: bytes = field(repr=False)
    directory: Path

    @property
    def certificate(self) -> x509.Certificate:
        """The parsed certificate."""
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def ca_certificate(self) -> x509.Certificate:
        """The parsed mesh CA certificate."""
        return x509.load_pem_x509_certificate(self.ca_pem)

    @property
    def fingerprint(self) -> str:
        """SHA-256 hex of the certificate's DER: what ``Advert.fingerprint`` carries."""
        return cert_fingerprint(self.certificate)

    @property
    def serial(self) -> int:
        """The certificate's serial number."""
        return int(self.certificate.serial_number)

    @property
    def not_after(self) -> dt.datetime:
        """When the certificate expires (UTC)."""
        return self.certificate.not_valid_after_utc


@dataclass(frozen=True)
class PeerIdentity:
    """Who a peer proved to be in its TLS handshake (``check_peer``'s answer)."""

    name: str
    role: str
    serial: int
    fingerprint: str
    not_after: dt.datetime

    def is_revoked(self, crl: RevocationList | None) -> bool:
        """True if ``crl`` revokes this peer's name or serial."""
        return crl is not None and crl.is_revoked(self.name, self.serial)


def _check_validity(cert: x509.Certificate, who: str, now: dt.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise SecurityError(
            f"{who} is not valid before {_when(cert.not_valid_before_utc)} (now {_when(now)})"
        )
    if now > cert.not_valid_after_utc:
        raise SecurityError(f"{who} expired at {_when(cert.not_valid_after_utc)} (now {_when(now)})")


def _check_ca_cert(ca: x509.Certificate, where: str, now: dt.datetime) -> None:
    try:
        bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise SecurityError(f"{where} is not a CA certificate")
    try:
        ca.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise SecurityError(f"{where} is not a self-signed CA certificate") from None
    _check_validity(ca, f"mesh CA certificate {where}", now)


def _check_issued_by(cert: x509.Certificate, ca: x509.Certificate, who: str, where: str) -> None:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise SecurityError(f"{who} is not signed by the mesh CA in {where}") from None


def load_identity(directory: str | os.PathLike[str], *, now: dt.datetime | None = None) -> Identity:
    """Load and check an identity directory; SecurityError naming what is wrong.

    Checks: every file present and parseable; the CA certificate is a self-signed CA; the
    certificate is signed by it, carries a meshai identity, matches ``key.pem`` and the X25519
    keys; both certificates are valid at ``now`` (default: the current time); and, if the
    directory holds ``revoked.json``, that list is the CA's and does not revoke this identity.
    """
    d = Path(directory)
    when = _now(now)
    if not d.is_dir():
        raise SecurityError(f"identity directory {d} does not exist")
    missing = [f for f in _IDENTITY_FILES if not (d / f).is_file()]
    if missing:
        raise SecurityError(f"identity directory {d} lacks {', '.join(missing)}")
    cert_pem, key_pem, ca_pem = (_read(d / f, "file") for f in (CERT, KEY, CA_PEM))
    xkey_pem, xpub_pem = _read(d / X25519_KEY, "file"), _read(d / X25519_PUB, "file")
    cert = _load_cert(cert_pem, str(d / CERT))
    ca = _load_cert(ca_pem, str(d / CA_PEM))
    _check_ca_cert(ca, str(d / CA_PEM), when)
    try:
        name, role, serial = _cert_identity(cert)
    except SecurityError as exc:
        raise SecurityError(f"{d / CERT}: {exc}") from None
    who = f"certificate of {name!r}"
    _check_issued_by(cert, ca, who, str(d / CA_PEM))
    _check_validity(cert, who, when)

    mode = (d / KEY).stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by others (mode %o); it should be 0600", d / KEY, stat.S_IMODE(mode))
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise SecurityError(f"{d / KEY} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or _spki(key.public_key()) != _spki(cert.public_key()):
        raise SecurityError(f"{d / KEY} does not match the {who}")

    try:
        xkey = serialization.load_pem_private_key(xkey_pem, password=None)
        xpub = serialization.load_pem_public_key(xpub_pem)
    except (ValueError, TypeError) as exc:
        raise SecurityError(f"X25519 keys in {d} are not PEM X25519 keys: {exc}") from None
    if not isinstance(xkey, x25519.X25519PrivateKey) or not isinstance(xpub, x25519.X25519PublicKey):
        raise SecurityError(f"{d / X25519_KEY} and {d / X25519_PUB} must hold X25519 keys")
    raw_pub = xpub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if xkey.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) != raw_pub:
        raise SecurityError(f"{d / X25519_KEY} does not match {d / X25519_PUB}")
    if x25519_from_cert(cert) != raw_pub:
        raise SecurityError(f"{d / X25519_PUB} is not the X25519 key in the {who}")

    if (d / REVOKED).exists():
        crl = load_revocations(d / REVOKED, ca)
        if crl.is_revoked(name, serial):
            raise SecurityError(f"{who} is revoked (revocation list v{crl.version} in {d / REVOKED})")

    return Identity(
        name=name,
        role=role,
        cert_pem=cert_pem,
        key_pem=key_pem,
        ca_pem=ca_pem,
        x25519_private=xkey.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        ),
        x25519_public=raw_pub,
        directory=d,
    )


def _key_usage(**granted: bool) -> x509.KeyUsage:
    flags = dict.fromkeys(
        (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    flags.update(granted)
    return x509.KeyUsage(**flags)


def _spki(key: Any) -> bytes:
    return bytes(
        key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


# --------------------------------------------------------------------------- the CA


@_filesystem("create the mesh CA")
def ca_init(
    ca_dir: str | os.PathLike[str],
    *,
    days: int = 3650,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """Create a mesh CA in ``ca_dir`` (ca.key 0600, ca.crt, an empty signed revoked.json v0, issued.json).

    Returns the CA certificate.  ConfigError if ``ca_dir`` already holds a CA (never overwritten).
    """
    d = Path(ca_dir)
    _check_days(days)
    when = _now(now)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked(d):
        existing = [f for f in (CA_KEY, CA_CERT, REVOKED, ISSUED) if (d / f).exists()]
        if existing:
            raise ConfigError(
                f"{d} already holds a mesh CA ({', '.join(existing)}); refusing to overwrite it"
            )
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshai"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"meshai mesh CA {os.urandom(4).hex()}"),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(when - BACKDATE)
            .not_valid_after(when + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        crl = RevocationList(0, frozenset(), frozenset(), when.timestamp())._signed(key)
        _write(d / CA_KEY, _private_pem(key), 0o600)
        _write(d / CA_CERT, _pem(cert))
        _write(d / REVOKED, crl.to_bytes())
        _write(d / ISSUED, _canonical({"format": _ISSUED_FORMAT, "certificates": []}))
    return cert


def _load_ca(d: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    if not (d / CA_CERT).is_file() or not (d / CA_KEY).is_file():
        raise ConfigError(f"{d} holds no mesh CA (run 'meshai ca init {d}')")
    cert = _load_cert(_read(d / CA_CERT, "CA certificate"), str(d / CA_CERT))
    try:
        key = serialization.load_pem_private_key(_read(d / CA_KEY, "CA key"), password=None)
    except (ValueError, TypeError) as exc:
        raise SecurityError(f"{d / CA_KEY} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or _spki(key.public_key()) != _spki(cert.public_key()):
        raise SecurityError(f"{d / CA_KEY} does not match {d / CA_CERT}")
    return key, cert


def _load_issued(d: Path) -> list[dict[str, Any]]:
    try:
        doc = json.loads((d / ISSUED).read_bytes())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{d / ISSUED} is unreadable: {exc}") from None
    certs = doc.get("certificates") if isinstance(doc, dict) else None
    if not isinstance(certs, list) or not all(
        isinstance(c, dict)
        and isinstance(c.get("name"), str)
        and isinstance(c.get("serial"), str)
        and _SERIAL_RE.fullmatch(c["serial"])
        for c in certs
    ):
        raise ConfigError(f"{d / ISSUED} is not a meshai issued-certificates file")
    return certs


@_filesystem("issue the identity")
def ca_issue(
    name: str,
    ca_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    role: str = "node",
    days: int = 365,
    now: dt.datetime | None = None,
    replace: bool = False,
) -> Identity:
    """Issue an identity ``name`` with ``role`` into ``out_dir`` (see the module docstring for its files).

    The certificate is valid from ``now`` (default: the current time) minus ``BACKDATE`` for
    ``days`` days.  Refused: an invalid name, role or days, an ``out_dir`` that is not empty
    (ConfigError), a name already issued and not revoked unless ``replace`` (ConfigError); with
    ``replace`` the earlier certificates' serials are revoked.  A revoked name is refused
    (SecurityError).  Returns the identity as ``load_identity(out_dir, now=now)`` sees it.
    """
    check_name(name)
    _check_role(role)
    _check_days(days)
    when = _now(now)
    d, out = Path(ca_dir), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            f"identity directory {out} already exists and is not empty; refusing to overwrite it"
        )
    ca_key, ca_cert = _load_ca(d)
    with _locked(d):
        crl = load_revocations(d / REVOKED, ca_cert)
        if name in crl.names:
            raise SecurityError(
                f"{name!r} is revoked (revocation list v{crl.version}); a revoked name is never issued again"
            )
        issued = _load_issued(d)
        earlier = [c for c in issued if c.get("name") == name]
        old_serials = {int(c["serial"], 16) for c in earlier} - crl.serials
        if old_serials and not replace:
            raise ConfigError(
                f"{name!r} already has a certificate from this CA (serial {_serial_hex(max(old_serials))}); "
                f"pass replace=True (--replace) to issue a new one and revoke the old"
            )
        not_before = when - BACKDATE
        not_after = not_before + dt.timedelta(days=days)
        if not_after > ca_cert.not_valid_after_utc:
            raise ConfigError(
                f"a certificate for {days} days would outlive the mesh CA (expires "
                f"{_when(ca_cert.not_valid_after_utc)}); issue for fewer days"
            )

        key = ec.generate_private_key(ec.SECP256R1())
        xkey = x25519.X25519PrivateKey.generate()
        xpub = xkey.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        eku = (
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            if role == "node"
            else [ExtendedKeyUsageOID.CLIENT_AUTH]
        )
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"{URI_SCHEME}:{role}:{name}")]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
            )
            .add_extension(x509.UnrecognizedExtension(X25519_OID, b"\x04\x20" + xpub), critical=False)
            .sign(ca_key, hashes.SHA256())
        )

        if replace and old_serials:
            crl = RevocationList(crl.version + 1, crl.names, crl.serials | old_serials, time.time())._signed(
                ca_key
            )
            _write(d / REVOKED, crl.to_bytes())

        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write(out / KEY, _private_pem(key), 0o600)
        _write(out / X25519_KEY, _private_pem(xkey), 0o600)
        _write(out / CERT, _pem(cert))
        _write(out / CA_PEM, _pem(ca_cert))
        _write(
            out / X25519_PUB,
            xkey.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )
        _write(out / REVOKED, crl.to_bytes())
        issued.append(
            {
                "name": name,
                "role": role,
                "serial": _serial_hex(cert.serial_number),
                "not_before": _when(not_before),
                "not_after": _when(not_after),
                "fingerprint": cert_fingerprint(cert),
            }
        )
        _write(d / ISSUED, _canonical({"format": _ISSUED_FORMAT, "certificates": issued}))
    return load_identity(out, now=when)


@_filesystem("revoke")
def ca_revoke(name: str, ca_dir: str | os.PathLike[str]) -> RevocationList:
    """Revoke ``name`` (and every serial issued to it): bump the version, re-sign, write revoked.json.

    Returns the new list (or the current one, unchanged, if ``name`` is already revoked).
    ConfigError if this CA never issued ``name`` (a typo must not look like a revocation).
    Spread the list by copying ``ca_dir/revoked.json`` into any node's or caller's identity directory.
    """
    check_name(name)
    d = Path(ca_dir)
    ca_key, ca_cert = _load_ca(d)
    with _locked(d):
        crl = load_revocations(d / REVOKED, ca_cert)
        if name in crl.names:
            return crl
        issued = _load_issued(d)
        serials = {int(c["serial"], 16) for c in issued if c.get("name") == name}
        if not serials:
            known = sorted({str(c.get("name")) for c in issued})
            raise ConfigError(
                f"the CA in {d} never issued {name!r} (issued: {', '.join(known) if known else 'none'})"
            )
        crl = RevocationList(crl.version + 1, crl.names | {name}, crl.serials | serials, time.time())._signed(
            ca_key
        )
        _write(d / REVOKED, crl.to_bytes())
    return crl


# --------------------------------------------------------------------------- TLS


def _context(protocol: int, identity: Identity) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    if protocol == ssl.PROTOCOL_TLS_CLIENT:
        ctx.check_hostname = False  # the peer's identity is checked by node id (check_peer)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cadata=identity.ca_pem.decode("ascii"))  # the mesh CA only
    # ssl loads a certificate and key only from files: a private directory, removed at once.
    with tempfile.TemporaryDirectory(prefix="meshai-tls-") as tmp:
        cert, key = Path(tmp) / CERT, Path(tmp) / KEY
        _write(cert, identity.cert_pem, 0o600)
        _write(key, identity.key_pem, 0o600)
        try:
            ctx.load_cert_chain(cert, key)
        except ssl.SSLError as exc:
            raise SecurityError(f"cannot use the identity {identity.name!r} for TLS: {exc}") from None
    return ctx


def server_context(identity: Identity) -> ssl.SSLContext:
    """TLS 1.3-only server context: presents ``identity``, requires a client certificate from the mesh CA.

    No session tickets (every connection does a full handshake, so every peer is verified).
    """
    ctx = _context(ssl.PROTOCOL_TLS_SERVER, identity)
    ctx.num_tickets = 0
    return ctx


def client_context(identity: Identity) -> ssl.SSLContext:
    """TLS 1.3-only client context: presents ``identity``, requires a server certificate from the mesh CA.

    Host names are not checked; call ``check_peer`` with the node id you meant to reach.
    """
    return _context(ssl.PROTOCOL_TLS_CLIENT, identity)


def _allows(cert_role: str, acting_as: str) -> bool:
    """A node certificate may act as a node or a client; a client certificate only as a client."""
    return cert_role == acting_as or (cert_role == "node" and acting_as == "client")


def check_peer(
    ssl_object: ssl.SSLObject | ssl.SSLSocket | None,
    claimed_id: str,
    expected_role: str | None = None,
    crl: RevocationList | None = None,
    *,
    peer: str = "",
) -> PeerIdentity:
    """After a handshake, check the peer's certificate against what it claims; SecurityError if not.

    ``claimed_id`` is the node id of its ``Hello`` (on the dialling side also the id you meant to
    reach); ``expected_role`` the role it acts in (None: any); ``crl`` a *verified* revocation list;
    ``peer`` its address for messages (``"127.0.0.1:5000"``).  Returns who it proved to be.
    """
    who = f"peer at {peer}" if peer else "peer"
    if ssl_object is None:
        raise SecurityError(f"{who} did not use TLS; the mesh requires mutual TLS 1.3")
    version = ssl_object.version()
    if version != "TLSv1.3":
        raise SecurityError(f"{who} negotiated {version}, not TLSv1.3")
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise SecurityError(f"{who} presented no certificate")
    cert = _load_cert(der, f"certificate of {who}")
    try:
        name, role, serial = _cert_identity(cert)
    except SecurityError as exc:
        raise SecurityError(f"{who} says it is {claimed_id!r} but {exc}") from None
    if name != claimed_id:
        raise SecurityError(f"{who} says it is {claimed_id!r} but its certificate is for {name!r}")
    if expected_role is not None and not _allows(role, _check_role(expected_role)):
        raise SecurityError(f"{who} ({name!r}) acts as a {expected_role} but holds a {role} certificate")
    if crl is not None and crl.is_revoked(name, serial):
        what = "is" if name in crl.names else f"(serial {_serial_hex(serial)}) is"
        raise SecurityError(f"{who}: certificate of {name!r} {what} revoked (revocation list v{crl.version})")
    return PeerIdentity(name, role, serial, cert_fingerprint(cert), cert.not_valid_after_utc)


# --------------------------------------------------------------------------- a process's trust state


class _TlsChannel(Protocol):
    @property
    def ssl_object(self) -> ssl.SSLObject | None: ...

    @property
    def peername(self) -> str: ...


#: Separates a client identity's name from a per-process session suffix in its Hello.
SESSION_SEP = "~"


class Trust:
    """What a node or caller needs to be a mesh member: its identity, TLS contexts, the revocation list,
    and who proved to be whom on each channel.  Transport-agnostic: it checks channels it is handed."""

    def __init__(self, identity: Identity, crl: RevocationList | None = None) -> None:
        self.identity = identity
        self.crl = crl
        self.server_ctx = server_context(identity)
        self.client_ctx = client_context(identity)
        self.members: dict[str, PeerIdentity] = {}

    @classmethod
    def from_dir(cls, directory: str | os.PathLike[str]) -> Trust:
        """Load an identity directory (made by ``meshai ca issue``) and its revocation list."""
        ident = load_identity(directory)
        crl = None
        if (Path(directory) / REVOKED).exists():
            crl = load_revocations(directory, ident.ca_pem)
        return cls(ident, crl)

    @property
    def version(self) -> int:
        """Version of the revocation list held (0 when none)."""
        return self.crl.version if self.crl is not None else 0

    def verify(self, channel: _TlsChannel, claimed_id: str, role: str | None) -> PeerIdentity:
        """Check a channel's peer after the handshake; remember it; SecurityError if it is not a member.

        A client may speak as ``NAME~SESSION`` (its certificate names NAME), so that several processes
        using one client identity at once stay apart; nodes always speak as exactly their name."""
        name = claimed_id
        if role == "client" and SESSION_SEP in claimed_id:
            name = claimed_id.split(SESSION_SEP, 1)[0]
        peer = check_peer(channel.ssl_object, name, role, self.crl, peer=channel.peername)
        self.members[claimed_id] = peer
        return peer

    def adopt(self, data: bytes) -> bool:
        """Take a revocation list from a peer if it verifies and is newer; True if it changed ours."""
        new = adopt_revocations(self.crl, data, self.identity.ca_pem)
        if new is self.crl:
            return False
        self.crl = new
        with contextlib.suppress(MeshaiError):
            save_revocations(self.identity.directory, new)
        return True

    def load_newer(self, path: str | os.PathLike[str]) -> bool:
        """Take the revocation list in ``path`` (e.g. the CA's ``revoked.json``) if it is newer."""
        return self.adopt(
            _read(Path(path) / REVOKED if Path(path).is_dir() else Path(path), "revocation list")
        )

    def revoked_members(self) -> list[str]:
        """Peers we talk to whose certificates the current list revokes."""
        return sorted(n for n, p in self.members.items() if p.is_revoked(self.crl))


def self_signed_tls(
    certdir: str | os.PathLike[str], host: str = "127.0.0.1"
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts for server-authenticated TLS with a throwaway self-signed certificate
    for localhost/``host`` in ``certdir`` (``cert.pem``, ``key.pem``; made if absent).

    For benchmarks and transport tests that measure TLS itself; the mesh uses ``Trust`` instead."""
    import ipaddress

    d = Path(certdir)
    cert_file, key_file = d / "cert.pem", d / "key.pem"
    if not cert_file.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        now = dt.datetime.now(dt.UTC)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(host))]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        _write(key_file, _private_pem(key), 0o600)
        _write(cert_file, cert.public_bytes(serialization.Encoding.PEM))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cafile=str(cert_file))
    return server, client
