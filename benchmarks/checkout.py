"""A throwaway copy of this checkout, for runs of the whole pipeline that must not touch it (the e2e
test, the kill trials)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def copy_checkout(root: Path) -> Path:
    """This checkout's tracked and untracked-but-not-ignored files, copied to `root` (no data, no venv)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for f in filter(None, files):
        if (REPO / f).is_file():
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, root / f)
    return root
