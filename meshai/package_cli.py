"""Command-line front ends for keys and model packages: ``meshai keygen`` and ``meshai package …``.

``add_package_parsers(subparsers)`` registers the commands on the main CLI's subparsers; each sets
``func(args) -> int`` and raises a :class:`~meshai.errors.MeshaiError` subclass on failure (the main
CLI prints it as one line).  Every command takes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from meshai.errors import ConfigError
from meshai.models import LIGHT_MODELS, resolve_model
from meshai.packages import (
    Manifest,
    build_package,
    fingerprint,
    inspect_package,
    keygen,
    load_identity,
    load_recipients,
    open_package,
    read_files,
    sign_package,
    verify_package,
)

__all__ = [
    "add_package_parsers",
    "cmd_keygen",
    "cmd_package_build",
    "cmd_package_inspect",
    "cmd_package_sign",
    "cmd_package_verify",
]


def _emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _summary(m: Manifest) -> dict[str, Any]:
    return {
        "name": m.name,
        "version": m.version,
        "ref": m.ref,
        "created": m.created,
        "signer": m.signer,
        "encrypted": m.encrypted,
        "recipients": [] if m.encryption is None else [r.id for r in m.encryption.recipients],
        "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in m.files],
    }


def _text(m: Manifest) -> str:
    lines = [f"{m.ref}  created {m.created}"]
    lines.append(f"  signer     {m.signer or '(unsigned)'}")
    if m.encryption is not None:
        lines.append(f"  encrypted  AES-256-GCM for {', '.join(r.id for r in m.encryption.recipients)}")
    for f in m.files:
        lines.append(f"  {f.path}  {f.size} bytes  sha256 {f.sha256}")
    return "\n".join(lines)


def _model_files(specs: list[str]) -> dict[str, bytes]:
    """MODEL arguments (light-model names or paths) as package path -> bytes."""
    named: dict[str, Path] = {}
    for spec in specs:
        path = resolve_model(spec)
        rel = f"{spec}.onnx" if spec in LIGHT_MODELS else path.name
        if rel in named:
            raise ConfigError(f"two models would be stored as {rel!r} in one package")
        named[rel] = path
    return read_files(named)


def cmd_keygen(args: argparse.Namespace) -> int:
    """``meshai keygen --out K``: an Ed25519 key pair K (private, 0600) and K.pub."""
    priv, pub = keygen(args.out, overwrite=args.force)
    fp = fingerprint(pub)
    if args.json:
        _emit({"key": str(priv), "pubkey": str(pub), "fingerprint": fp})
    else:
        print(f"wrote {priv} (private, keep it secret) and {pub}; fingerprint {fp}")
    return 0


def cmd_package_build(args: argparse.Namespace) -> int:
    """``meshai package build MODEL… --name N --version V -o PKG [--encrypt-for …]``."""
    recipients = None
    if args.encrypt_for is not None:
        recipients = load_recipients([s for s in args.encrypt_for.split(",") if s.strip()])
    files = _model_files(args.models)
    runtimes: dict[str, Any] | None = None
    if args.runtimes or args.plan:
        if not (args.runtimes and args.plan) or len(args.models) != 1:
            raise ConfigError("--runtimes and --plan go together, with exactly one MODEL")
        from meshai.artifacts import artifacts_for_plan

        arts = artifacts_for_plan(args.models[0], args.plan, [r for r in args.runtimes.split(",") if r])
        files.update(arts.package_files())
        runtimes = {"stages": arts.stages, "failures": arts.failures()}
    out = build_package(files, args.name, args.version, args.output, encrypt_for=recipients)
    m, _signed = inspect_package(out)
    if args.json:
        _emit({"package": str(out), **_summary(m), "runtimes": runtimes})
    else:
        print(f"wrote {out} (unsigned; sign it with 'meshai package sign')")
        print(_text(m))
        for line in (runtimes or {}).get("failures", []):
            print(f"not carried: {line}")
    return 0


def cmd_package_sign(args: argparse.Namespace) -> int:
    """``meshai package sign PKG --key K``."""
    m = sign_package(args.package, Path(args.key))
    if args.json:
        _emit({"package": args.package, **_summary(m)})
    else:
        print(f"signed {args.package} ({m.ref}) with key {m.signer}")
    return 0


def cmd_package_verify(args: argparse.Namespace) -> int:
    """``meshai package verify PKG --pubkey P [--identity DIR]``: SecurityError unless it verifies."""
    pkg = Path(args.package)
    try:
        data = pkg.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read package {str(pkg)!r}: {exc.strerror or exc}") from None
    pubkey = Path(args.pubkey)
    m = verify_package(data, pubkey)
    checked = "signature and digests of the ciphertext (contents not opened: give --identity)"
    if args.identity is not None or not m.encrypted:
        recipient = None if args.identity is None else load_identity(args.identity)
        m = open_package(data, pubkey, recipient=recipient).manifest
        checked = "signature, digests and ONNX files" + (" (decrypted in memory)" if m.encrypted else "")
    if args.json:
        _emit({"package": str(pkg), "verified": True, "checked": checked, **_summary(m)})
    else:
        print(f"OK {pkg}: {m.ref} verifies ({checked})")
        print(_text(m))
    return 0


def cmd_package_inspect(args: argparse.Namespace) -> int:
    """``meshai package inspect PKG``: the manifest as stored — NOT verified."""
    m, signed = inspect_package(args.package)
    if args.json:
        _emit({"package": args.package, "verified": False, "signed": signed, **_summary(m)})
    else:
        print(f"{args.package} (not verified; use 'meshai package verify'{'' if signed else '; unsigned'})")
        print(_text(m))
    return 0


def add_package_parsers(subparsers: Any) -> None:
    """Register ``keygen`` and ``package {build,sign,verify,inspect}`` on the main CLI's subparsers."""
    kg = subparsers.add_parser("keygen", help="write an Ed25519 signing key pair (K and K.pub)")
    kg.add_argument("--out", required=True, help="private key path; the public key goes to OUT.pub")
    kg.add_argument("--force", action="store_true", help="overwrite existing key files")
    kg.add_argument("--json", action="store_true")
    kg.set_defaults(func=cmd_keygen)

    pk = subparsers.add_parser("package", help="build, sign, verify and inspect signed model packages")
    psub = pk.add_subparsers(dest="package_command", required=True)

    b = psub.add_parser("build", help="package ONNX models with a manifest of digests (unsigned)")
    b.add_argument("models", nargs="+", metavar="MODEL", help="an .onnx path or a light model name")
    b.add_argument("--name", required=True)
    b.add_argument("--version", required=True, help="dotted integers: 1, 1.2, 1.2.10")
    b.add_argument("-o", "--output", required=True, metavar="PKG")
    b.add_argument(
        "--encrypt-for",
        metavar="ID1,ID2|DIR",
        help="identity folders, a folder of them, or NAME=X25519_PUB_FILE, comma-separated",
    )
    b.add_argument(
        "--runtimes",
        metavar="R,R",
        help="also carry each stage of --plan converted for these runtimes (ort-mobile, litert), measured",
    )
    b.add_argument("--plan", metavar="PLAN.json", help="the stages to convert ('meshai plan --json')")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_package_build)

    s = psub.add_parser("sign", help="sign a package's manifest with an Ed25519 key")
    s.add_argument("package", metavar="PKG")
    s.add_argument("--key", required=True)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_package_sign)

    v = psub.add_parser("verify", help="check a package against the fleet's public key")
    v.add_argument("package", metavar="PKG")
    v.add_argument("--pubkey", required=True)
    v.add_argument("--identity", metavar="DIR", help="an identity folder, to decrypt and check contents")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_package_verify)

    i = psub.add_parser("inspect", help="print a package's manifest (not verified)")
    i.add_argument("package", metavar="PKG")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_package_inspect)
