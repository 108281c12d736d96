"""Writing a file in one step: a new file beside the target, flushed to disk, then renamed."""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

from scorecam_explorer.errors import ScorecamError


def write_atomically(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on a new binary file beside ``path``, then rename it to ``path``.

    The file is flushed to disk before the rename, so ``path`` holds either the old content
    or the whole new one, never part of it; when ``write`` raises, the new file is removed
    and ``path`` is left as it was. A new file gets the usual mode (0o666 less the umask,
    applied by the operating system); a replaced file keeps its mode.
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise ScorecamError(f"cannot write {target}: the folder {target.parent} does not exist.")
    temporary = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.partial"
    try:
        with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        if target.exists():
            os.chmod(temporary, stat.S_IMODE(os.stat(target).st_mode))
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target
