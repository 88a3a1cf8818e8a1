"""The mesh CA, identities, revocation and mutual TLS 1.3: real crypto, real TLS over 127.0.0.1.

Each network test runs its own event loop via ``asyncio.run`` and uses ``meshai.transport``
(``Server`` / ``connect``) with the contexts of ``meshai.security``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
import re
import shutil
import ssl
import stat
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.x509.oid import NameOID

from meshai import security as sec
from meshai.errors import ConfigError, MeshaiError, PeerError, SecurityError
from meshai.protocol import PROTOCOL_VERSION, Hello
from meshai.security_cli import add_ca_parser
from meshai.transport import Channel, Server, connect

T = TypeVar("T")
HOST = "127.0.0.1"


def run(coro: Coroutine[Any, Any, T], timeout: float = 8.0) -> T:
    async def main() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(main())


def hello(node_id: str, role: str = "node") -> Hello:
    return Hello(node_id, PROTOCOL_VERSION, role, {}, "127.0.0.1:9" if role == "node" else "")


def der(identity: sec.Identity) -> bytes:
    return identity.certificate.public_bytes(serialization.Encoding.DER)


@dataclasses.dataclass
class Mesh:
    root: Path
    ca: Path
    n1: sec.Identity
    n2: sec.Identity
    c1: sec.Identity
    other_n1: sec.Identity  # "n1" from another CA
    self_signed_n1: sec.Identity  # "n1" signed by its own key
    expired: sec.Identity  # "n5", expired three days ago


def _self_signed(name: str, directory: Path) -> sec.Identity:
    """A certificate that claims a mesh identity but is signed by its own key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"meshai:node:{name}")]),
            critical=False,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    xk = x25519.X25519PrivateKey.generate()
    raw = serialization.Encoding.Raw
    return sec.Identity(
        name=name,
        role="node",
        cert_pem=pem,
        key_pem=key_pem,
        ca_pem=pem,  # it trusts itself
        x25519_private=xk.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()),
        x25519_public=xk.public_key().public_bytes(raw, serialization.PublicFormat.Raw),
        directory=directory,
    )


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Mesh:
    root = tmp_path_factory.mktemp("mesh")
    ca = root / "ca"
    sec.ca_init(ca, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=30))  # old enough to have issued n5
    n1 = sec.ca_issue("n1", ca, root / "n1")
    n2 = sec.ca_issue("n2", ca, root / "n2")
    c1 = sec.ca_issue("c1", ca, root / "c1", role="client")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    sec.ca_issue("n5", ca, root / "n5", days=7, now=past)
    expired = sec.load_identity(root / "n5", now=past)
    sec.ca_init(root / "other-ca")
    other_n1 = sec.ca_issue("n1", root / "other-ca", root / "other-n1")
    return Mesh(root, ca, n1, n2, c1, other_n1, _self_signed("n1", root / "fake-n1"), expired)


class Gate:
    """Server handler: checks each peer with ``check_peer``, records the answer or the refusal."""

    def __init__(self, crl: sec.RevocationList | None = None) -> None:
        self.crl = crl
        self.results: asyncio.Queue[sec.PeerIdentity | SecurityError] = asyncio.Queue()

    async def __call__(self, channel: Channel) -> None:
        assert channel._transport is not None
        ssl_object = channel._transport.get_extra_info("ssl_object")
        try:
            peer = sec.check_peer(
                ssl_object, channel.peer_id, channel.their_hello.role, self.crl, peer=channel.peername
            )
        except SecurityError as exc:
            await self.results.put(exc)
            await channel.close(f"refused: {exc}")
            return
        await self.results.put(peer)
        async for _ in channel:
            pass


async def _serve(identity: sec.Identity, gate: Gate) -> Server:
    srv = Server(HOST, 0, lambda: hello(identity.name), gate, ssl=sec.server_context(identity))
    return await srv.__aenter__()


async def _dial(srv: Server, identity: sec.Identity, claim: str | None = None, role: str = "node") -> Channel:
    return await connect(
        HOST, srv.port, hello(claim or identity.name, role), ssl=sec.client_context(identity), timeout=3.0
    )


async def _assert_still_serves(srv: Server, gate: Gate, mesh: Mesh) -> None:
    ch = await _dial(srv, mesh.n2)
    got = await gate.results.get()
    assert isinstance(got, sec.PeerIdentity) and got.name == "n2"
    await ch.close()


