"""Signed, encrypted model packages and the node's model store: real keys, real files, every refusal."""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import re
import stat
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import NameOID
from onnx import TensorProto, helper, numpy_helper

from meshai.errors import ConfigError, DeploymentError, ModelError, SecurityError
from meshai.package_cli import add_package_parsers
from meshai.packages import (
    Manifest,
    RollbackInstruction,
    build_package,
    check_onnx_file,
    compare_versions,
    inspect_package,
    keygen,
    load_identity,
    load_recipients,
    open_package,
    parse_package_ref,
    sign_package,
    sign_rollback,
    verify_package,
    version_key,
)
from nodes.store import ModelStore

MARKER = b"MESHAI-PLAINTEXT-WEIGHTS-7f3a9c"


# ----------------------------------------------------------------------------------------- helpers


def _model(marker: bytes = MARKER, *, reps: int = 8) -> onnx.ModelProto:
    """A tiny valid model whose weights contain a distinctive byte string."""
    w = np.frombuffer(marker * reps, dtype=np.uint8).copy()
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, [w.size])
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, [w.size])
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"], name="add")], "g", [x], [y])
    g.initializer.append(numpy_helper.from_array(w, "w"))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _bytes(m: onnx.ModelProto) -> bytes:
    return m.SerializeToString()


def _external(t: TensorProto, location: str = "../../etc/passwd") -> None:
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    e = t.external_data.add()
    e.key, e.value = "location", location


