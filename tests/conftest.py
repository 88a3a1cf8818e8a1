"""Shared test setup: the tests directory is importable (models_helper), and quiet progress bars."""

from __future__ import annotations

import os

os.environ.setdefault("MESHAI_PROGRESS", "0")