# --------------------------------------------------------------------------- CA and identities


def test_ca_files_and_modes(mesh: Mesh) -> None:
    assert {p.name for p in mesh.ca.iterdir()} >= {"ca.key", "ca.crt", "revoked.json", "issued.json"}
    assert stat.S_IMODE((mesh.ca / "ca.key").stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate((mesh.ca / "ca.crt").read_bytes())
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    crl = sec.load_revocations(mesh.ca, ca)
    assert (crl.version, crl.names, crl.serials) == (0, frozenset(), frozenset())

    d = mesh.n1.directory
    assert {p.name for p in d.iterdir()} == {
        "cert.pem",
        "key.pem",
        "ca.pem",
        "x25519.key",
        "x25519.pub",
        "revoked.json",
    }
    for private in ("key.pem", "x25519.key"):
        assert stat.S_IMODE((d / private).stat().st_mode) == 0o600
    assert (d / "ca.pem").read_bytes() == (mesh.ca / "ca.crt").read_bytes()


def test_ca_init_refuses_to_overwrite(mesh: Mesh) -> None:
    before = (mesh.ca / "ca.key").read_bytes()
    with pytest.raises(ConfigError, match="already holds a mesh CA"):
        sec.ca_init(mesh.ca)
    assert (mesh.ca / "ca.key").read_bytes() == before


def test_filesystem_errors_are_config_errors(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"cannot create the mesh CA: .*File exists"):
        sec.ca_init(tmp_path / "file")


def test_issue_load_round_trip_and_fingerprint(mesh: Mesh) -> None:
    ident = mesh.n1
    loaded = sec.load_identity(ident.directory)
    assert loaded == ident
    assert (ident.name, ident.role) == ("n1", "node")
    cert = ident.certificate
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "n1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["meshai:node:n1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH}
    cert.verify_directly_issued_by(ident.ca_certificate)

    # The fingerprint is the SHA-256 of the DER, the same from every form and every load.
    assert ident.fingerprint == hashlib.sha256(der(ident)).hexdigest()
    assert ident.fingerprint == loaded.fingerprint == sec.cert_fingerprint(ident.cert_pem)
    assert sec.cert_fingerprint(der(ident)) == ident.fingerprint
    assert len(ident.fingerprint) == 64

    assert sec.peer_id_from_cert(der(ident)) == ("n1", "node", ident.serial)
    assert sec.peer_id_from_cert(der(mesh.c1)) == ("c1", "client", mesh.c1.serial)
    c_eku = mesh.c1.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(c_eku) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
    assert len({mesh.n1.serial, mesh.n2.serial, mesh.c1.serial}) == 3

    # The X25519 package keys are a pair, and the certificate vouches for the public one.
    assert len(ident.x25519_private) == len(ident.x25519_public) == 32
    mine = x25519.X25519PrivateKey.from_private_bytes(ident.x25519_private)
    theirs = x25519.X25519PrivateKey.generate()
    assert mine.exchange(theirs.public_key()) == theirs.exchange(
        x25519.X25519PublicKey.from_public_bytes(ident.x25519_public)
    )
    assert sec.x25519_from_cert(ident.cert_pem) == ident.x25519_public
    assert "PRIVATE" not in repr(ident) and repr(ident.x25519_private) not in repr(ident)


def test_issue_refusals(mesh: Mesh, tmp_path: Path) -> None:
    for bad in ("", "a" * 64, "n 1", "n/1", "-n", ".", "ü"):
        with pytest.raises(ConfigError, match="identity name"):
            sec.ca_issue(bad, mesh.ca, tmp_path / "x")
    with pytest.raises(ConfigError, match="role"):
        sec.ca_issue("r1", mesh.ca, tmp_path / "x", role="admin")
    with pytest.raises(ConfigError, match="days"):
        sec.ca_issue("r1", mesh.ca, tmp_path / "x", days=0)
    with pytest.raises(ConfigError, match="outlive the mesh CA"):
        sec.ca_issue("r1", mesh.ca, tmp_path / "x", days=20000)
    with pytest.raises(ConfigError, match="not empty"):
        sec.ca_issue("r1", mesh.ca, mesh.n2.directory)
    with pytest.raises(ConfigError, match="holds no mesh CA"):
        sec.ca_issue("r1", tmp_path / "nowhere", tmp_path / "x")
    with pytest.raises(ConfigError, match="'n1' already has a certificate"):
        sec.ca_issue("n1", mesh.ca, tmp_path / "n1-again")
    assert not (tmp_path / "x").exists() and not (tmp_path / "n1-again").exists()