def _if_model_with_external_subgraph() -> onnx.ModelProto:
    c = numpy_helper.from_array(np.ones(4, np.float32), "c")
    _external(c)
    then_g = helper.make_graph(
        [helper.make_node("Constant", [], ["t"], value=c)],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [4])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Constant", [], ["e"], value=numpy_helper.from_array(np.zeros(4, np.float32)))],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [4])],
    )
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)
    g = helper.make_graph([node], "g", [cond], [out])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _identity(folder: Path, cn: str | None) -> Path:
    folder.mkdir(parents=True)
    k = X25519PrivateKey.generate()
    (folder / "x25519.key").write_bytes(
        k.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (folder / "x25519.pub").write_bytes(
        k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    if cn is not None:
        sk = Ed25519PrivateKey.generate()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(sk.public_key())
            .serial_number(1)
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(sk, None)
        )
        (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return folder


def _zip(entries: list[tuple[str | zipfile.ZipInfo, bytes]], compress: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compress) as zf:
        for name, body in entries:
            zf.writestr(name, body)
    return buf.getvalue()


def _entries(pkg: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(pkg)) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _rezip(entries: dict[str, bytes]) -> bytes:
    return _zip(list(entries.items()))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("pk")
    key, pub = keygen(d / "fleet")
    other_key, other_pub = keygen(d / "other")
    ids = d / "ids"
    a = _identity(ids / "node-a-dir", "node-a")
    b = _identity(ids / "node-b", None)
    c = _identity(d / "outsider", "node-c")
    model = d / "tiny.onnx"
    model.write_bytes(_bytes(_model()))
    plain = build_package([model], "tiny", "1.0", d / "plain.pkg")
    sign_package(plain, key)
    enc = build_package([model], "tiny", "1.0", d / "enc.pkg", encrypt_for=load_recipients([str(a), str(b)]))
    sign_package(enc, key)
    return {
        "d": d,
        "key": key,
        "pub": pub,
        "other_key": other_key,
        "other_pub": other_pub,
        "a": a,
        "b": b,
        "c": c,
        "model": model,
        "plain": plain.read_bytes(),
        "enc": enc.read_bytes(),
    }


def _pkg(
    env: dict, tmp_path: Path, version: str = "1.0", *, created: str | None = None, sign=True, **kw
) -> bytes:
    out = build_package(
        [env["model"]], "tiny", version, tmp_path / f"tiny-{version}.pkg", created=created, **kw
    )
    if sign:
        sign_package(out, env["key"])
    return out.read_bytes()


def _resign(env: dict, entries: dict[str, bytes], key: Path | None = None) -> bytes:
    """Re-sign a (tampered) manifest.json so the signature is valid and a later check must catch it."""
    sk = serialization.load_pem_private_key((key or env["key"]).read_bytes(), None)
    entries["manifest.sig"] = sk.sign(entries["manifest.json"])
    return _rezip(entries)


# ---------------------------------------------------------------------------------- round trips


def test_plain_round_trip(env):
    m = verify_package(env["plain"], env["pub"])
    assert (m.name, m.version, m.ref, m.encrypted) == ("tiny", "1.0", "tiny@1.0", False)
    assert [f.path for f in m.files] == ["tiny.onnx"]
    opened = open_package(env["plain"], env["pub"])
    assert opened.model() == env["model"].read_bytes()
    # the format is what the docstring says
    e = _entries(env["plain"])
    assert sorted(e) == ["files/tiny.onnx", "manifest.json", "manifest.sig"]
    assert len(e["manifest.sig"]) == 64
    obj = json.loads(e["manifest.json"])
    assert obj["format"] == "meshai-package/1" and obj["encryption"] is None and len(obj["signer"]) == 64
    assert Manifest.from_bytes(e["manifest.json"]).to_bytes() == e["manifest.json"]
    with zipfile.ZipFile(io.BytesIO(env["plain"])) as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())


def test_encrypted_round_trip_each_recipient_and_nobody_else(env):
    pkg = env["enc"]
    assert MARKER not in pkg
    m = verify_package(pkg, env["pub"])  # verifiable without any identity (ciphertext digests)
    assert m.encrypted and [r.id for r in m.encryption.recipients] == ["node-a", "node-b"]
    for who in ("a", "b"):
        rid, key = load_identity(env[who])
        assert open_package(pkg, env["pub"], recipient=(rid, key)).model() == env["model"].read_bytes()
    outsider = load_identity(env["c"])
    with pytest.raises(SecurityError, match="encrypted for node-a, node-b, not for 'node-c'"):
        open_package(pkg, env["pub"], recipient=outsider)
    with pytest.raises(SecurityError, match="does not open with this identity's key"):
        open_package(pkg, env["pub"], recipient=("node-a", outsider[1]))
    with pytest.raises(SecurityError, match="has no identity to open it"):
        open_package(pkg, env["pub"])
    # without a member's key the ciphertext is useless: no plaintext anywhere in the archive
    with zipfile.ZipFile(io.BytesIO(pkg)) as zf:
        ct = zf.read("files/tiny.onnx")
    assert MARKER not in ct and len(ct) == env["model"].stat().st_size + 16
    with pytest.raises(SecurityError, match="not a valid ONNX file"):
        check_onnx_file(ct)


def test_recipients_by_name_equals_path_and_folder_of_identities(env, tmp_path):
    r = load_recipients([str(env["d"] / "ids")])
    assert sorted(r) == ["node-a", "node-b"] and all(len(v) == 32 for v in r.values())
    pem = tmp_path / "x.pub"
    k = X25519PrivateKey.generate()
    pem.write_bytes(
        k.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    r2 = load_recipients([f"edge7={pem}"])
    assert list(r2) == ["edge7"]
    with pytest.raises(ConfigError, match="given twice"):
        load_recipients([str(env["a"]), str(env["a"])])
    with pytest.raises(ConfigError, match="NAME="):
        load_recipients([str(pem)])


def test_versions_and_refs():
    assert version_key("1.2.0") == version_key("1.2")
    assert compare_versions("1.2.10", "1.2.9") == 1 and compare_versions("1.9", "1.10") == -1
    assert parse_package_ref("tiny@1.2") == ("tiny", "1.2")
    for bad in ("1.02", "v1", "1..2", "", "1.2.", "-1"):
        with pytest.raises(ConfigError):
            version_key(bad)
    with pytest.raises(ConfigError):
        parse_package_ref("../x@1")


# ------------------------------------------------------------------------------------- refusals


def test_changed_byte_in_file_with_valid_crc(env):
    e = _entries(env["plain"])
    body = bytearray(e["files/tiny.onnx"])
    i = bytes(body).index(MARKER)
    body[i] ^= 1
    e["files/tiny.onnx"] = bytes(body)
    with pytest.raises(
        SecurityError, match=re.escape("'tiny.onnx' does not match its SHA-256 in the signed manifest")
    ):
        verify_package(_rezip(e), env["pub"])


def test_changed_byte_in_archive(env):
    pkg = bytearray(env["plain"])
    pkg[pkg.index(MARKER) + 3] ^= 0x40
    with pytest.raises(SecurityError, match=r"corrupt entry|Bad CRC"):
        verify_package(bytes(pkg), env["pub"])


def test_changed_ciphertext_byte(env):
    e = _entries(env["enc"])
    ct = bytearray(e["files/tiny.onnx"])
    ct[10] ^= 1
    e["files/tiny.onnx"] = bytes(ct)
    with pytest.raises(
        SecurityError, match=re.escape("ciphertext of 'tiny.onnx' does not match its SHA-256")
    ):
        verify_package(_rezip(e), env["pub"])


def test_changed_byte_in_manifest_and_in_signature(env):
    e = _entries(env["plain"])
    e["manifest.json"] = e["manifest.json"].replace(b'"version":"1.0"', b'"version":"9.0"')
    with pytest.raises(SecurityError, match="signature does not verify against the trusted key"):
        verify_package(_rezip(e), env["pub"])
    e = _entries(env["plain"])
    sig = bytearray(e["manifest.sig"])
    sig[5] ^= 1
    e["manifest.sig"] = bytes(sig)
    with pytest.raises(SecurityError, match="signature does not verify"):
        verify_package(_rezip(e), env["pub"])
    e = _entries(env["plain"])
    e["manifest.sig"] = e["manifest.sig"][:63]
    with pytest.raises(SecurityError, match=re.escape("manifest.sig")):
        verify_package(_rezip(e), env["pub"])


def test_added_dropped_renamed_files(env):
    e = _entries(env["plain"])
    e["files/extra.onnx"] = e["files/tiny.onnx"]
    with pytest.raises(SecurityError, match=r"not in the manifest: files/extra\.onnx"):
        verify_package(_rezip(e), env["pub"])
    e = _entries(env["plain"])
    del e["files/tiny.onnx"]
    with pytest.raises(SecurityError, match=r"listed but missing: files/tiny\.onnx"):
        verify_package(_rezip(e), env["pub"])
    e = _entries(env["plain"])
    e["files/renamed.onnx"] = e.pop("files/tiny.onnx")
    with pytest.raises(
        SecurityError, match=re.escape("not in the manifest: files/renamed.onnx; listed but missing")
    ):
        verify_package(_rezip(e), env["pub"])


def test_unsigned_and_signed_by_another_key(env, tmp_path):
    unsigned = _pkg(env, tmp_path, sign=False)
    with pytest.raises(SecurityError, match="package is unsigned"):
        verify_package(unsigned, env["pub"])
    p = tmp_path / "o.pkg"
    p.write_bytes(unsigned)
    sign_package(p, env["other_key"])
    with pytest.raises(SecurityError, match=r"signed by key .*, not the trusted key"):
        verify_package(p, env["pub"])
    assert verify_package(p, env["other_pub"]).ref == "tiny@1.0"
    m, signed = inspect_package(unsigned)
    assert m.signer is None and not signed


def test_manifest_schema_is_strict_even_when_signed(env):
    e = _entries(env["plain"])
    obj = json.loads(e["manifest.json"])
    obj["extra"] = 1
    e["manifest.json"] = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(SecurityError, match="unexpected keys"):
        verify_package(_resign(env, e), env["pub"])
    e = _entries(env["plain"])
    e["manifest.json"] = json.dumps(json.loads(e["manifest.json"]), indent=1).encode()
    with pytest.raises(SecurityError, match="not canonical"):
        verify_package(_resign(env, e), env["pub"])
    e = _entries(env["plain"])
    obj = json.loads(e["manifest.json"])
    obj["files"][0]["path"] = "../tiny.onnx"
    e["manifest.json"] = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(SecurityError, match="path traversal"):
        verify_package(_resign(env, e), env["pub"])


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("files/../x.onnx", "path traversal"),
        ("../x.onnx", "path traversal"),
        ("/etc/cron.d/x", "absolute path"),
        ("files/a\\..\\b.onnx", "backslash"),
        ("other/x.onnx", "outside files/"),
        ("files/.hidden", "not starting with '.'"),
        ("files/sub/", "component ''"),
    ],
)
def test_traversal_and_odd_entry_names(env, name, message):
    e = _entries(env["plain"])
    pkg = _zip([*e.items(), (name, b"x")])
    with pytest.raises(SecurityError, match=message):
        verify_package(pkg, env["pub"])


