"""The one way files are published: written aside in full, then swapped into place in one step.

Every writer in the package goes through here: adapter directories, LoRA exports and compact files
(:func:`write_files`), training run folders and the data cache (:func:`staging_folder`,
:func:`publish_folder`). A reader, or a process killed at any moment, sees the complete old
content or the complete new one, never a mix:

- one file is written to a temporary beside it and renamed over it;
- several files (an adapter directory: config and weights) are written into a complete sibling
  folder, which then trades places with the target in one atomic exchange (Linux ``renameat2``
  with ``RENAME_EXCHANGE``); entries of the target that the write does not replace are carried
  over as hard links. Of several processes saving to one place at once, one wins whole.

Temporaries are named ``.<name>.<random>.tmp`` / ``.partial`` and locked (``flock``) while in use,
so the next write to the same place removes those a killed process left, and never a live one.
Where the exchange is not available (not Linux, another file system under the target, a target
with more than :data:`MAX_CARRIED` entries, no permission to create the sibling) or not safe (a
process group of several ranks runs: another rank may be writing its own files into the folder)
the files are renamed into place one by one: each file is whole, but a crash between two renames
can mix them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ..distributed import several_processes

MAX_CARRIED = 10_000  # entries of a target carried into its replacement before giving up the swap
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
_STEM = 64  # characters of a target's name kept in its temporaries' names (names stay < 255 bytes)


def write_all(handle: IO[bytes], data: bytes) -> None:
    """Write ``data`` to ``handle`` (a seam for tests that simulate a crash mid-write)."""
    handle.write(data)


# ---------------------------------------------------------------------------- system calls
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.renameat2.argtypes = [
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_uint,
        ]
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return None
    return libc


_LIBC = _libc()


def rename2(old: Path, new: Path, flags: int) -> None:
    """``renameat2(old, new, flags)``; OSError(ENOSYS) where it does not exist."""
    if _LIBC is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available", str(new))
    if _LIBC.renameat2(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(new))


def exchange(a: Path, b: Path) -> None:
    """Swap two existing paths atomically."""
    rename2(a, b, _RENAME_EXCHANGE)


def rename_new(old: Path, new: Path) -> None:
    """Rename ``old`` to ``new``, failing with FileExistsError if ``new`` exists (never replacing it)."""
    try:
        rename2(old, new, _RENAME_NOREPLACE)
    except OSError as err:
        if err.errno not in (errno.ENOSYS, errno.EINVAL):
            raise
        if new.exists() or new.is_symlink():  # no renameat2: a small race, as os.rename has
            raise FileExistsError(errno.EEXIST, "File exists", str(new)) from None
        os.rename(old, new)


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


# ---------------------------------------------------------------------------- temporaries and leftovers
def _stem(target: Path) -> str:
    return target.name[:_STEM]


def _locked(path: Path, fd: int) -> bool:
    """Lock ``fd`` (waiting for a cleaner that holds it) and tell whether ``path`` is still its file."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        return os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _temp_file(target: Path) -> Iterator[tuple[Path, IO[bytes]]]:
    """A new locked temporary beside ``target``, removed at the end unless renamed away."""
    while True:
        tmp = target.with_name(f".{_stem(target)}.{secrets.token_hex(4)}.tmp")
        handle = open(tmp, "xb")  # noqa: SIM115 ("x": never follow or clobber an existing file)
        if _locked(tmp, handle.fileno()):
            break
        handle.close()  # a cleaner removed it between creation and lock: take another name
    try:
        with handle:
            yield tmp, handle
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


@contextlib.contextmanager
def _temp_folder(anchor: Path, target: Path) -> Iterator[Path]:
    """A new locked folder ``.<target name>.<random>.partial`` in ``anchor``, removed at the end."""
    while True:
        staged = Path(tempfile.mkdtemp(prefix=f".{_stem(target)}.", suffix=".partial", dir=anchor))
        fd = os.open(staged, os.O_RDONLY | os.O_DIRECTORY)
        if _locked(staged, fd):
            break
        os.close(fd)
    try:
        yield staged
    finally:
        shutil.rmtree(staged, ignore_errors=True)  # after a swap: the old content
        os.close(fd)


