"""Shared test setup: the tests directory is importable (models_helper), quiet progress bars, and a
throwaway mesh CA whose client identity every caller in the tests uses (``$MESHAI_IDENTITY``), so the
real-process tests run the default, secure path: mutual TLS everywhere."""

from __future__ import annotations

import os

os.environ.setdefault("MESHAI_PROGRESS", "0")

pytest_plugins = ["loop_helpers"]  # the clean_linkem fixture


def pytest_configure(config: object) -> None:
    from runtime_helpers import test_secrets

    os.environ["MESHAI_IDENTITY"] = str(test_secrets().client)
