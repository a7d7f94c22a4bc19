"""Write a folder all at once: into a hidden temp folder beside it, renamed into place when complete.

A reader (or a crash) never sees half a checkpoint. The engine builder has its own, richer staging with a lock
(builder/engine_dir.py); this one serves the checkpoint writers (tiny fixtures, geometry presets).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staged_dir(path: Path) -> Iterator[Path]:
    """Yield a temp folder; on success it becomes `path`, on any error (Ctrl-C included) it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
