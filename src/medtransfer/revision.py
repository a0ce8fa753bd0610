"""The code revision a run or report was made with, read once per process from git."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path


@functools.lru_cache(maxsize=8)
def code_revision(root: Path) -> str:
    """`git describe`-like revision of the working tree ('<sha>' or '<sha>+changes'), or 'unknown'.

    Cached: every run of a search is tagged with it, and the tree does not change under a running step."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}+changes" if dirty else sha