def test_symlink_directory_and_duplicate_entries(env):
    e = _entries(env["plain"])
    link = zipfile.ZipInfo("files/tiny.onnx")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    others = [(k, v) for k, v in e.items() if k != "files/tiny.onnx"]
    with pytest.raises(SecurityError, match="is a symlink"):
        verify_package(_zip([*others, (link, b"/etc/passwd")]), env["pub"])
    d = zipfile.ZipInfo("files/tiny.onnx")
    d.external_attr = (stat.S_IFDIR | 0o755) << 16 | 0x10
    with pytest.raises(SecurityError, match="is a directory"):
        verify_package(_zip([*others, (d, b"")]), env["pub"])
    with pytest.warns(UserWarning, match="Duplicate name"):
        dup = _zip([*e.items(), ("files/tiny.onnx", e["files/tiny.onnx"])])
    with pytest.raises(SecurityError, match="appears twice"):
        verify_package(dup, env["pub"])


def test_compressed_and_bomb_declared_sizes(env):
    e = _entries(env["plain"])
    with pytest.raises(SecurityError, match="is compressed"):
        verify_package(_zip(list(e.items()), zipfile.ZIP_DEFLATED), env["pub"])

    # a central directory that declares a huge entry (zip-bomb shaped): refused before any read
    def declaring(size: int) -> bytes:
        pkg = bytearray(env["plain"])
        pos = 0
        while (pos := pkg.find(b"PK\x01\x02", pos)) >= 0:
            nlen = int.from_bytes(pkg[pos + 28 : pos + 30], "little")
            if pkg[pos + 46 : pos + 46 + nlen] == b"files/tiny.onnx":
                pkg[pos + 20 : pos + 28] = size.to_bytes(4, "little") * 2
            pos += 4
        return bytes(pkg)

    with pytest.raises(SecurityError, match=r"declares 3221225472 bytes, over the limit of 1073741840"):
        verify_package(declaring(3 << 30), env["pub"])
    with pytest.raises(SecurityError, match=r"declares 8192 bytes, over the limit of 4112"):
        verify_package(declaring(8192), env["pub"], max_bytes=4096)
    with pytest.raises(SecurityError, match="more than the archive's own"):
        verify_package(declaring(1 << 20), env["pub"])
    # too many entries
    many = _zip([*e.items()] + [(f"files/f{i}", b"") for i in range(300)])
    with pytest.raises(SecurityError, match="entries, over the limit of 258"):
        verify_package(many, env["pub"])
    with pytest.raises(SecurityError, match="not a valid ZIP"):
        verify_package(b"PK\x03\x04 not really", env["pub"])