def remove_leftovers(folder: Path, target: Path) -> None:
    """Remove the temporaries of writes to ``target`` that a killed process left in ``folder``.

    Only unlocked ones go: a temporary in use is locked by its writer until it is published.
    """
    prefix = f".{_stem(target)}."
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(prefix)]
    except OSError:
        return
    for entry in entries:
        if not entry.name.endswith((".tmp", ".partial")) and ".old-" not in entry.name:
            continue
        path = Path(entry.path)
        try:
            if entry.is_symlink():
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(path, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
                continue
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink()
        except OSError:
            continue  # locked: in use by a live writer
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------- writing files
def _check_targets(files: dict[Path, bytes]) -> None:
    """Refuse bad targets before anything is written."""
    for path in files:
        check_target(path)


def check_target(path: Path) -> None:
    """Refuse a file that cannot be written (ValueError): a name too long, a symbolic link loop, a
    folder in its place, or a file where a folder above it should be."""
    for part in path.parts:
        if len(os.fsencode(part)) > 255:
            raise ValueError(f"{path}: the name {part[:40]!r}... is longer than a file system allows")
    try:
        path.resolve()
    except (RuntimeError, OSError) as err:  # RuntimeError: a symlink loop (Python < 3.13)
        raise ValueError(f"{path}: cannot be resolved ({err}); a symbolic link loop?") from None
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; name the file to write")
    for folder in (path.parent, *path.parent.parents):
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{folder}: exists and is not a directory")


def _make_folders(folder: Path, created: list[Path]) -> None:
    """``mkdir -p folder``, recording each folder it creates (to remove them if the write fails)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            if not path.is_dir():
                raise ValueError(f"{path}: exists and is not a directory") from None
        else:
            created.append(path)


def _remove_created(created: list[Path]) -> None:
    for path in reversed(created):
        with contextlib.suppress(OSError):
            path.rmdir()  # only if still empty


def write_files(files: dict[Path, bytes]) -> None:
    """Publish ``files`` (path -> content) whole: every file new, or (after a failure or a kill at
    any moment) every file as it was. Missing folders are created, and removed again on failure.

    Raises:
        ValueError: a target is a folder, lies under a file, has a name too long, or loops.
        OSError: the write itself failed (a full disk); nothing was replaced.
    """
    files = {Path(os.path.abspath(p)): data for p, data in files.items()}
    _check_targets(files)
    # a symlinked folder: write in its real folder; a symlinked file is replaced itself
    files = {p.parent.resolve() / p.name: data for p, data in files.items()}
    unit = Path(os.path.commonpath([p.parent for p in files]))
    created: list[Path] = []
    try:
        _make_folders(unit.parent, created)
        if len(files) == 1 or not _swap_folder(unit, files):
            for path in files:
                _make_folders(path.parent, created)
            _replace_files(files)
    except BaseException:
        _remove_created(created)
        raise


def _replace_files(files: dict[Path, bytes]) -> None:
    """Each file to a temporary beside it, then each renamed over its target: a crash while
    writing leaves every old file; only one between the renames (microseconds) could mix them."""
    with contextlib.ExitStack() as stack:
        temps = []
        for path, data in files.items():
            remove_leftovers(path.parent, path)
            tmp, handle = stack.enter_context(_temp_file(path))
            write_all(handle, data)
            handle.flush()
            os.fsync(handle.fileno())
            temps.append((tmp, path))
        for tmp, path in temps:
            os.replace(tmp, path)
    for folder in {path.parent for path in files}:
        fsync_dir(folder)


class _CannotSwap(Exception):
    """The target holds what a new folder cannot reproduce (a FIFO, a socket, a device)."""


def _swap_folder(unit: Path, files: dict[Path, bytes]) -> bool:
    """Write ``unit`` anew as a sibling folder and exchange the two; False if that is not possible
    here (nothing was changed then)."""
    if _LIBC is None or several_processes() or (unit.exists() and _count(unit) > MAX_CARRIED):
        return False  # other ranks may write files into the folder now (a Trainer's rng states)
    remove_leftovers(unit.parent, unit)
    with contextlib.ExitStack() as stack:
        try:
            staged = stack.enter_context(_temp_folder(unit.parent, unit))
        except PermissionError:  # the target is writable, its parent is not
            return False
        try:
            if unit.exists():
                staged.chmod(stat.S_IMODE(unit.stat().st_mode))
                _carry(unit, staged, {p.relative_to(unit) for p in files})
            else:
                umask = os.umask(0)
                os.umask(umask)
                staged.chmod(0o777 & ~umask)  # mkdtemp's 0700 would keep the output from other users
        except _CannotSwap:
            return False
        for path, data in files.items():
            dest = staged / path.relative_to(unit)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "xb") as handle:
                write_all(handle, data)
                handle.flush()
                os.fsync(handle.fileno())
            fsync_dir(dest.parent)
        fsync_dir(staged)
        return _publish(staged, unit)


def _publish(staged: Path, unit: Path) -> bool:
    """Put ``staged`` in ``unit``'s place (exchange, or rename if ``unit`` is missing); False when the
    file system cannot exchange (``staged`` is left for the caller to remove)."""
    cwd = _cwd_under(unit)
    try:
        rename_new(staged, unit)
    except FileExistsError:
        try:
            exchange(staged, unit)
        except OSError as err:
            if err.errno in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.ENOTSUP):
                return False
            raise
    if cwd is not None:  # the process stood in the old folder: move it to the new one
        with contextlib.suppress(OSError):
            os.chdir(cwd)
    fsync_dir(unit.parent)
    return True


def _cwd_under(folder: Path) -> str | None:
    try:
        cwd = os.getcwd()
    except OSError:
        return None
    return cwd if Path(cwd) == folder or folder in Path(cwd).parents else None


def _count(folder: Path) -> int:
    """Entries under ``folder``, counted up to just past :data:`MAX_CARRIED`."""
    n = 0
    for _, dirs, names in os.walk(folder):
        n += len(dirs) + len(names)
        if n > MAX_CARRIED:
            break
    return n


def _carry(source: Path, dest: Path, replaced: set[Path], rel: Path = Path()) -> None:
    """Link every entry of ``source`` into ``dest`` except those ``replaced`` (relative paths) and
    leftover temporaries; folders holding a replaced file are rebuilt, the others linked whole."""
    for entry in os.scandir(source):
        path = rel / entry.name
        if path in replaced or (entry.name.startswith(".") and entry.name.endswith((".tmp", ".partial"))):
            continue
        target = dest / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        elif entry.is_dir():
            target.mkdir()
            target.chmod(stat.S_IMODE(entry.stat().st_mode))
            _carry(Path(entry.path), target, replaced, path)
        elif entry.is_file():
            try:
                os.link(entry.path, target, follow_symlinks=False)
            except OSError:
                shutil.copy2(entry.path, target)
        else:  # a FIFO, socket or device: cannot be carried faithfully
            raise _CannotSwap(entry.path)


# ---------------------------------------------------------------------------- whole folders
@contextlib.contextmanager
def staging_folder(target: Path) -> Iterator[Path]:
    """A fresh folder next to ``target`` (in its nearest existing ancestor: the same file system, so
    publishing is one rename), removed when the block ends unless it was published. Leftovers of
    earlier, killed writes to ``target`` are removed first."""
    anchor = existing_ancestor(target.parent)
    remove_leftovers(anchor, target)
    with _temp_folder(anchor, target) as staged:
        umask = os.umask(0)
        os.umask(umask)
        staged.chmod(0o777 & ~umask)  # mkdtemp's 0700 would keep the output from other users
        yield staged


def publish_folder(staged: Path, target: Path, *, replace: bool) -> bool:
    """Put the finished folder ``staged`` at ``target``; True if it was published.

    An existing ``target`` is replaced when ``replace`` (exchanged atomically, then removed: at no
    moment is there no ``target``); otherwise it is kept and False returned (another process
    published first).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        rename_new(staged, target)  # atomic on one file system: readers see no folder or a whole one
    except FileExistsError:
        if not replace:
            return False
        try:
            exchange(staged, target)
        except OSError as err:
            if err.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
                raise
            old = target.with_name(f".{_stem(target)}.old-{secrets.token_hex(4)}.partial")
            target.rename(old)  # no exchange here: two renames, the old folder kept aside between
            staged.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            shutil.rmtree(staged, ignore_errors=True)  # the old content, now under the staged name
    fsync_dir(target.parent)
    return True
