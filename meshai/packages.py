"""Signed, optionally encrypted model packages: the one way a model reaches a zero-trust node.

In the manner of OpenSSF model signing, a package carries a manifest of per-file SHA-256 digests
under one Ed25519 signature; a node loads only packages that verify against its fleet's trusted key,
and refuses everything else with a :class:`~meshai.errors.SecurityError` that names what was wrong.

File format (``meshai-package/1``)
----------------------------------
A package is a ZIP archive whose entries are all *stored* (no compression, no ZIP encryption),
regular files, at most ``MAX_FILES + 2`` of them, named exactly:

``manifest.json``
    The manifest, canonical JSON (UTF-8, ASCII-only escapes, sorted keys, separators ``,`` and ``:``,
    no trailing newline; at most ``MAX_MANIFEST_BYTES``)::

        {"created": "2026-01-02T03:04:05Z",          # UTC, whole seconds
         "encryption": null | {
             "alg": "AES-256-GCM",
             "ciphertext_sha256": {PATH: HEX},        # digest of each files/PATH entry as stored
             "kdf": "X25519-HKDF-SHA256",
             "nonces": {PATH: B64},                   # 12-byte AES-GCM nonce of each file
             "recipients": {ID: {"epk": B64, "nonce": B64, "wrapped": B64}}},
         "files": [{"path": PATH, "sha256": HEX, "size": INT}],   # sorted by path; PLAINTEXT digest/size
         "format": "meshai-package/1",
         "name": NAME,                                # [A-Za-z0-9][A-Za-z0-9._-]{0,63}
         "signer": null | HEX,                        # SHA-256 of the signer's raw 32-byte public key
         "version": VERSION}                          # dotted integers: "1", "1.2", "1.2.10"

    B64 is standard base64 with padding; HEX is lower-case. A reader rejects unknown or missing keys,
    duplicate keys, wrong types and any manifest that is not byte-for-byte canonical.
``manifest.sig``
    The raw 64-byte Ed25519 signature over the exact bytes of ``manifest.json``; absent when unsigned.
    Signing sets ``signer`` first, so the signed bytes name their signer.
``files/PATH``
    One per manifest file, nothing else. ``PATH`` is relative, ``/``-separated, each component
    ``[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`` (so never ``..``, absolute, a drive or a backslash). Unencrypted,
    the entry is the file itself. Encrypted, it is ``AESGCM(K).encrypt(nonces[PATH], plaintext,
    associated_data=PATH.encode())`` (ciphertext plus 16-byte tag), where ``K`` is a random 32-byte
    content key per package.

Key wrapping, per recipient ``ID`` with X25519 public key ``R`` (raw 32 bytes): a fresh ephemeral X25519
key ``e`` (``epk`` = its raw public key), ``Z = X25519(e, R)``, ``KWK = HKDF-SHA256(Z, length=32,
salt=epk || R, info=b"meshai-package/1 key-wrap " + ID.encode())`` and ``wrapped = AESGCM(KWK).encrypt(
nonce, K, associated_data=b"meshai-package/1 key-wrap " + ID.encode())``. A copied package is useless
without one member's X25519 private key.

Reading is strict, and happens before anything is trusted: archive structure and limits first
(duplicate, compressed, encrypted, symlink, directory or special entries, names outside ``files/``,
declared sizes over the limit or larger than the archive itself), then the signature over the raw
manifest bytes, then the manifest's schema, then the entry set against the manifest (an added, dropped
or renamed file is refused), then every digest. :func:`open_package` then decrypts into memory,
re-checks every plaintext digest and checks every ``.onnx`` file with :func:`check_onnx_file` (valid
ONNX, no external-data reference anywhere — subgraphs, functions, sparse initializers included —,
within the size limit). Other files may ride along but are never loaded as models.

Keys on disk: Ed25519 keys from :func:`keygen` are PEM (PKCS#8 private, mode 0600; SubjectPublicKeyInfo
``.pub``); readers also take the raw 32 bytes. Identities (made by ``meshai ca issue``) are folders with
``x25519.pub`` and ``x25519.key`` (raw 32 bytes or PEM) and optionally ``cert.pem`` whose CN names them.

A :class:`RollbackInstruction` is a signed statement "run NAME at VERSION" (payload: canonical JSON
``{"format": "meshai-rollback/1", "issued_at", "name", "version"}``, Ed25519 by the fleet key), the only
thing that lets a node go below the highest version it has activated.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import io
import json
import os
import re
import stat
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import onnx
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID
from google.protobuf.message import Message as _PbMessage

from meshai.errors import ConfigError, ModelError, SecurityError
from meshai.models import MAX_MODEL_BYTES, model_from_bytes
from meshai.strict_json import loads_strict

__all__ = [
    "FORMAT",
    "MAX_FILES",
    "MAX_MANIFEST_BYTES",
    "ROLLBACK_FORMAT",
    "Encryption",
    "FileEntry",
    "Manifest",
    "OpenedPackage",
    "RecipientKey",
    "RollbackInstruction",
    "build_package",
    "check_onnx_file",
    "compare_versions",
    "fingerprint",
    "inspect_package",
    "keygen",
    "load_identity",
    "load_public_key",
    "load_recipients",
    "load_signing_key",
    "open_package",
    "parse_package_ref",
    "sign_package",
    "sign_rollback",
    "verify_package",
    "version_key",
]

FORMAT: Final = "meshai-package/1"
ROLLBACK_FORMAT: Final = "meshai-rollback/1"
ALG: Final = "AES-256-GCM"
KDF: Final = "X25519-HKDF-SHA256"

#: Most files one package may hold.
MAX_FILES: Final = 256
#: Largest manifest.json accepted.
MAX_MANIFEST_BYTES: Final = 1 << 20
#: Largest key, certificate or identity file read.
MAX_KEY_FILE_BYTES: Final = 64 << 10

MANIFEST_ENTRY: Final = "manifest.json"
SIGNATURE_ENTRY: Final = "manifest.sig"
FILES_PREFIX: Final = "files/"
SIGNATURE_BYTES: Final = 64
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
KEY_BYTES: Final = 32
_WRAP_LABEL: Final = b"meshai-package/1 key-wrap "

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_VERSION_RE = re.compile(r"(0|[1-9][0-9]{0,8})(\.(0|[1-9][0-9]{0,8})){0,7}")
_COMPONENT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_RECIPIENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_TIME_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_MAX_PATH_LEN = 255
_MAX_PATH_DEPTH = 16
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


# ------------------------------------------------------------------------------------- names, versions


def _check_name(name: object, what: str = "package name") -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(
            f"{what} {name!r} is not valid: use 1-64 of A-Z a-z 0-9 . _ -, starting alphanumeric"
        )
    return name


def _check_version(version: object, what: str = "package version") -> str:
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
        raise ConfigError(
            f"{what} {version!r} is not valid: use dotted integers without leading zeros "
            "('1', '1.2', '1.2.10'; at most 8 parts)"
        )
    return version


def version_key(version: str) -> tuple[int, ...]:
    """The numeric sort key of a dotted-integer version ("1.2" == "1.2.0"); ConfigError if malformed."""
    parts = [int(p) for p in _check_version(version).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as version ``a`` is numerically lower than, equal to or higher than ``b``."""
    ka, kb = version_key(a), version_key(b)
    return (ka > kb) - (ka < kb)