def test_model_over_size_limit(env):
    size = env["model"].stat().st_size
    with pytest.raises(
        SecurityError, match=f"'files/tiny.onnx' declares {size} bytes, over the limit of 116"
    ):
        open_package(env["plain"], env["pub"], max_bytes=100)
    with pytest.raises(SecurityError, match="over the model size limit"):
        check_onnx_file(env["model"].read_bytes(), max_bytes=size - 1)
    assert check_onnx_file(env["model"].read_bytes(), max_bytes=size).graph.node[0].op_type == "Add"


def _sign_crafted(env, tmp_path, files: dict[str, bytes]) -> bytes:
    """Build a package around files that build_package itself would refuse, by writing it directly."""
    from meshai.packages import FileEntry, _sha256, _write_archive

    m = Manifest(
        "evil", "1", "2026-01-01T00:00:00Z", tuple(FileEntry(p, _sha256(b), len(b)) for p, b in files.items())
    )
    out = tmp_path / "evil.pkg"
    _write_archive(out, m.to_bytes(), None, files)
    sign_package(out, env["key"])
    return out.read_bytes()


def test_external_data_refused_everywhere(env, tmp_path):
    top = _model()
    _external(top.graph.initializer[0], "weights.bin")
    sub = _if_model_with_external_subgraph()
    sparse = _model()
    values = numpy_helper.from_array(np.ones(2, np.float32), "sv")
    _external(values, "/abs/values.bin")
    sparse.graph.sparse_initializer.append(
        helper.make_sparse_tensor(values, numpy_helper.from_array(np.array([0, 3], np.int64), "si"), [8])
    )
    for m, where in (
        (top, "w -> 'weights.bin'"),
        (sub, "c -> '../../etc/passwd'"),
        (sparse, "sv -> '/abs/values.bin'"),
    ):
        with pytest.raises(SecurityError, match=f"refers to external data .*{where}"):
            check_onnx_file(_bytes(m))
        pkg = _sign_crafted(env, tmp_path, {"m.onnx": _bytes(m)})
        verify_package(pkg, env["pub"])  # signed and intact…
        with pytest.raises(SecurityError, match=r"package evil@1 file 'm\.onnx' refers to external data"):
            open_package(pkg, env["pub"])  # …but never loaded
    # external_data helper path, as onnx itself writes it
    m = _model()
    onnx.external_data_helper.convert_model_to_external_data(m, location="w.bin", size_threshold=0)
    with pytest.raises(SecurityError, match="external data"):
        check_onnx_file(_bytes(m))
    p = tmp_path / "ext.onnx"
    p.write_bytes(_bytes(m))
    with pytest.raises(ModelError, match="external data"):
        build_package([p], "ext", "1", tmp_path / "ext.pkg")
    with pytest.raises(SecurityError, match="not a valid ONNX"):
        check_onnx_file(b"\x08\x01garbage")


