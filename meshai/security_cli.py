"""``meshai ca init | issue | revoke``: thin command-line front ends over ``meshai.security``.

``add_ca_parser(subparsers)`` registers the ``ca`` command; each subcommand sets ``func`` (taking
the parsed ``argparse.Namespace``, returning the exit status) and raises ``MeshaiError`` on
failure, which the main CLI prints as one line.  Each takes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TypeVar

from meshai.argtypes import positive_int_named
from meshai.security import (
    CA_CERT,
    REVOKED,
    ROLES,
    ca_init,
    ca_issue,
    ca_revoke,
    cert_fingerprint,
)

__all__ = ["add_ca_parser", "cmd_ca_init", "cmd_ca_issue", "cmd_ca_revoke"]

_days = positive_int_named("days")
P = TypeVar("P", bound=argparse.ArgumentParser)


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def cmd_ca_init(args: argparse.Namespace) -> int:
    """``meshai ca init DIR [--days N]``: create a mesh CA."""
    ca_dir = Path(args.dir)
    cert = ca_init(ca_dir, days=args.days)
    out: dict[str, Any] = {
        "ca_dir": str(ca_dir),
        "ca_cert": str(ca_dir / CA_CERT),
        "subject": cert.subject.rfc4514_string(),
        "fingerprint": cert_fingerprint(cert),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "revocation_version": 0,
    }
    if args.json:
        _emit(out)
    else:
        print(
            f"mesh CA {out['subject']} created in {ca_dir} (fingerprint {out['fingerprint'][:16]}…, "
            f"valid until {out['not_after']}); keep ca.key off the nodes"
        )
    return 0


def cmd_ca_issue(args: argparse.Namespace) -> int:
    """``meshai ca issue NAME --ca DIR --out DIR [--role node|client] [--days N] [--replace]``."""
    ident = ca_issue(args.name, args.ca, args.out, role=args.role, days=args.days, replace=args.replace)
    out: dict[str, Any] = {
        "name": ident.name,
        "role": ident.role,
        "directory": str(ident.directory),
        "serial": format(ident.serial, "x"),
        "fingerprint": ident.fingerprint,
        "not_after": ident.not_after.isoformat(),
    }
    if args.json:
        _emit(out)
    else:
        print(
            f"issued {ident.role} {ident.name!r} into {ident.directory} (serial {out['serial']}, "
            f"fingerprint {ident.fingerprint[:16]}…, valid until {out['not_after']})"
        )
    return 0


def cmd_ca_revoke(args: argparse.Namespace) -> int:
    """``meshai ca revoke NAME --ca DIR``: add NAME to the signed revocation list."""
    crl = ca_revoke(args.name, args.ca)
    path = Path(args.ca) / REVOKED
    out: dict[str, Any] = {
        "name": args.name,
        "version": crl.version,
        "names": sorted(crl.names),
        "serials": [format(s, "x") for s in sorted(crl.serials)],
        "path": str(path),
    }
    if args.json:
        _emit(out)
    else:
        print(
            f"revoked {args.name!r}: revocation list v{crl.version} ({len(crl.names)} names) in {path}; "
            f"copy it into any node's or caller's identity directory and the mesh passes it on"
        )
    return 0


def add_ca_parser(subparsers: argparse._SubParsersAction[P]) -> P:
    """Register ``ca init | issue | revoke`` on the main CLI's subparsers; return the ``ca`` parser."""
    ca = subparsers.add_parser("ca", help="the mesh certificate authority: init, issue, revoke")
    sub = ca.add_subparsers(dest="ca_command", required=True)

    init = sub.add_parser("init", help="create a mesh CA in DIR (refuses to overwrite one)")
    init.add_argument("dir", metavar="DIR")
    init.add_argument("--days", type=_days, default=3650, help="validity of the CA (default 3650)")
    init.add_argument("--json", action="store_true")
    init.set_defaults(func=cmd_ca_init)

    issue = sub.add_parser("issue", help="issue a node or client identity directory")
    issue.add_argument("name", metavar="NAME", help="node id: 1-63 of [A-Za-z0-9._-]")
    issue.add_argument("--ca", required=True, metavar="DIR", help="the CA directory")
    issue.add_argument("--out", required=True, metavar="DIR", help="new (or empty) identity directory")
    issue.add_argument("--role", choices=ROLES, default="node")
    issue.add_argument("--days", type=_days, default=365, help="validity (default 365)")
    issue.add_argument(
        "--replace", action="store_true", help="re-issue an existing name, revoking its old certificates"
    )
    issue.add_argument("--json", action="store_true")
    issue.set_defaults(func=cmd_ca_issue)

    revoke = sub.add_parser("revoke", help="revoke NAME everywhere (signed revocation list)")
    revoke.add_argument("name", metavar="NAME")
    revoke.add_argument("--ca", required=True, metavar="DIR", help="the CA directory")
    revoke.add_argument("--json", action="store_true")
    revoke.set_defaults(func=cmd_ca_revoke)
    return ca
