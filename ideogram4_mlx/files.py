"""Writing outputs safely: build in a temporary sibling, then rename into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def move_into_place(tmp: Path, dst: Path) -> None:
    """Rename the finished folder ``tmp`` to ``dst``, replacing an existing ``dst`` only at the
    very end, so an interruption leaves either the old or the new folder, never a mix."""
    if not dst.exists():
        os.replace(tmp, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
    os.replace(dst, old / "replaced")
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