def test_build_arguments_are_checked(env, tmp_path):
    for kw, msg in (
        ({"name": "../x"}, "package name"),
        ({"version": "1.02"}, "package version"),
        ({"models": {"../a.onnx": b"x"}}, "path traversal"),
        ({"models": {}}, "at least one file"),
    ):
        args = {"models": [env["model"]], "name": "n", "version": "1", "out": tmp_path / "x.pkg", **kw}
        with pytest.raises(ConfigError, match=msg):
            build_package(**args)
    with pytest.raises(ConfigError, match="already exists"):
        keygen(env["key"])


# ------------------------------------------------------------------------------------- the store


def _store(env, root: Path, who: str | None = "a", **kw) -> ModelStore:
    return ModelStore(root, env["pub"].read_bytes(), None if who is None else load_identity(env[who]), **kw)


def test_store_keeps_encrypted_at_rest_and_opens_in_memory(env, tmp_path):
    enc = load_recipients([str(env["a"]), str(env["b"])])
    store = _store(env, tmp_path / "store")
    m = store.add(_pkg(env, tmp_path, "1.0", encrypt_for=enc), expect="tiny@1.0")
    assert store.versions("tiny") == ["1.0"] and store.active("tiny") is None
    store.activate("tiny", "1.0")
    assert store.active("tiny") == "1.0"
    assert store.open("tiny", "1.0").model() == env["model"].read_bytes()
    store.add(_pkg(env, tmp_path, "1.10", encrypt_for=enc))
    store.activate("tiny", "1.10")
    assert store.versions("tiny") == ["1.0", "1.10"] and store.highest("tiny") == "1.10"
    files = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert {p.name for p in files} == {"1.0.pkg", "1.10.pkg", "state.json"}
    for p in files:
        assert MARKER not in p.read_bytes(), p
        assert p.stat().st_mode & 0o077 == 0
    assert m.ref == "tiny@1.0"
    strict = _store(env, tmp_path / "strict", require_encryption=True)
    with pytest.raises(SecurityError, match="not encrypted, and this node requires it"):
        strict.add(env["plain"])
    assert strict.versions("tiny") == []


