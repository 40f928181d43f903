"""Where bloodbench keeps what it computes once: decoded images, features, embeddings."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$BLOODBENCH_CACHE``, else ``~/.cache/bloodbench``."""
    env = os.environ.get("BLOODBENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "bloodbench"
