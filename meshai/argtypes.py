"""argparse value types shared by the command-line modules."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def positive_int_named(what: str = "") -> Callable[[str], int]:
    """An argparse ``type`` accepting integers >= 1; the error names ``what`` when given."""
    prefix = f"{what} must be" if what else "expected"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{prefix} a positive integer, got {text!r}")
        return value

    return parse


#: ``type=positive_int``: an integer >= 1.
positive_int = positive_int_named()