def parse_package_ref(ref: str) -> tuple[str, str]:
    """Split ``"name@version"`` (as in ``Deploy.package``) into its checked parts, or raise ConfigError."""
    if not isinstance(ref, str) or ref.count("@") != 1:
        raise ConfigError(f"package reference {ref!r} is not NAME@VERSION")
    name, version = ref.split("@")
    return _check_name(name), _check_version(version)


def _check_path(path: object, what: str = "package file path") -> str:
    """A relative, '/'-separated path of safe components, or ConfigError naming the problem."""
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{what} {path!r} is empty or not a string")
    if "\\" in path:
        raise ConfigError(f"{what} {path!r} contains a backslash")
    if path.startswith("/"):
        raise ConfigError(f"{what} {path!r} is absolute")
    parts = path.split("/")
    if ".." in parts:
        raise ConfigError(f"{what} {path!r} contains '..' (path traversal)")
    if len(path) > _MAX_PATH_LEN or len(parts) > _MAX_PATH_DEPTH:
        raise ConfigError(
            f"{what} {path!r} is too long (at most {_MAX_PATH_LEN} chars, {_MAX_PATH_DEPTH} parts)"
        )
    for part in parts:
        if not _COMPONENT_RE.fullmatch(part):
            raise ConfigError(
                f"{what} {path!r} has component {part!r}: use A-Z a-z 0-9 . _ -, not starting with '.'"
            )
    return path


def _check_recipient_id(rid: object) -> str:
    if not isinstance(rid, str) or not _RECIPIENT_RE.fullmatch(rid):
        raise ConfigError(f"recipient id {rid!r} is not valid: use 1-128 of A-Z a-z 0-9 . _ : @ + -")
    return rid


def _utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_time(value: object, what: str) -> str:
    if not isinstance(value, str) or not _TIME_RE.fullmatch(value):
        raise ConfigError(f"{what} {value!r} is not a UTC time like 2026-01-02T03:04:05Z")
    try:
        _dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        raise ConfigError(f"{what} {value!r} is not a valid date and time") from None
    return value


