"""Strict JSON for data that crosses a trust boundary (package manifests, telemetry payloads)."""

from __future__ import annotations

import json
from typing import Any

from meshai.errors import MeshaiError


def loads_strict(data: bytes, error: type[MeshaiError], what: str) -> Any:
    """Parse UTF-8 JSON that repeats no key and holds no NaN/Infinity; anything else raises ``error``
    naming ``what`` and the problem."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise error(f"{what} repeats the key {key!r}")
            out[key] = value
        return out

    def constant(name: str) -> Any:
        raise error(f"{what} holds the non-finite number {name}")

    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise error(f"{what} is not JSON: {exc}") from None