def test_replace_rotates_and_revokes_the_old_serial(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    sec.ca_init(ca)
    old = sec.ca_issue("r1", ca, tmp_path / "old")
    new = sec.ca_issue("r1", ca, tmp_path / "new", replace=True)
    crl = sec.load_revocations(ca, new.ca_pem)
    assert crl.version == 1 and crl.names == frozenset() and crl.serials == {old.serial}
    assert crl.is_revoked("r1", old.serial) and not crl.is_revoked("r1", new.serial)
    assert sec.load_revocations(new.directory, new.ca_pem) == crl  # the new identity carries it
    # The old directory still has the old list; once it learns the new one it refuses to load.
    assert sec.save_revocations(old.directory, crl)
    with pytest.raises(SecurityError, match=r"'r1' is revoked \(revocation list v1"):
        sec.load_identity(old.directory)
    sec.ca_revoke("r1", ca)
    with pytest.raises(SecurityError, match="never issued again"):
        sec.ca_issue("r1", ca, tmp_path / "again", replace=True)


def test_load_identity_refusals(mesh: Mesh, tmp_path: Path) -> None:
    def copy(src: sec.Identity, name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(src.directory, d)
        return d

    d = copy(mesh.n1, "missing")
    (d / "key.pem").unlink()
    (d / "x25519.pub").unlink()
    with pytest.raises(SecurityError, match=re.escape("lacks key.pem, x25519.pub")):
        sec.load_identity(d)

    d = copy(mesh.n1, "wrong-key")
    shutil.copy(mesh.n2.directory / "key.pem", d / "key.pem")
    with pytest.raises(SecurityError, match=re.escape("key.pem does not match the certificate of 'n1'")):
        sec.load_identity(d)

    d = copy(mesh.n1, "foreign-cert")
    shutil.copy(mesh.other_n1.directory / "cert.pem", d / "cert.pem")
    with pytest.raises(SecurityError, match="certificate of 'n1' is not signed by the mesh CA"):
        sec.load_identity(d)

    d = copy(mesh.n1, "wrong-x25519")
    shutil.copy(mesh.n2.directory / "x25519.key", d / "x25519.key")
    shutil.copy(mesh.n2.directory / "x25519.pub", d / "x25519.pub")
    with pytest.raises(
        SecurityError, match=re.escape("x25519.pub is not the X25519 key in the certificate of 'n1'")
    ):
        sec.load_identity(d)

    d = copy(mesh.n1, "garbage")
    (d / "cert.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(SecurityError, match=re.escape("not a valid X.509 certificate")):
        sec.load_identity(d)

    with pytest.raises(SecurityError, match="does not exist"):
        sec.load_identity(tmp_path / "absent")


def test_expired_and_not_yet_valid(mesh: Mesh) -> None:
    d = mesh.expired.directory
    with pytest.raises(SecurityError, match=r"certificate of 'n5' expired at 20\d\d-\d\d-\d\dT"):
        sec.load_identity(d)
    future = dt.datetime.now(dt.UTC) - dt.timedelta(days=20)
    with pytest.raises(SecurityError, match="certificate of 'n5' is not valid before"):
        sec.load_identity(d, now=future)
    assert sec.load_identity(d, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=5)).name == "n5"


# --------------------------------------------------------------------------- revocation list


def test_revocation_list_round_trip_and_tampering(mesh: Mesh, tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    sec.ca_init(ca)
    sec.ca_issue("t1", ca, tmp_path / "t1")
    t2 = sec.ca_issue("t2", ca, tmp_path / "t2")
    crl = sec.ca_revoke("t2", ca)
    assert crl.version == 1 and crl.names == {"t2"} and crl.serials == {t2.serial}
    crl.verify(t2.ca_pem)
    crl.verify(t2.ca_certificate)
    data = crl.to_bytes()
    assert data == (ca / "revoked.json").read_bytes()
    assert sec.RevocationList.from_bytes(data) == crl
    assert sec.RevocationList.from_bytes(data).to_bytes() == data
    doc = json.loads(data)
    assert sorted(doc) == ["format", "issued_at", "names", "serials", "signature", "version"]
    assert doc["serials"] == [format(t2.serial, "x")]
    assert sec.ca_revoke("t2", ca) == crl  # already revoked: unchanged

    # Tampered: a name or serial removed, the version raised; then a check against another CA.
    for tampered in (
        dataclasses.replace(crl, names=frozenset()),
        dataclasses.replace(crl, version=99),
        dataclasses.replace(crl, serials=frozenset({1})),
        sec.RevocationList.from_bytes(data.replace(b'"names":["t2"]', b'"names":[]')),
    ):
        with pytest.raises(SecurityError, match="is not signed by the mesh CA"):
            tampered.verify(t2.ca_pem)
        with pytest.raises(SecurityError, match="is not signed by the mesh CA"):
            sec.adopt_revocations(crl, tampered.to_bytes(), t2.ca_pem)
    with pytest.raises(SecurityError, match="is not signed by the mesh CA"):
        crl.verify(mesh.n1.ca_pem)
    (tmp_path / "t1" / "revoked.json").write_bytes(dataclasses.replace(crl, version=5).to_bytes())
    with pytest.raises(SecurityError, match="not signed"):
        sec.load_identity(tmp_path / "t1")

    for bad in (
        b"",
        b"[]",
        b"\xff",
        data.replace(b'"version":1', b'"version":-1'),
        data.replace(b'"version":1', b'"version":true'),
        data.replace(b'"version":1', b'"version":1,"version":2'),
        data.replace(b'"format":"meshai-revocations/1"', b'"format":"x"'),
        data.replace(b'"names":["t2"]', b'"names":["t2","t2"]'),
        data.replace(b'"names":["t2"]', b'"names":["../x"]'),
        data.replace(b'"serials":["', b'"serials":["0x'),
        data.replace(b'"issued_at":', b'"issued_at":NaN,"x":'),
        data.replace(b'"signature":"', b'"signature":"!'),
        b" " * (sec.MAX_REVOCATION_BYTES + 1),
    ):
        with pytest.raises(SecurityError, match="revocation list"):
            sec.RevocationList.from_bytes(bad)

    # newer / adopt / save
    v0 = sec.load_revocations(tmp_path / "t2", t2.ca_pem)  # the copy t2 got when issued
    assert v0.version == 0
    assert sec.newer(v0, crl) is crl and sec.newer(crl, v0) is crl and sec.newer(None, v0) is v0
    assert sec.adopt_revocations(v0, data, t2.ca_pem) == crl
    assert sec.adopt_revocations(crl, v0.to_bytes(), t2.ca_pem) is crl
    assert sec.save_revocations(tmp_path / "t2", crl) is True
    assert sec.save_revocations(tmp_path / "t2", v0) is False
    assert sec.load_revocations(tmp_path / "t2" / "revoked.json", t2.ca_pem) == crl


def test_revoke_unknown_name_is_refused(mesh: Mesh) -> None:
    with pytest.raises(ConfigError, match="never issued 'n9'"):
        sec.ca_revoke("n9", mesh.ca)


# --------------------------------------------------------------------------- mutual TLS


def test_mutual_tls_handshake_and_check_peer(mesh: Mesh) -> None:
    async def main() -> None:
        gate = Gate()
        srv = await _serve(mesh.n1, gate)
        try:
            ch = await _dial(srv, mesh.n2)
            server_view = await gate.results.get()
            assert isinstance(server_view, sec.PeerIdentity)
            assert (server_view.name, server_view.role, server_view.serial) == ("n2", "node", mesh.n2.serial)
            assert server_view.fingerprint == mesh.n2.fingerprint
            assert server_view.not_after == mesh.n2.not_after
            assert ch._transport is not None
            so = ch._transport.get_extra_info("ssl_object")
            assert so.version() == "TLSv1.3"
            client_view = sec.check_peer(so, ch.peer_id, "node", None, peer=ch.peername)
            assert client_view.name == "n1" and client_view.fingerprint == mesh.n1.fingerprint
            # A caller with a client certificate is a client.
            cc = await _dial(srv, mesh.c1, role="client")
            got = await gate.results.get()
            assert isinstance(got, sec.PeerIdentity) and (got.name, got.role) == ("c1", "client")
            await cc.close()
            await ch.close()
        finally:
            await srv.close()

    run(main())


def test_plaintext_client_refused_and_server_keeps_serving(mesh: Mesh) -> None:
    async def main() -> None:
        gate = Gate()
        srv = await _serve(mesh.n1, gate)
        try:
            with pytest.raises(PeerError):
                await connect(HOST, srv.port, hello("n2"), timeout=1.0)  # no TLS at all
            reader, writer = await asyncio.open_connection(HOST, srv.port)
            writer.write(b"GET / HTTP/1.0\r\n\r\n" * 10)
            await asyncio.wait_for(reader.read(), 2.0)  # the server hangs up (after a TLS alert)
            assert reader.at_eof()
            writer.close()
            assert gate.results.empty() and srv.channels == []
            await _assert_still_serves(srv, gate, mesh)
        finally:
            await srv.close()

    run(main())


@pytest.mark.parametrize("intruder", ["other_n1", "self_signed_n1", "expired"])
def test_untrusted_client_certificates_refused(mesh: Mesh, intruder: str) -> None:
    """Another CA's "n1", a self-signed "n1", an expired "n5": the server never sees a hello."""
    ident: sec.Identity = getattr(mesh, intruder)

    async def main() -> None:
        gate = Gate()
        srv = await _serve(mesh.n1, gate)
        try:
            with pytest.raises(PeerError):
                await _dial(srv, ident)
            assert gate.results.empty() and srv.channels == []
            await _assert_still_serves(srv, gate, mesh)
        finally:
            await srv.close()

    run(main())


@pytest.mark.parametrize("impostor", ["other_n1", "self_signed_n1", "expired"])
def test_untrusted_server_certificates_refused(mesh: Mesh, impostor: str) -> None:
    """A node dialling "n1" refuses a server whose certificate is not a valid mesh certificate."""
    ident: sec.Identity = getattr(mesh, impostor)

    async def main() -> None:
        gate = Gate()
        srv = await _serve(ident, gate)
        try:
            with pytest.raises(PeerError, match="CERTIFICATE_VERIFY_FAILED"):
                await _dial(srv, mesh.n2)
        finally:
            await srv.close()

    run(main())


def test_stolen_node_id_refused(mesh: Mesh) -> None:
    """n2's valid certificate and key, but its Hello claims to be n1."""

    async def main() -> None:
        gate = Gate()
        srv = await _serve(mesh.n1, gate)
        try:
            ch = await _dial(srv, mesh.n2, claim="n1")
            refusal = await gate.results.get()
            assert isinstance(refusal, SecurityError)
            assert ch._transport is not None
            host, port = ch._transport.get_extra_info("sockname")[:2]
            assert str(refusal) == f"peer at {host}:{port} says it is 'n1' but its certificate is for 'n2'"
            await asyncio.wait_for(ch.closed.wait(), 2.0)
            await ch.close()
        finally:
            await srv.close()

    run(main())


def test_client_certificate_may_not_act_as_node(mesh: Mesh) -> None:
    async def main() -> None:
        gate = Gate()
        srv = await _serve(mesh.n1, gate)
        try:
            ch = await _dial(srv, mesh.c1, role="node")
            refusal = await gate.results.get()
            assert isinstance(refusal, SecurityError)
            assert "('c1') acts as a node but holds a client certificate" in str(refusal)
            await ch.close()
        finally:
            await srv.close()
        # Nor serve as one: its certificate lacks serverAuth, so a node refuses it in the handshake.
        srv = await _serve(mesh.c1, Gate())
        try:
            with pytest.raises(PeerError, match="CERTIFICATE_VERIFY_FAILED"):
                await _dial(srv, mesh.n2)
        finally:
            await srv.close()

    run(main())


def test_revoked_certificate_refused(mesh: Mesh, tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    sec.ca_init(ca)
    r1 = sec.ca_issue("r1", ca, tmp_path / "r1")
    r3 = sec.ca_issue("r3", ca, tmp_path / "r3")
    crl = sec.ca_revoke("r3", ca)
    crl.verify(r1.ca_pem)
    # r1 learns the list from a peer (bytes), keeps it.
    held = sec.adopt_revocations(sec.load_revocations(r1.directory, r1.ca_pem), crl.to_bytes(), r1.ca_pem)
    assert held == crl and sec.save_revocations(r1.directory, held)

    async def main() -> None:
        gate = Gate(held)
        srv = await _serve(r1, gate)
        try:
            ch = await _dial(srv, r3)  # TLS itself succeeds: revocation is meshai's list
            refusal = await gate.results.get()
            assert isinstance(refusal, SecurityError)
            assert str(refusal).endswith("certificate of 'r3' is revoked (revocation list v1)")
            await ch.close()
        finally:
            await srv.close()
        srv = await _serve(r3, Gate())  # the dialling side refuses a revoked server the same way
        try:
            ch = await _dial(srv, r1)
            assert ch._transport is not None
            with pytest.raises(SecurityError, match="'r3' is revoked"):
                sec.check_peer(ch._transport.get_extra_info("ssl_object"), ch.peer_id, "node", held)
            await ch.close()
        finally:
            await srv.close()

    run(main())
    # Once r3's own directory holds the list, r3 cannot even load its identity.
    assert sec.save_revocations(r3.directory, crl)
    with pytest.raises(SecurityError, match=r"certificate of 'r3' is revoked \(revocation list v1"):
        sec.load_identity(r3.directory)


def test_tls12_client_refused(mesh: Mesh) -> None:
    async def main() -> None:
        gate = Gate()
        srv = await _serve(mesh.n1, gate)
        try:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_verify_locations(cadata=mesh.n2.ca_pem.decode())
            ctx.load_cert_chain(mesh.n2.directory / "cert.pem", mesh.n2.directory / "key.pem")
            with pytest.raises(PeerError):
                await connect(HOST, srv.port, hello("n2"), ssl=ctx, timeout=2.0)
            assert gate.results.empty()
            await _assert_still_serves(srv, gate, mesh)
        finally:
            await srv.close()

    run(main())


def test_contexts_are_tls13_mutual_mesh_ca_only(mesh: Mesh) -> None:
    for ctx in (sec.server_context(mesh.n1), sec.client_context(mesh.n1)):
        assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED and not ctx.check_hostname
        cas = ctx.get_ca_certs(binary_form=True)
        assert cas == [mesh.n1.ca_certificate.public_bytes(serialization.Encoding.DER)]


def test_check_peer_without_tls_or_identity(mesh: Mesh) -> None:
    with pytest.raises(SecurityError, match=re.escape("peer at 10.0.0.1:1 did not use TLS")):
        sec.check_peer(None, "n1", "node", None, peer="10.0.0.1:1")
    with pytest.raises(SecurityError, match="carries no meshai identity"):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256())
        )
        sec.peer_id_from_cert(cert.public_bytes(serialization.Encoding.DER))


# --------------------------------------------------------------------------- CLI


def test_cli_init_issue_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="meshai")
    add_ca_parser(parser.add_subparsers(dest="command", required=True))

    def cli(*argv: str) -> Any:
        args = parser.parse_args(list(argv))
        assert args.func(args) == 0
        out = capsys.readouterr().out
        return json.loads(out) if "--json" in argv else out

    ca = str(tmp_path / "ca")
    assert "created in" in cli("ca", "init", ca)
    node = cli("ca", "issue", "n1", "--ca", ca, "--out", str(tmp_path / "n1"), "--json")
    assert node["name"] == "n1" and node["role"] == "node"
    assert node["fingerprint"] == sec.load_identity(tmp_path / "n1").fingerprint
    client = cli(
        "ca",
        "issue",
        "c1",
        "--ca",
        ca,
        "--out",
        str(tmp_path / "c1"),
        "--role",
        "client",
        "--days",
        "3",
        "--json",
    )
    assert client["role"] == "client"
    assert "issued node 'n2'" in cli("ca", "issue", "n2", "--ca", ca, "--out", str(tmp_path / "n2"))
    rev = cli("ca", "revoke", "n1", "--ca", ca, "--json")
    assert rev["version"] == 1 and rev["names"] == ["n1"] and rev["serials"] == [node["serial"]]
    assert "revocation list v2" in cli("ca", "revoke", "n2", "--ca", ca)

    for argv in (
        ("ca", "init", ca),
        ("ca", "issue", "n1", "--ca", ca, "--out", str(tmp_path / "again")),
        ("ca", "issue", "bad name", "--ca", ca, "--out", str(tmp_path / "x")),
        ("ca", "revoke", "nobody", "--ca", ca),
    ):
        args = parser.parse_args(list(argv))
        with pytest.raises(MeshaiError) as info:
            args.func(args)
        assert "\n" not in str(info.value)