def _as_time(value: str | _dt.datetime | None, what: str) -> str:
    if value is None:
        return _utc_now()
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            raise ConfigError(f"{what} {value!r} has no time zone")
        return value.astimezone(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return _check_time(value, what)


# ------------------------------------------------------------------------------------------ JSON


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _parse_canonical(data: bytes, what: str) -> Any:
    obj = loads_strict(data, SecurityError, what)
    if _canonical(obj) != data:
        raise SecurityError(f"{what} is not canonical JSON (sorted keys, no spaces, ASCII)")
    return obj


def _b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64d(value: object, what: str, size: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise SecurityError(f"manifest {what} is not a base64 string: {value!r}")
    try:
        out = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise SecurityError(f"manifest {what} is not valid base64: {value!r}") from None
    if _b64e(out) != value:
        raise SecurityError(f"manifest {what} is not canonical base64: {value!r}")
    if size is not None and len(out) != size:
        raise SecurityError(f"manifest {what} is {len(out)} bytes, expected {size}")
    return out


def _hex64(value: object, what: str) -> str:
    if not isinstance(value, str) or not _HEX64_RE.fullmatch(value):
        raise SecurityError(f"manifest {what} is not 64 lower-case hex digits: {value!r}")
    return value


def _keys(obj: object, keys: set[str], what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise SecurityError(f"manifest {what} is not an object: {obj!r}")
    got = set(obj)
    if got != keys:
        extra, missing = sorted(got - keys), sorted(keys - got)
        raise SecurityError(f"manifest {what} has unexpected keys {extra} / is missing keys {missing}")
    return obj


def _schema(check: Any, *args: Any) -> Any:
    """Run a ConfigError-raising check on signed or read data, turning it into a SecurityError."""
    try:
        return check(*args)
    except ConfigError as exc:
        raise SecurityError(f"manifest: {exc}") from None


# ------------------------------------------------------------------------------------------ types


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of a package: its relative path, and SHA-256 and size of its plaintext."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class RecipientKey:
    """The content key wrapped for one recipient (see the module docstring for the construction)."""

    id: str
    epk: bytes
    nonce: bytes
    wrapped: bytes


@dataclass(frozen=True, slots=True)
class EncryptedFile:
    """How one file is sealed: its AES-GCM nonce, and the SHA-256 of the stored ciphertext."""

    path: str
    nonce: bytes
    sha256: str


@dataclass(frozen=True, slots=True)
class Encryption:
    """The encryption section of a manifest."""

    recipients: tuple[RecipientKey, ...]
    files: tuple[EncryptedFile, ...]
    alg: str = ALG
    kdf: str = KDF

    def recipient(self, rid: str) -> RecipientKey | None:
        """The wrapped key for recipient ``rid``, or None."""
        return next((r for r in self.recipients if r.id == rid), None)

    def file(self, path: str) -> EncryptedFile:
        """The sealing of file ``path`` (KeyError if absent)."""
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "alg": self.alg,
            "ciphertext_sha256": {f.path: f.sha256 for f in self.files},
            "kdf": self.kdf,
            "nonces": {f.path: _b64e(f.nonce) for f in self.files},
            "recipients": {
                r.id: {"epk": _b64e(r.epk), "nonce": _b64e(r.nonce), "wrapped": _b64e(r.wrapped)}
                for r in self.recipients
            },
        }


@dataclass(frozen=True, slots=True)
class Manifest:
    """A package's manifest: name, version, creation time, files, encryption and signer fingerprint."""

    name: str
    version: str
    created: str
    files: tuple[FileEntry, ...]
    encryption: Encryption | None = None
    signer: str | None = None

    @property
    def ref(self) -> str:
        """``name@version``, as ``Deploy.package`` names it."""
        return f"{self.name}@{self.version}"

    @property
    def encrypted(self) -> bool:
        """Whether the files are sealed for recipients."""
        return self.encryption is not None

    @property
    def models(self) -> tuple[str, ...]:
        """Paths of the ONNX model files."""
        return tuple(f.path for f in self.files if f.path.endswith(".onnx"))

    @property
    def total_size(self) -> int:
        """Sum of the plaintext file sizes."""
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (the exact object that ``manifest.json`` serialises canonically)."""
        return {
            "created": self.created,
            "encryption": None if self.encryption is None else self.encryption.to_dict(),
            "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in self.files],
            "format": FORMAT,
            "name": self.name,
            "signer": self.signer,
            "version": self.version,
        }

    def to_bytes(self) -> bytes:
        """Canonical manifest.json bytes."""
        return _canonical(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse and validate manifest.json bytes strictly; SecurityError names the first problem."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise SecurityError(f"manifest.json is {len(data)} bytes, over the limit of {MAX_MANIFEST_BYTES}")
        return cls.from_dict(_parse_canonical(data, "manifest.json"))

    @classmethod
    def from_dict(cls, obj: object) -> Manifest:
        """Validate a manifest object (see the module docstring); SecurityError on any deviation."""
        d = _keys(obj, {"created", "encryption", "files", "format", "name", "signer", "version"}, "")
        if d["format"] != FORMAT:
            raise SecurityError(f"manifest format is {d['format']!r}, expected {FORMAT!r}")
        name = _schema(_check_name, d["name"])
        version = _schema(_check_version, d["version"])
        created = _schema(_check_time, d["created"], "created")
        signer = d["signer"]
        if signer is not None:
            _hex64(signer, "signer")
        files_raw = d["files"]
        if not isinstance(files_raw, list) or not files_raw:
            raise SecurityError("manifest files is not a non-empty list")
        if len(files_raw) > MAX_FILES:
            raise SecurityError(f"manifest lists {len(files_raw)} files, over the limit of {MAX_FILES}")
        files: list[FileEntry] = []
        for i, fr in enumerate(files_raw):
            f = _keys(fr, {"path", "sha256", "size"}, f"files[{i}]")
            path = _schema(_check_path, f["path"])
            size = f["size"]
            if type(size) is not int or size < 0:
                raise SecurityError(f"manifest files[{i}].size is not a non-negative integer: {size!r}")
            files.append(FileEntry(path, _hex64(f["sha256"], f"files[{i}].sha256"), size))
        paths = [f.path for f in files]
        if paths != sorted(paths):
            raise SecurityError("manifest files are not sorted by path")
        folded = [p.casefold() for p in paths]
        if len(set(folded)) != len(folded):
            raise SecurityError("manifest lists a path twice (ignoring case)")
        enc = None if d["encryption"] is None else _encryption_from_dict(d["encryption"], paths)
        return cls(name, version, created, tuple(files), enc, signer)


def _encryption_from_dict(obj: object, paths: list[str]) -> Encryption:
    e = _keys(obj, {"alg", "ciphertext_sha256", "kdf", "nonces", "recipients"}, "encryption")
    if e["alg"] != ALG or e["kdf"] != KDF:
        raise SecurityError(f"manifest encryption is {e['alg']!r}/{e['kdf']!r}, expected {ALG!r}/{KDF!r}")
    nonces, digests = e["nonces"], e["ciphertext_sha256"]
    if not isinstance(nonces, dict) or sorted(nonces) != paths:
        raise SecurityError("manifest encryption.nonces does not name exactly the package's files")
    if not isinstance(digests, dict) or sorted(digests) != paths:
        raise SecurityError("manifest encryption.ciphertext_sha256 does not name exactly the package's files")
    sealed = tuple(
        EncryptedFile(
            p,
            _b64d(nonces[p], f"encryption.nonces[{p!r}]", NONCE_BYTES),
            _hex64(digests[p], f"encryption.ciphertext_sha256[{p!r}]"),
        )
        for p in paths
    )
    rec = e["recipients"]
    if not isinstance(rec, dict) or not rec:
        raise SecurityError("manifest encryption.recipients is not a non-empty object")
    recipients: list[RecipientKey] = []
    for rid in sorted(rec):
        _schema(_check_recipient_id, rid)
        r = _keys(rec[rid], {"epk", "nonce", "wrapped"}, f"encryption.recipients[{rid!r}]")
        recipients.append(
            RecipientKey(
                rid,
                _b64d(r["epk"], f"recipients[{rid!r}].epk", KEY_BYTES),
                _b64d(r["nonce"], f"recipients[{rid!r}].nonce", NONCE_BYTES),
                _b64d(r["wrapped"], f"recipients[{rid!r}].wrapped", KEY_BYTES + TAG_BYTES),
            )
        )
    return Encryption(tuple(recipients), sealed)


@dataclass(frozen=True, slots=True)
class OpenedPackage:
    """A verified, decrypted package held in memory: its manifest and plaintext files by path."""

    manifest: Manifest
    files: dict[str, bytes] = field(repr=False)

    def model(self, path: str | None = None) -> bytes:
        """The bytes of ONNX file ``path``, or of the only ONNX file; ConfigError if ambiguous or absent."""
        models = self.manifest.models
        if path is None:
            if len(models) != 1:
                raise ConfigError(
                    f"package {self.manifest.ref} has {len(models)} ONNX files {list(models)}; name one"
                )
            path = models[0]
        if path not in models:
            raise ConfigError(
                f"package {self.manifest.ref} has no ONNX file {path!r} (it has {list(models)})"
            )
        return self.files[path]


# ------------------------------------------------------------------------------------------- keys


def _read_small(path: Path, what: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_KEY_FILE_BYTES:
            raise ConfigError(f"{what} {str(path)!r} is {size} bytes, too large for a key file")
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None


def _key_bytes(key: bytes | str | os.PathLike[str], what: str) -> tuple[bytes, str]:
    if isinstance(key, bytes):
        return key, what
    p = Path(key)
    return _read_small(p, what), f"{what} {str(p)!r}"


def load_signing_key(key: bytes | str | os.PathLike[str] | Ed25519PrivateKey) -> Ed25519PrivateKey:
    """An Ed25519 private key from a path, PEM (PKCS#8, unencrypted) or raw 32 bytes; ConfigError otherwise."""
    if isinstance(key, Ed25519PrivateKey):
        return key
    data, what = _key_bytes(key, "signing key")
    if len(data) == KEY_BYTES:
        return Ed25519PrivateKey.from_private_bytes(data)
    try:
        k = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what} is not an unencrypted PEM or raw Ed25519 private key: {exc}") from None
    if not isinstance(k, Ed25519PrivateKey):
        raise ConfigError(f"{what} is a {type(k).__name__}, not an Ed25519 private key")
    return k


def load_public_key(key: bytes | str | os.PathLike[str] | Ed25519PublicKey) -> Ed25519PublicKey:
    """An Ed25519 public key from a path, PEM (SubjectPublicKeyInfo) or raw 32 bytes; ConfigError otherwise."""
    if isinstance(key, Ed25519PublicKey):
        return key
    data, what = _key_bytes(key, "public key")
    if len(data) == KEY_BYTES:
        return Ed25519PublicKey.from_public_bytes(data)
    try:
        k = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what} is not a PEM or raw Ed25519 public key: {exc}") from None
    if not isinstance(k, Ed25519PublicKey):
        raise ConfigError(f"{what} is a {type(k).__name__}, not an Ed25519 public key")
    return k


def _raw_public(key: Ed25519PublicKey | X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(pubkey: bytes | str | os.PathLike[str] | Ed25519PublicKey) -> str:
    """Hex SHA-256 of an Ed25519 public key's raw 32 bytes (the manifest's ``signer``)."""
    return hashlib.sha256(_raw_public(load_public_key(pubkey))).hexdigest()


def _write_new(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise ConfigError(f"{str(path)!r} already exists; not overwriting a key") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)


def keygen(out: str | os.PathLike[str], *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: ``out`` (PKCS#8 PEM, mode 0600) and ``out.pub``; return both paths."""
    priv_path = Path(out)
    pub_path = priv_path.with_name(priv_path.name + ".pub")
    if not overwrite:
        for p in (priv_path, pub_path):
            if p.exists():
                raise ConfigError(f"{str(p)!r} already exists; not overwriting a key")
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(priv_path, priv, 0o600, overwrite)
    _write_new(pub_path, pub, 0o644, overwrite)
    return priv_path, pub_path


def _x25519_public(data: bytes, what: str) -> bytes:
    if len(data) == KEY_BYTES:
        return data
    try:
        k = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what} is not a PEM or raw X25519 public key: {exc}") from None
    if not isinstance(k, X25519PublicKey):
        raise ConfigError(f"{what} is a {type(k).__name__}, not an X25519 public key")
    return _raw_public(k)


def _x25519_private(data: bytes, what: str) -> X25519PrivateKey:
    if len(data) == KEY_BYTES:
        return X25519PrivateKey.from_private_bytes(data)
    try:
        k = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what} is not an unencrypted PEM or raw X25519 private key: {exc}") from None
    if not isinstance(k, X25519PrivateKey):
        raise ConfigError(f"{what} is a {type(k).__name__}, not an X25519 private key")
    return k


def _identity_name(folder: Path) -> str:
    cert = folder / "cert.pem"
    if not cert.is_file():
        return _check_recipient_id(folder.name)
    try:
        c = x509.load_pem_x509_certificate(_read_small(cert, "certificate"))
    except ValueError as exc:
        raise ConfigError(f"{str(cert)!r} is not a PEM certificate: {exc}") from None
    cns = c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns:
        raise ConfigError(f"{str(cert)!r} has no common name (CN) to name the identity")
    value = cns[0].value
    return _check_recipient_id(value if isinstance(value, str) else value.decode("utf-8", "replace"))


def load_identity(folder: str | os.PathLike[str]) -> tuple[str, bytes]:
    """A recipient identity folder as ``(id, raw X25519 private key)``; id = cert.pem CN, else folder name."""
    p = Path(folder)
    if not (p / "x25519.key").is_file():
        raise ConfigError(f"identity {str(p)!r} has no x25519.key")
    key = _x25519_private(_read_small(p / "x25519.key", "X25519 key"), f"{str(p / 'x25519.key')!r}")
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return _identity_name(p), raw


def load_recipients(specs: Sequence[str]) -> dict[str, bytes]:
    """Recipients id -> raw X25519 public key from identity folders, folders of them, or NAME=PUBFILE."""
    out: dict[str, bytes] = {}

    def add(rid: str, pub: bytes, src: str) -> None:
        if rid in out:
            raise ConfigError(f"recipient {rid!r} is given twice (again by {src!r})")
        out[rid] = pub

    for raw_spec in specs:
        spec = raw_spec.strip()
        if not spec:
            continue
        if "=" in spec:
            rid, path = spec.split("=", 1)
            _check_recipient_id(rid)
            add(rid, _x25519_public(_read_small(Path(path), "X25519 public key"), repr(path)), spec)
            continue
        p = Path(spec)
        if not p.exists():
            raise ConfigError(f"recipient {spec!r} is neither an identity folder nor NAME=PUBFILE")
        if not p.is_dir():
            raise ConfigError(f"recipient {spec!r} is a file: give it as NAME={spec}")
        folders = (
            [p]
            if (p / "x25519.pub").is_file()
            else sorted(c for c in p.iterdir() if (c / "x25519.pub").is_file())
        )
        if not folders:
            raise ConfigError(
                f"recipient folder {spec!r} holds no identity (no x25519.pub in it or below it)"
            )
        for f in folders:
            pubfile = f / "x25519.pub"
            add(
                _identity_name(f),
                _x25519_public(_read_small(pubfile, "X25519 public key"), repr(str(pubfile))),
                str(f),
            )
    if not out:
        raise ConfigError("no recipients given")
    return out


# ---------------------------------------------------------------------------------------- archive


def _package_limit(max_bytes: int) -> int:
    """Largest package accepted for ``max_bytes`` of files: the files, tags, headers and the manifest."""
    return max_bytes + MAX_MANIFEST_BYTES + SIGNATURE_BYTES + (MAX_FILES + 2) * (TAG_BYTES + 1024)


@dataclass(frozen=True, slots=True)
class _Archive:
    manifest: bytes | None
    signature: bytes | None
    files: dict[str, bytes]  # relpath -> entry bytes as stored


def _entry_refusal(name: str) -> str | None:
    if name in (MANIFEST_ENTRY, SIGNATURE_ENTRY):
        return None
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        return f"package entry {name!r} is an absolute path"
    if "\\" in name:
        return f"package entry {name!r} contains a backslash"
    if ".." in name.split("/"):
        return f"package entry {name!r} contains '..' (path traversal)"
    if not name.startswith(FILES_PREFIX):
        return f"package entry {name!r} is outside files/"
    try:
        _check_path(name[len(FILES_PREFIX) :], f"package entry {name!r}: path")
    except ConfigError as exc:
        return str(exc)
    return None


def _read_archive(data: bytes, max_bytes: int) -> _Archive:
    """Parse a package's ZIP structure strictly, reading no entry before every limit is checked."""
    limit = _package_limit(max_bytes)
    if len(data) > limit:
        raise SecurityError(f"package is {len(data)} bytes, over the limit of {limit}")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as exc:
        raise SecurityError(f"package is not a valid ZIP archive: {exc}") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_FILES + 2:
            raise SecurityError(f"package has {len(infos)} entries, over the limit of {MAX_FILES + 2}")
        seen: set[str] = set()
        declared = 0
        for info in infos:
            name = info.filename
            if info.orig_filename != name or "\x00" in name:
                raise SecurityError(f"package entry {info.orig_filename!r} has a NUL byte or an altered name")
            why = _entry_refusal(name)
            if name.endswith("/") and why is None:
                why = f"package entry {name!r} is a directory"
            if why:
                raise SecurityError(why)
            if name in seen:
                raise SecurityError(f"package entry {name!r} appears twice")
            seen.add(name)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise SecurityError(f"package entry {name!r} is a symlink")
            if stat.S_ISDIR(mode) or info.external_attr & 0x10:
                raise SecurityError(f"package entry {name!r} is a directory")
            if stat.S_IFMT(mode) and not stat.S_ISREG(mode):
                raise SecurityError(f"package entry {name!r} is not a regular file (mode {mode:o})")
            if info.flag_bits & 0x1:
                raise SecurityError(f"package entry {name!r} is ZIP-encrypted")
            if info.compress_type != zipfile.ZIP_STORED:
                raise SecurityError(
                    f"package entry {name!r} is compressed (method {info.compress_type}); packages are stored only"
                )
            cap = (
                MAX_MANIFEST_BYTES
                if name == MANIFEST_ENTRY
                else SIGNATURE_BYTES
                if name == SIGNATURE_ENTRY
                else max_bytes + TAG_BYTES
            )
            if info.file_size > cap:
                raise SecurityError(
                    f"package entry {name!r} declares {info.file_size} bytes, over the limit of {cap}"
                )
            if info.compress_size != info.file_size:
                raise SecurityError(
                    f"package entry {name!r} declares {info.file_size} bytes stored in {info.compress_size}"
                )
            declared += info.file_size
        if declared > len(data):
            raise SecurityError(
                f"package entries declare {declared} bytes, more than the archive's own {len(data)} bytes"
            )
        try:
            contents = {info.filename: zf.read(info) for info in infos}
        except (zipfile.BadZipFile, ValueError, EOFError, OSError) as exc:
            raise SecurityError(f"package has a corrupt entry: {exc}") from None
    for name, body in contents.items():
        if len(body) != zf.getinfo(name).file_size:
            raise SecurityError(f"package entry {name!r} is not the size it declares")
    sig = contents.pop(SIGNATURE_ENTRY, None)
    if sig is not None and len(sig) != SIGNATURE_BYTES:
        raise SecurityError(
            f"manifest.sig is {len(sig)} bytes, expected a {SIGNATURE_BYTES}-byte Ed25519 signature"
        )
    manifest = contents.pop(MANIFEST_ENTRY, None)
    files = {name[len(FILES_PREFIX) :]: body for name, body in contents.items()}
    return _Archive(manifest, sig, files)


def _write_archive(out: Path, manifest: bytes, signature: bytes | None, files: Mapping[str, bytes]) -> None:
    """Write a package atomically (a temporary file renamed over ``out``)."""
    entries: list[tuple[str, bytes]] = [(MANIFEST_ENTRY, manifest)]
    if signature is not None:
        entries.append((SIGNATURE_ENTRY, signature))
    entries += [(FILES_PREFIX + p, files[p]) for p in sorted(files)]
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, body in entries:
                info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
                info.compress_type = zipfile.ZIP_STORED
                info.create_system = 3
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                zf.writestr(info, body)
        os.replace(tmp, out)
    except OSError as exc:
        raise ConfigError(f"cannot write package {str(out)!r}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _load_pkg_bytes(pkg: bytes | str | os.PathLike[str], max_bytes: int) -> bytes:
    if isinstance(pkg, bytes):
        return pkg
    p = Path(pkg)
    try:
        size = p.stat().st_size
        limit = _package_limit(max_bytes)
        if size > limit:
            raise SecurityError(f"package {str(p)!r} is {size} bytes, over the limit of {limit}")
        return p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read package {str(p)!r}: {exc.strerror or exc}") from None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_entries(manifest: Manifest, files: Mapping[str, bytes], max_bytes: int) -> None:
    """The archive's files/ entries are exactly the manifest's, each the size and digest it declares."""
    listed = {f.path for f in manifest.files}
    added = sorted(set(files) - listed)
    missing = sorted(listed - set(files))
    if added or missing:
        parts = []
        if added:
            parts.append("not in the manifest: " + ", ".join(FILES_PREFIX + p for p in added))
        if missing:
            parts.append("listed but missing: " + ", ".join(FILES_PREFIX + p for p in missing))
        raise SecurityError(
            f"package {manifest.ref} entries do not match its signed manifest ({'; '.join(parts)})"
        )
    total = 0
    for f in manifest.files:
        if f.size > max_bytes:
            raise SecurityError(f"package file {f.path!r} is {f.size} bytes, over the limit of {max_bytes}")
        total += f.size
        body = files[f.path]
        if manifest.encryption is None:
            expect_size, expect_sha, kind = f.size, f.sha256, "file"
        else:
            expect_size, expect_sha, kind = (
                f.size + TAG_BYTES,
                manifest.encryption.file(f.path).sha256,
                "ciphertext of",
            )
        if len(body) != expect_size:
            raise SecurityError(
                f"package {kind} {f.path!r} is {len(body)} bytes, the signed manifest says {expect_size}"
            )
        if _sha256(body) != expect_sha:
            raise SecurityError(
                f"package {kind} {f.path!r} does not match its SHA-256 in the signed manifest"
            )
    if total > max_bytes:
        raise SecurityError(f"package files total {total} bytes, over the limit of {max_bytes}")


# -------------------------------------------------------------------------------------- verifying


def _verified(pkg: bytes, pubkey: Ed25519PublicKey, max_bytes: int) -> tuple[Manifest, dict[str, bytes]]:
    arc = _read_archive(pkg, max_bytes)
    if arc.manifest is None:
        raise SecurityError("package has no manifest.json")
    trusted = hashlib.sha256(_raw_public(pubkey)).hexdigest()
    if arc.signature is None:
        raise SecurityError("package is unsigned (no manifest.sig); sign it with 'meshai package sign'")
    try:
        pubkey.verify(arc.signature, arc.manifest)
    except InvalidSignature:
        claimed = _claimed_signer(arc.manifest)
        if claimed is not None and claimed != trusted:
            raise SecurityError(
                f"package is signed by key {claimed[:16]}…, not the trusted key {trusted[:16]}…"
            ) from None
        raise SecurityError(
            f"package signature does not verify against the trusted key {trusted[:16]}…: "
            "manifest.json or manifest.sig was changed"
        ) from None
    manifest = Manifest.from_bytes(arc.manifest)
    if manifest.signer != trusted:
        raise SecurityError(
            f"package manifest names signer {manifest.signer!r}, not the trusted key {trusted}"
        )
    _check_entries(manifest, arc.files, max_bytes)
    return manifest, arc.files


def _claimed_signer(manifest: bytes) -> str | None:
    """The unverified ``signer`` field, used only to word an error message."""
    try:
        obj = json.loads(manifest)
    except (ValueError, RecursionError):
        return None
    s = obj.get("signer") if isinstance(obj, dict) else None
    return s if isinstance(s, str) and _HEX64_RE.fullmatch(s) else None


def verify_package(
    pkg: bytes | str | os.PathLike[str],
    pubkey: bytes | str | os.PathLike[str] | Ed25519PublicKey,
    *,
    max_bytes: int = MAX_MODEL_BYTES,
) -> Manifest:
    """Check a package's structure, signature (against ``pubkey``) and every stored digest; return its
    manifest or raise SecurityError. Encrypted files are checked as ciphertext; contents are not opened."""
    key = load_public_key(pubkey)
    return _verified(_load_pkg_bytes(pkg, max_bytes), key, max_bytes)[0]


def inspect_package(
    pkg: bytes | str | os.PathLike[str], *, max_bytes: int = MAX_MODEL_BYTES
) -> tuple[Manifest, bool]:
    """The manifest of a structurally valid package and whether it carries a signature — NOT verified."""
    arc = _read_archive(_load_pkg_bytes(pkg, max_bytes), max_bytes)
    if arc.manifest is None:
        raise SecurityError("package has no manifest.json")
    return Manifest.from_bytes(arc.manifest), arc.signature is not None


def peek_file(pkg: bytes, path: str, *, max_bytes: int = MAX_MODEL_BYTES) -> bytes | None:
    """File ``path`` of a package as stored — NOT verified — or None when it is absent or encrypted.
    For hints only (a planner reading which artifacts a package carries); nodes verify everything."""
    manifest, _signed = inspect_package(pkg, max_bytes=max_bytes)
    if manifest.encrypted:
        return None
    return _read_archive(pkg, max_bytes).files.get(path)


def read_signed(path: str | os.PathLike[str], *, max_bytes: int = MAX_MODEL_BYTES) -> tuple[bytes, Manifest]:
    """A package file's bytes and manifest, refused (ConfigError) when unreadable or unsigned.  The
    signature is checked by whoever stores it (the nodes), against the fleet key."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read package {os.fspath(path)!r}: {exc.strerror}") from None
    manifest, signed = inspect_package(data, max_bytes=max_bytes)
    if not signed:
        raise ConfigError(f"package {os.fspath(path)!r} is not signed (meshai package sign)")
    return data, manifest


def _unwrap(enc: Encryption, recipient: tuple[str, bytes] | None, ref: str) -> bytes:
    ids = ", ".join(r.id for r in enc.recipients)
    if recipient is None:
        raise SecurityError(f"package {ref} is encrypted (for {ids}); this node has no identity to open it")
    rid, priv_bytes = recipient
    entry = enc.recipient(rid)
    if entry is None:
        raise SecurityError(f"package {ref} is encrypted for {ids}, not for {rid!r}")
    try:
        priv = _x25519_private(priv_bytes, f"identity key of {rid!r}")
    except ConfigError as exc:
        raise SecurityError(str(exc)) from None
    own_pub = _raw_public(priv.public_key())
    label = _WRAP_LABEL + rid.encode()
    try:
        shared = priv.exchange(X25519PublicKey.from_public_bytes(entry.epk))
        kwk = HKDF(hashes.SHA256(), KEY_BYTES, entry.epk + own_pub, label).derive(shared)
        return AESGCM(kwk).decrypt(entry.nonce, entry.wrapped, label)
    except (InvalidTag, ValueError):
        raise SecurityError(
            f"package {ref}: the content key wrapped for {rid!r} does not open with this identity's key"
        ) from None


def open_package(
    pkg_bytes: bytes | str | os.PathLike[str],
    trusted_pubkey: bytes | str | os.PathLike[str] | Ed25519PublicKey,
    *,
    recipient: tuple[str, bytes] | None = None,
    max_bytes: int = MAX_MODEL_BYTES,
) -> OpenedPackage:
    """Verify a package, decrypt it into memory only (``recipient`` = (id, X25519 private key)), re-check
    every plaintext digest and every ONNX file (:func:`check_onnx_file`); SecurityError on any refusal."""
    key = load_public_key(trusted_pubkey)
    manifest, stored = _verified(_load_pkg_bytes(pkg_bytes, max_bytes), key, max_bytes)
    plain: dict[str, bytes] = {}
    if manifest.encryption is None:
        plain = dict(stored)
    else:
        aead = AESGCM(_unwrap(manifest.encryption, recipient, manifest.ref))
        for f in manifest.files:
            try:
                plain[f.path] = aead.decrypt(
                    manifest.encryption.file(f.path).nonce, stored.pop(f.path), f.path.encode()
                )
            except InvalidTag:
                raise SecurityError(f"package {manifest.ref} file {f.path!r} fails authentication") from None
    for f in manifest.files:
        body = plain[f.path]
        if len(body) != f.size or _sha256(body) != f.sha256:
            raise SecurityError(
                f"package {manifest.ref} file {f.path!r} does not match its SHA-256 in the manifest"
            )
        if f.path.endswith(".onnx"):
            check_onnx_file(body, f"package {manifest.ref} file {f.path!r}", max_bytes=max_bytes)
    return OpenedPackage(manifest, plain)


# ------------------------------------------------------------------------------------------ ONNX


def _tensors(root: _PbMessage) -> Iterator[onnx.TensorProto]:
    """Every TensorProto anywhere in a protobuf message (subgraphs, functions, sparse tensors…)."""
    stack: list[_PbMessage] = [root]
    while stack:
        msg = stack.pop()
        if isinstance(msg, onnx.TensorProto):
            yield msg
            continue
        for _fd, value in msg.ListFields():
            if isinstance(value, _PbMessage):
                stack.append(value)
            elif not isinstance(value, (str, bytes, int, float, bool)):
                stack.extend(v for v in value if isinstance(v, _PbMessage))


def check_onnx_file(data: bytes, what: str = "model", *, max_bytes: int = MAX_MODEL_BYTES) -> onnx.ModelProto:
    """Parse an ONNX file a package carries; SecurityError if it is over ``max_bytes``, not valid ONNX,
    or refers to external data anywhere (initializers, Constant attributes, subgraphs, functions)."""
    if len(data) > max_bytes:
        raise SecurityError(f"{what} is {len(data)} bytes, over the model size limit of {max_bytes}")
    try:
        model = model_from_bytes(data, what)
    except ModelError as exc:
        raise SecurityError(str(exc)) from None
    refs = []
    for t in _tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data) > 0:
            loc = next((e.value for e in t.external_data if e.key == "location"), "?")
            refs.append(f"{t.name or '<unnamed>'} -> {loc!r}")
    if refs:
        shown = ", ".join(refs[:5]) + (f" and {len(refs) - 5} more" if len(refs) > 5 else "")
        raise SecurityError(
            f"{what} refers to external data ({shown}); packaged models must be self-contained"
        )
    return model


# ------------------------------------------------------------------------------------- building


def _seal(plain: Mapping[str, bytes], recipients: Mapping[str, bytes]) -> tuple[Encryption, dict[str, bytes]]:
    content_key = AESGCM.generate_key(bit_length=256)
    aead = AESGCM(content_key)
    stored: dict[str, bytes] = {}
    sealed: list[EncryptedFile] = []
    for path in sorted(plain):
        nonce = os.urandom(NONCE_BYTES)
        ct = aead.encrypt(nonce, plain[path], path.encode())
        stored[path] = ct
        sealed.append(EncryptedFile(path, nonce, _sha256(ct)))
    keys: list[RecipientKey] = []
    for rid in sorted(recipients):
        _check_recipient_id(rid)
        pub = _x25519_public(recipients[rid], f"X25519 public key of {rid!r}")
        eph = X25519PrivateKey.generate()
        epk = _raw_public(eph.public_key())
        label = _WRAP_LABEL + rid.encode()
        try:
            shared = eph.exchange(X25519PublicKey.from_public_bytes(pub))
        except ValueError:
            raise ConfigError(f"X25519 public key of {rid!r} is invalid (a low-order point)") from None
        kwk = HKDF(hashes.SHA256(), KEY_BYTES, epk + pub, label).derive(shared)
        nonce = os.urandom(NONCE_BYTES)
        keys.append(RecipientKey(rid, epk, nonce, AESGCM(kwk).encrypt(nonce, content_key, label)))
    return Encryption(tuple(keys), tuple(sealed)), stored


def read_files(named: Mapping[str, Path]) -> dict[str, bytes]:
    """Read files for a package (package path -> file), each within the size limit; ConfigError."""
    files: dict[str, bytes] = {}
    for rel, p in named.items():
        try:
            size = p.stat().st_size
            if size > MAX_MODEL_BYTES:
                raise ConfigError(f"{str(p)!r} is {size} bytes, over the limit of {MAX_MODEL_BYTES}")
            files[rel] = p.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {str(p)!r}: {exc.strerror or exc}") from None
    return files


def _collect(models: Sequence[str | os.PathLike[str]] | Mapping[str, bytes]) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    if isinstance(models, Mapping):
        for path, body in models.items():
            if not isinstance(body, bytes):
                raise ConfigError(f"package file {path!r} must be bytes, not {type(body).__name__}")
            files[_check_path(path)] = body
    else:
        named: dict[str, Path] = {}
        for m in models:
            p = Path(m)
            rel = _check_path(p.name, f"file name of {str(p)!r}")
            if rel in named:
                raise ConfigError(f"two files are named {rel!r} in one package")
            named[rel] = p
        files = read_files(named)
    if not files:
        raise ConfigError("a package needs at least one file")
    if len(files) > MAX_FILES:
        raise ConfigError(f"a package holds at most {MAX_FILES} files, got {len(files)}")
    folded = [p.casefold() for p in files]
    if len(set(folded)) != len(folded):
        raise ConfigError("two package files differ only in case")
    return files


def build_package(
    models: Sequence[str | os.PathLike[str]] | Mapping[str, bytes],
    name: str,
    version: str,
    out: str | os.PathLike[str],
    *,
    encrypt_for: Mapping[str, bytes] | None = None,
    created: str | _dt.datetime | None = None,
) -> Path:
    """Write an unsigned package of ``models`` (file paths, stored under their base names, or
    relpath -> bytes), sealed for ``encrypt_for`` (id -> X25519 public key) if given; return its path.
    ConfigError for bad arguments, ModelError for an ONNX file a node would refuse."""
    _check_name(name)
    _check_version(version)
    when = _as_time(created, "created")
    files = _collect(models)
    for path, body in files.items():
        if path.endswith(".onnx"):
            try:
                check_onnx_file(body, f"model {path!r}")
            except SecurityError as exc:
                raise ModelError(str(exc)) from None
    entries = tuple(FileEntry(p, _sha256(files[p]), len(files[p])) for p in sorted(files))
    enc: Encryption | None = None
    stored = files
    if encrypt_for is not None:
        if not encrypt_for:
            raise ConfigError("--encrypt-for names no recipients")
        enc, stored = _seal(files, encrypt_for)
    manifest = Manifest(name, version, when, entries, enc, None)
    body = manifest.to_bytes()
    if len(body) > MAX_MANIFEST_BYTES:
        raise ConfigError(f"manifest would be {len(body)} bytes, over the limit of {MAX_MANIFEST_BYTES}")
    out_path = Path(out)
    _write_archive(out_path, body, None, stored)
    return out_path


def sign_package(
    pkg_path: str | os.PathLike[str],
    key_path: bytes | str | os.PathLike[str] | Ed25519PrivateKey,
    *,
    max_bytes: int = MAX_MODEL_BYTES,
) -> Manifest:
    """Sign a package in place: set ``signer``, sign manifest.json, rewrite the archive atomically.
    Refuses (SecurityError) a package whose entries no longer match its manifest."""
    key = load_signing_key(key_path)
    p = Path(pkg_path)
    arc = _read_archive(_load_pkg_bytes(p, max_bytes), max_bytes)
    if arc.manifest is None:
        raise SecurityError(f"{str(p)!r} has no manifest.json")
    old = Manifest.from_bytes(arc.manifest)
    _check_entries(old, arc.files, max_bytes)
    signer = hashlib.sha256(_raw_public(key.public_key())).hexdigest()
    new = Manifest(old.name, old.version, old.created, old.files, old.encryption, signer)
    body = new.to_bytes()
    _write_archive(p, body, key.sign(body), arc.files)
    return new


# ------------------------------------------------------------------------------------- rollback


@dataclass(frozen=True, slots=True)
class RollbackInstruction:
    """A fleet-signed "run NAME at VERSION": the one thing that lets a node go below its highest version."""

    name: str
    version: str
    issued_at: str
    signature: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_name(self.name, "rollback package name")
        _check_version(self.version, "rollback version")
        _check_time(self.issued_at, "rollback issued_at")
        if not isinstance(self.signature, bytes) or len(self.signature) != SIGNATURE_BYTES:
            raise ConfigError(f"rollback signature must be {SIGNATURE_BYTES} bytes")

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    @staticmethod
    def payload_for(name: str, version: str, issued_at: str) -> bytes:
        """The exact bytes a rollback signature covers."""
        return _canonical(
            {"format": ROLLBACK_FORMAT, "issued_at": issued_at, "name": name, "version": version}
        )

    def payload(self) -> bytes:
        """The exact bytes this instruction's signature covers."""
        return self.payload_for(self.name, self.version, self.issued_at)

    def verify(self, pubkey: bytes | str | os.PathLike[str] | Ed25519PublicKey) -> None:
        """Raise SecurityError unless the signature verifies against ``pubkey``."""
        key = load_public_key(pubkey)
        try:
            key.verify(self.signature, self.payload())
        except InvalidSignature:
            raise SecurityError(
                f"rollback instruction for {self.ref} (issued {self.issued_at}) is not signed by the trusted key"
            ) from None

    def to_dict(self) -> dict[str, str]:
        """JSON/wire form (signature in base64)."""
        return {
            "issued_at": self.issued_at,
            "name": self.name,
            "signature": _b64e(self.signature),
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, obj: object) -> RollbackInstruction:
        """Parse the JSON/wire form; SecurityError if malformed."""
        d = _keys(obj, {"issued_at", "name", "signature", "version"}, "rollback instruction")
        sig = _b64d(d["signature"], "rollback signature", SIGNATURE_BYTES)
        try:
            return cls(d["name"], d["version"], d["issued_at"], sig)
        except ConfigError as exc:
            raise SecurityError(f"rollback instruction: {exc}") from None


def sign_rollback(
    name: str,
    version: str,
    key: bytes | str | os.PathLike[str] | Ed25519PrivateKey,
    *,
    issued_at: str | _dt.datetime | None = None,
) -> RollbackInstruction:
    """Sign an instruction to roll ``name`` back to ``version`` with the fleet's signing key."""
    _check_name(name, "rollback package name")
    _check_version(version, "rollback version")
    when = _as_time(issued_at, "rollback issued_at")
    sk = load_signing_key(key)
    return RollbackInstruction(
        name, version, when, sk.sign(RollbackInstruction.payload_for(name, version, when))
    )
