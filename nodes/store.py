"""A node's versioned model store: verify, keep (encrypted at rest), activate, roll back.

Layout under ``root`` (folders 0700, files 0600)::

    root/NAME/VERSION.pkg     the package exactly as received (an encrypted one stays encrypted)
    root/NAME/state.json      {"active": VERSION|null, "highest": VERSION|null, "rollback_issued_at": T|null}

``highest`` is the highest version ever activated for NAME.  Nothing below it is stored or activated
without a :class:`~meshai.packages.RollbackInstruction` for exactly that NAME@VERSION, signed by the
fleet key, issued after the last rollback applied here and after the active package was created (so
an old instruction cannot be replayed).  Every refusal is a ``SecurityError`` (``DeploymentError`` for
a package that is simply not stored) and leaves the store — files, active version — untouched; every
write is a temporary file renamed into place.  Plaintext exists only in memory: :meth:`ModelStore.open`
decrypts into an :class:`~meshai.packages.OpenedPackage` and never writes it.

The methods do blocking file I/O, hashing and decryption; call them from a worker thread
(``asyncio.to_thread``) in the agent.  A lock serialises changes within one process.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from meshai.errors import ConfigError, DeploymentError, SecurityError
from meshai.models import MAX_MODEL_BYTES
from meshai.packages import (
    Manifest,
    OpenedPackage,
    RollbackInstruction,
    load_public_key,
    open_package,
    parse_package_ref,
    verify_package,
    version_key,
)

__all__ = ["ModelStore"]

_STATE = "state.json"


@dataclass(frozen=True, slots=True)
class _State:
    active: str | None = None
    highest: str | None = None
    rollback_issued_at: str | None = None

    def to_bytes(self) -> bytes:
        return json.dumps(
            {"active": self.active, "highest": self.highest, "rollback_issued_at": self.rollback_issued_at},
            sort_keys=True,
        ).encode()


def _check_ref(name: str, version: str) -> None:
    parse_package_ref(f"{name}@{version}")


class ModelStore:
    """Versioned packages for one node, verified against the fleet's ``trusted_pubkey``."""

    def __init__(
        self,
        root: Path,
        trusted_pubkey: bytes,
        recipient: tuple[str, bytes] | None = None,
        *,
        max_bytes: int = MAX_MODEL_BYTES,
        require_encryption: bool = False,
    ) -> None:
        self.root = Path(root)
        self._pubkey = load_public_key(trusted_pubkey)
        self._recipient = recipient
        self._max_bytes = max_bytes
        self._require_encryption = require_encryption
        self._lock = threading.RLock()
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise ConfigError(
                f"cannot create model store {str(self.root)!r}: {exc.strerror or exc}"
            ) from None

    # ------------------------------------------------------------------------------------ queries

    def names(self) -> list[str]:
        """Names with at least one stored version, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and any(p.glob("*.pkg")))

    def versions(self, name: str) -> list[str]:
        """Stored versions of ``name``, lowest first (numerically)."""
        _check_ref(name, "0")
        folder = self.root / name
        if not folder.is_dir():
            return []
        out = []
        for p in folder.glob("*.pkg"):
            try:
                version_key(p.stem)
            except ConfigError:
                continue  # not a file the store wrote; never read
            out.append(p.stem)
        return sorted(out, key=version_key)

    def active(self, name: str) -> str | None:
        """The active version of ``name``, or None."""
        _check_ref(name, "0")
        return self._state(name).active

    def highest(self, name: str) -> str | None:
        """The highest version of ``name`` ever activated here, or None."""
        _check_ref(name, "0")
        return self._state(name).highest

    def path(self, name: str, version: str) -> Path:
        """Where NAME@VERSION is (or would be) stored."""
        _check_ref(name, version)
        return self.root / name / f"{version}.pkg"

    # ------------------------------------------------------------------------------------ changes

    def add(
        self,
        pkg_bytes: bytes,
        *,
        expect: str | None = None,
        allow_downgrade_with: RollbackInstruction | None = None,
    ) -> Manifest:
        """Verify and fully open a package (signature, digests, decryption, ONNX checks), then store it
        as received; ``expect`` = the NAME@VERSION the sender claimed.  Adding the identical package
        again is a no-op.  Refuses (SecurityError) anything else, storing nothing."""
        opened = self._open_bytes(pkg_bytes)
        m = opened.manifest
        del opened  # plaintext is not kept
        if expect is not None and expect != m.ref:
            raise SecurityError(f"package is {m.ref}, not {expect} as announced")
        with self._lock:
            state = self._state(m.name)
            self._check_not_downgrade(m.name, m.version, state, allow_downgrade_with)
            target = self.path(m.name, m.version)
            for v in self.versions(m.name):
                if v != m.version and version_key(v) == version_key(m.version):
                    raise SecurityError(f"{m.ref} is the same version as the stored {m.name}@{v}")
            if target.exists():
                if target.read_bytes() == pkg_bytes:
                    return m
                raise SecurityError(
                    f"a different package is already stored as {m.ref}; versions are immutable"
                )
            self._write(target, pkg_bytes)
        return m

    def check_activate(
        self, name: str, version: str, *, allow_downgrade_with: RollbackInstruction | None = None
    ) -> Manifest:
        """Raise what :meth:`activate` would raise, changing nothing; return the stored manifest."""
        with self._lock:
            m = self._verify_stored(name, version)
            self._check_not_downgrade(name, version, self._state(name), allow_downgrade_with)
            return m

    def activate(
        self, name: str, version: str, *, allow_downgrade_with: RollbackInstruction | None = None
    ) -> Manifest:
        """Make a stored NAME@VERSION the active one, after re-verifying the file at rest.  A version
        below the highest ever activated needs ``allow_downgrade_with`` (see :meth:`rollback`)."""
        with self._lock:
            m = self._verify_stored(name, version)
            state = self._state(name)
            self._check_not_downgrade(name, version, state, allow_downgrade_with)
            highest = state.highest
            if highest is None or version_key(version) > version_key(highest):
                highest = version
            issued = state.rollback_issued_at
            if allow_downgrade_with is not None:
                issued = allow_downgrade_with.issued_at
            self._write(self.root / name / _STATE, _State(version, highest, issued).to_bytes())
            return m

    def rollback(self, instruction: RollbackInstruction) -> Manifest:
        """Activate the stored version a verified, fresh RollbackInstruction names; applying the same
        instruction again while its version is active is a no-op."""
        with self._lock:
            state = self._state(instruction.name)
            if state.active == instruction.version and state.rollback_issued_at == instruction.issued_at:
                instruction.verify(self._pubkey)
                return self._verify_stored(instruction.name, instruction.version)
            return self.activate(instruction.name, instruction.version, allow_downgrade_with=instruction)

    def open(self, name: str, version: str) -> OpenedPackage:
        """Verify the stored NAME@VERSION again and decrypt it into memory (never onto disk)."""
        path = self._existing(name, version)
        opened = self._open_bytes(path.read_bytes())
        if opened.manifest.ref != f"{name}@{version}":
            raise SecurityError(
                f"stored file {str(path)!r} holds {opened.manifest.ref}, not {name}@{version}"
            )
        return opened

    # ----------------------------------------------------------------------------------- internals

    def _open_bytes(self, pkg_bytes: bytes) -> OpenedPackage:
        if not isinstance(pkg_bytes, bytes):
            raise ConfigError(f"package must be bytes, not {type(pkg_bytes).__name__}")
        opened = open_package(pkg_bytes, self._pubkey, recipient=self._recipient, max_bytes=self._max_bytes)
        if self._require_encryption and not opened.manifest.encrypted:
            raise SecurityError(f"package {opened.manifest.ref} is not encrypted, and this node requires it")
        return opened

    def _existing(self, name: str, version: str) -> Path:
        path = self.path(name, version)
        if not path.is_file():
            raise DeploymentError(
                f"package {name}@{version} is not in this node's store (stored: {self.versions(name) or 'none'})"
            )
        return path

    def _verify_stored(self, name: str, version: str) -> Manifest:
        path = self._existing(name, version)
        m = verify_package(path.read_bytes(), self._pubkey, max_bytes=self._max_bytes)
        if m.ref != f"{name}@{version}":
            raise SecurityError(f"stored file {str(path)!r} holds {m.ref}, not {name}@{version}")
        return m

    def _check_not_downgrade(
        self, name: str, version: str, state: _State, instruction: RollbackInstruction | None
    ) -> None:
        ref = f"{name}@{version}"
        if instruction is not None:
            self._check_instruction(instruction, ref, name, state)
        elif (
            state.highest is not None
            and version != state.active  # the active version (a signed rollback's) is no downgrade
            and version_key(version) < version_key(state.highest)
        ):
            raise SecurityError(
                f"refusing {ref}: lower than {state.highest}, the highest version this node has activated "
                "(a rollback needs a signed rollback instruction)"
            )

    def _check_instruction(
        self, instruction: RollbackInstruction, ref: str, name: str, state: _State
    ) -> None:
        if instruction.ref != ref:
            raise SecurityError(f"rollback instruction names {instruction.ref}, not {ref}")
        instruction.verify(self._pubkey)
        if state.rollback_issued_at is not None and instruction.issued_at <= state.rollback_issued_at:
            raise SecurityError(
                f"rollback instruction for {ref} was issued at {instruction.issued_at}, not after the last "
                f"rollback applied here ({state.rollback_issued_at}): a replay"
            )
        if state.active is not None:
            active_path = self.root / name / f"{state.active}.pkg"
            if active_path.is_file():
                created = verify_package(
                    active_path.read_bytes(), self._pubkey, max_bytes=self._max_bytes
                ).created
                if instruction.issued_at < created:
                    raise SecurityError(
                        f"rollback instruction for {ref} was issued at {instruction.issued_at}, before the "
                        f"active {name}@{state.active} was created ({created}): a replay"
                    )

    def _state(self, name: str) -> _State:
        path = self.root / name / _STATE
        if not path.exists():
            return _State()
        try:
            obj = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise SecurityError(f"model store state {str(path)!r} is unreadable: {exc}") from None
        if not isinstance(obj, dict) or set(obj) != {"active", "highest", "rollback_issued_at"}:
            raise SecurityError(f"model store state {str(path)!r} is malformed")
        for key in ("active", "highest"):
            v = obj[key]
            if v is not None:
                try:
                    version_key(v)
                except ConfigError:
                    raise SecurityError(f"model store state {str(path)!r} has a bad {key} {v!r}") from None
        issued = obj["rollback_issued_at"]
        if issued is not None and not isinstance(issued, str):
            raise SecurityError(f"model store state {str(path)!r} has a bad rollback_issued_at")
        return _State(obj["active"], obj["highest"], issued)

    def _write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise DeploymentError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
        finally:
            if tmp.exists():
                tmp.unlink()
