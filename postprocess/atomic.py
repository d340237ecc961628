"""The one way this project replaces a file: write a temporary file beside it, fsync, rename over it, fsync the
folder. Readers see the old file or the whole new one, never a part; a crash leaves at most a ``.tmp-*`` file
(``BankStore.clean`` and the next write ignore it)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union

Content = Union[bytes, str, Callable[[Path], None]]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, content: Content) -> None:
    """Write bytes, text, or call ``content(path)`` to let a library write the file; then flush it to disk."""
    if callable(content):
        content(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_atomic(path: str | Path, content: Content) -> Path:
    """Replace ``path`` with ``content`` atomically (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        write_file(Path(tmp), content)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
