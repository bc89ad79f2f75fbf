"""Where crosscoder_pl keeps what it builds once and reuses (embedded corpus, embedded model pair)."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of the project cache: ``$CROSSCODER_PL_CACHE`` or ``~/.cache/crosscoder_pl``."""
    root = os.environ.get("CROSSCODER_PL_CACHE") or Path.home() / ".cache" / "crosscoder_pl"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