def test_store_refusals_leave_it_untouched(env, tmp_path):
    root = tmp_path / "store"
    store = _store(env, root)
    store.add(_pkg(env, tmp_path, "2.0", created="2026-02-01T00:00:00Z"))
    store.activate("tiny", "2.0")

    def snapshot() -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    before = snapshot()
    old = _pkg(env, tmp_path, "1.0", created="2026-01-01T00:00:00Z")
    with pytest.raises(
        SecurityError, match=re.escape("refusing tiny@1.0: lower than 2.0, the highest version")
    ):
        store.add(old)
    with pytest.raises(SecurityError, match="not tiny@9 as announced"):
        store.add(_pkg(env, tmp_path, "3.0"), expect="tiny@9")
    with pytest.raises(SecurityError, match=re.escape("a different package is already stored as tiny@2.0")):
        store.add(_pkg(env, tmp_path, "2.0", created="2026-02-02T00:00:00Z"))
    with pytest.raises(SecurityError, match=re.escape("the same version as the stored tiny@2.0")):
        store.add(_pkg(env, tmp_path, "2.0.0"))
    with pytest.raises(SecurityError, match="unsigned"):
        store.add(_pkg(env, tmp_path, "4.0", sign=False))
    e = _entries(_pkg(env, tmp_path, "5.0"))
    e["files/evil.onnx"] = b"x"
    with pytest.raises(SecurityError, match="not in the manifest"):
        store.add(_rezip(e))
    outsider = load_recipients([str(env["c"])])
    with pytest.raises(SecurityError, match="not for 'node-a'"):
        store.add(_pkg(env, tmp_path, "6.0", encrypt_for=outsider))
    with pytest.raises(DeploymentError, match="not in this node's store"):
        store.activate("tiny", "7.0")
    forged = RollbackInstruction("tiny", "1.0", "2026-03-01T00:00:00Z", bytes(64))
    with pytest.raises(SecurityError, match="not signed by the trusted key"):
        store.add(old, allow_downgrade_with=forged)
    by_other = sign_rollback("tiny", "1.0", env["other_key"], issued_at="2026-03-01T00:00:00Z")
    with pytest.raises(SecurityError, match="not signed by the trusted key"):
        store.add(old, allow_downgrade_with=by_other)
    wrong = sign_rollback("tiny", "1.5", env["key"], issued_at="2026-03-01T00:00:00Z")
    with pytest.raises(SecurityError, match=re.escape("names tiny@1.5, not tiny@1.0")):
        store.add(old, allow_downgrade_with=wrong)
    stale = sign_rollback("tiny", "1.0", env["key"], issued_at="2026-01-15T00:00:00Z")
    with pytest.raises(SecurityError, match=re.escape("before the active tiny@2.0 was created")):
        store.add(old, allow_downgrade_with=stale)
    assert snapshot() == before and store.active("tiny") == "2.0"
    store.add(_pkg(env, tmp_path, "2.0", created="2026-02-01T00:00:00Z"))  # identical: a no-op
    assert snapshot() == before
    # a file tampered at rest is refused when activated or opened
    pkg_file = root / "tiny" / "2.0.pkg"
    e = _entries(pkg_file.read_bytes())
    e["files/tiny.onnx"] = e["files/tiny.onnx"].replace(MARKER, MARKER.upper(), 1)
    pkg_file.write_bytes(_rezip(e))
    with pytest.raises(SecurityError, match="does not match its SHA-256"):
        store.open("tiny", "2.0")
    with pytest.raises(SecurityError, match="does not match its SHA-256"):
        store.activate("tiny", "2.0")


