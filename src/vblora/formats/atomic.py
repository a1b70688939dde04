"""The one way files are published: written aside in full, then renamed into place.

Every writer in the package goes through here: adapter directories and compact files
(:func:`write_files`), training run folders and the data cache (:func:`staging_folder`,
:func:`publish_folder`). A reader never sees a half-written file or folder, and an interrupted
write leaves what was there before.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def write_all(handle: IO[bytes], data: bytes) -> None:
    """Write ``data`` to ``handle`` (a seam for tests that simulate a crash mid-write)."""
    handle.write(data)


def write_files(files: dict[Path, bytes]) -> None:
    """Write every file to a temporary in its folder (created if missing), then rename each over
    its target.

    Nothing is replaced until all temporaries are written and synced, so an exception or crash
    while writing leaves every old file intact (only a crash between the final renames, a few
    microseconds, could leave some files new and others old).
    """
    for path in files:  # bad targets are refused before anything is written
        if path.is_dir():
            raise ValueError(f"{path}: is a directory; name the file to write")
        for folder in (path.parent, *path.parent.parents):
            if folder.exists() and not folder.is_dir():
                raise ValueError(f"{folder}: exists and is not a directory")
    for folder in {path.parent for path in files}:
        folder.mkdir(parents=True, exist_ok=True)
    temps: dict[Path, Path] = {}
    try:
        for path, data in files.items():
            temps[path] = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
            with open(temps[path], "xb") as handle:  # "x": never follow or clobber an existing file
                write_all(handle, data)
                handle.flush()
                os.fsync(handle.fileno())
        for path, tmp in temps.items():
            os.replace(tmp, path)
    finally:
        for tmp in temps.values():  # left over only if something failed
            with contextlib.suppress(OSError):
                tmp.unlink()
    for folder in {path.parent for path in files}:
        fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); not possible, nor needed, everywhere."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def existing_ancestor(path: Path) -> Path:
    """The nearest folder above (or at) ``path`` that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextlib.contextmanager
def staging_folder(target: Path) -> Iterator[Path]:
    """A fresh folder next to ``target`` (in its nearest existing ancestor: the same file system, so
    publishing is one rename), removed when the block ends unless it was published."""
    anchor = existing_ancestor(target.parent)
    staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=anchor))
    try:
        umask = os.umask(0)
        os.umask(umask)
        staged.chmod(0o777 & ~umask)  # mkdtemp's 0700 would keep the output from other users
        yield staged
    finally:
        shutil.rmtree(staged, ignore_errors=True)  # gone already after a successful publish


def publish_folder(staged: Path, target: Path, *, replace: bool) -> bool:
    """Rename the finished folder ``staged`` to ``target``; True if it was published.

    An existing ``target`` is replaced when ``replace`` (moved aside, then removed); otherwise it
    is kept and False returned (another process published first).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        try:
            staged.rename(target)  # atomic on one file system: readers see no folder or a whole one
        except OSError:
            if not target.exists():
                raise
        else:
            fsync_dir(target.parent)
            return True
    if not replace:
        return False
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    target.rename(old)
    staged.rename(target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
    return True
