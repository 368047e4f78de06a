"""Where pl-lossy keeps what it computes once per machine: the outcome store, the text corpus."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$PL_LOSSY_CACHE``, else ``~/.cache/pl-lossy``."""
    return Path(os.environ.get("PL_LOSSY_CACHE") or Path.home() / ".cache" / "pl-lossy").expanduser()