def test_store_rollback_with_signed_instruction(env, tmp_path):
    store = _store(env, tmp_path / "store", who=None)
    store.add(_pkg(env, tmp_path, "1.0", created="2026-01-01T00:00:00Z"))
    store.activate("tiny", "1.0")
    store.add(_pkg(env, tmp_path, "2.0", created="2026-02-01T00:00:00Z"))
    store.activate("tiny", "2.0")
    with pytest.raises(SecurityError, match=re.escape("lower than 2.0")):
        store.activate("tiny", "1.0")
    with pytest.raises(SecurityError, match=re.escape("lower than 2.0")):
        store.check_activate("tiny", "1.0")
    instr = sign_rollback("tiny", "1.0", env["key"], issued_at="2026-03-01T00:00:00Z")
    wire = RollbackInstruction.from_dict(json.loads(json.dumps(instr.to_dict())))
    assert wire == instr
    store.check_activate("tiny", "1.0", allow_downgrade_with=wire)
    assert store.active("tiny") == "2.0"
    assert store.rollback(wire).ref == "tiny@1.0"
    assert store.active("tiny") == "1.0" and store.highest("tiny") == "2.0"
    assert store.rollback(wire).ref == "tiny@1.0"  # the same instruction again: a no-op
    store.activate("tiny", "2.0")
    with pytest.raises(SecurityError, match="not after the last rollback applied here"):
        store.rollback(wire)  # replayed
    assert store.active("tiny") == "2.0"
    forged = RollbackInstruction("tiny", "1.0", "2026-04-01T00:00:00Z", instr.signature)
    with pytest.raises(SecurityError, match="not signed by the trusted key"):
        store.rollback(forged)
    # a downgrade to a version never stored: add with the instruction, then roll back
    later = sign_rollback("tiny", "0.9", env["key"], issued_at="2026-04-01T00:00:00Z")
    store.add(_pkg(env, tmp_path, "0.9", created="2025-12-01T00:00:00Z"), allow_downgrade_with=later)
    store.rollback(later)
    assert store.active("tiny") == "0.9" and store.versions("tiny") == ["0.9", "1.0", "2.0"]


# ------------------------------------------------------------------------------------------ CLI


def _run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="meshai")
    add_package_parsers(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.func(args)


def test_cli_keygen_build_sign_verify_inspect(env, tmp_path, capsys):
    k = str(tmp_path / "k")
    assert _run(["keygen", "--out", k, "--json"]) == 0
    fp = json.loads(capsys.readouterr().out)["fingerprint"]
    pkg = str(tmp_path / "sq.pkg")
    ids = str(env["d"] / "ids")
    assert _run(["package", "build", "squeezenet", str(env["model"]), "--name", "sq", "--version", "3",
                 "-o", pkg, "--encrypt-for", ids, "--json"]) == 0  # fmt: skip
    built = json.loads(capsys.readouterr().out)
    assert built["recipients"] == ["node-a", "node-b"] and built["signer"] is None
    assert [f["path"] for f in built["files"]] == ["squeezenet.onnx", "tiny.onnx"]
    with pytest.raises(SecurityError, match="unsigned"):
        _run(["package", "verify", pkg, "--pubkey", k + ".pub"])
    assert _run(["package", "sign", pkg, "--key", k, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["signer"] == fp
    assert _run(["package", "verify", pkg, "--pubkey", k + ".pub", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verified"] and "contents not opened" in out["checked"]
    assert _run(["package", "verify", pkg, "--pubkey", k + ".pub", "--identity", str(env["b"])]) == 0
    assert "OK" in capsys.readouterr().out
    with pytest.raises(SecurityError, match="not for 'node-c'"):
        _run(["package", "verify", pkg, "--pubkey", k + ".pub", "--identity", str(env["c"])])
    with pytest.raises(SecurityError, match="not the trusted key"):
        _run(["package", "verify", pkg, "--pubkey", str(env["pub"])])
    assert _run(["package", "inspect", pkg, "--json"]) == 0
    ins = json.loads(capsys.readouterr().out)
    assert ins["verified"] is False and ins["signed"] is True and ins["ref"] == "sq@3"
    with pytest.raises(ModelError, match="unknown model"):
        _run(["package", "build", "nosuchmodel", "--name", "x", "--version", "1", "-o", pkg])
