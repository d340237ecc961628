"""The one way this project replaces a file: write a temporary file beside it, fsync, rename over it, fsync the
folder. Readers see the old file or the whole new one, never a part; a crash leaves at most a ``.tmp-*`` file
(``BankStore.clean`` and the next write ignore it)."""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import socket
import stat
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Union

Content = Union[bytes, str, Callable[[Path], None]]

# Temporary names carry their owner (host and pid), so that a replica sharing the folder removes only leftovers whose
# owner is provably gone: a dead process on this host, or (another host's) anything older than a cleaner's limit.
HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
_OWNED = re.compile(r"^\.tmp-([A-Za-z0-9]+)\.(\d+)-")


def owner_tag() -> str:
    return f"{HOST}.{os.getpid()}"


def temp_name(name: str) -> str:
    """The name of a temporary file or folder for ``name`` owned by this process."""
    return f".tmp-{owner_tag()}-{name}"


def pid_alive(pid: int) -> bool:
    if pid <= 0:  # no process's pid (0 and -1 would ask about a whole group, or every process)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_gone(host: str, pid: int, since: float, stale_after_s: float) -> bool:
    """Whether the process that owns something is provably gone: on this host its pid is dead; on another host
    nothing can be checked, so only a thing older than ``stale_after_s`` counts as abandoned."""
    if host == HOST:
        return not pid_alive(pid)
    return time.time() - since > stale_after_s


def is_dead_leftover(path: Path, stale_after_s: float) -> bool:
    """A ``.tmp-*`` leftover whose writer is gone (names without an owner: by age alone)."""
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return False
    match = _OWNED.match(path.name)
    if match is None:
        return time.time() - mtime > stale_after_s
    return owner_gone(match.group(1), int(match.group(2)), mtime, stale_after_s)


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
        path.write_text(content, encoding="utf-8")
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def new_temp(parent: Path, prefix: str, directory: bool = False) -> Path:
    """A new empty file (or folder) ``parent/prefix<random>`` with the permissions the umask gives any new one:
    tempfile's are private (0600, 0700), and the rename into place kept that, so results, banks and model folders
    were unreadable to the group a user's umask shares them with."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(6)}"
        try:
            if directory:
                os.mkdir(path, 0o777)
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name {prefix}* in {parent}")


def write_atomic(path: str | Path, content: Content) -> Path:
    """Replace ``path`` with ``content`` atomically (see the module docstring); a file replaced keeps its
    permissions, a new one gets the umask's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp(path.parent, temp_name(path.name) + "-")
    try:
        try:
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        except FileNotFoundError:
            pass
        write_file(tmp, content)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextmanager
def exclusive(lock: Path, waiting: str):
    """An exclusive lock on the file ``lock`` (created), released when the block ends or the process dies; says
    ``waiting`` on stderr when another holds it."""
    with open(lock, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def try_writing_in(folder: Path) -> None:
    """Raises the OSError that writing a file in ``folder`` raises (a read-only mount, an immutable folder, a full
    disk): found before long work, not when its results are written."""
    with tempfile.TemporaryFile(dir=folder):
        pass


def cannot_write(option: str, target: Path, err: OSError) -> str:
    """What to say when the folder ``target`` given as ``option`` (--out, --repository) could not be made or written
    (``err``): where writing failed, the first of it and its parents that is there, rather than a traceback's path."""
    reason = str(err)
    for folder in (target, *target.parents):
        if folder.exists():
            reason = f"{folder} is a file, not a folder" if not folder.is_dir() else f"{folder}: {err.strerror or err}"
            break
    return f"{option} '{target}' cannot be written ({reason}): pass another {option}"


def exporting(repository: Path):
    """Held while a model repository is written (``python -m export``, ``pa-clip main``): a second export waits."""
    repository = Path(repository)
    repository.parent.mkdir(parents=True, exist_ok=True)
    return exclusive(repository.parent / f".{repository.name}.export-lock",
                     f"another job is exporting into {repository}: waiting ...")
