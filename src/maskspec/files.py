"""Files and folders that appear whole or not at all: a reader (or a later run after a kill) sees the old version
or the new one, never a torn one.

The new content goes into a temporary sibling (same folder, so the final rename stays on one file system), is
flushed to disk, and replaces the target with one rename; on any failure the temporary is removed and the old
target is left as it was. New files and folders get the ordinary permissions of the umask (unlike tempfile's
owner-only ones). Standard library only: every other module may use this one.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["atomic_folder", "atomic_write_bytes", "atomic_write_text"]


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> Path:
    """Replace (or create) the file `path` with `data` atomically. `mode`: its permission bits; None keeps those
    of the file it replaces, or gives a new file the umask's default (0o666 & ~umask). The folder must exist."""
    path = Path(path)
    if mode is None:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            pass
    tmp = path.with_name(_temp_name(path.name))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for any new file
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str, mode: int | None = None, encoding: str = "utf-8") -> Path:
    """`atomic_write_bytes` of `text` encoded (newlines written as given)."""
    return atomic_write_bytes(path, text.encode(encoding), mode)


@contextmanager
def atomic_folder(target: str | Path, *, keep_existing: Callable[[Path], bool] | None = None,
                  temp_name: str | None = None) -> Iterator[Path]:
    """Yield a new, empty temporary folder next to `target`; when the block ends without an error its files are
    flushed to disk and it replaces `target` (file or folder) in one rename. After an error the temporary folder
    is removed and `target` is left as it was. Missing parent folders are created.

    keep_existing: a test of an existing `target` (e.g. "it has a complete marker"); when it holds, that target
    stays and the new folder is dropped: another process wrote the same thing first.
    temp_name: a fixed name for the temporary folder, for several processes writing into it (a leftover of an
    interrupted write under that name is removed first); default a unique name.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(temp_name or _temp_name(target.name))
    if temp_name is not None:
        _remove(temp)
    temp.mkdir()
    try:
        yield temp
        _fsync_tree(temp)
        _publish(temp, target, keep_existing)
    finally:
        _remove(temp)


def _publish(temp: Path, target: Path, keep_existing: Callable[[Path], bool] | None) -> None:
    if keep_existing is not None and keep_existing(target):
        return
    old = None
    if os.path.lexists(target):
        old = target.with_name(_temp_name(target.name, "old"))
        os.replace(target, old)
    try:
        os.replace(temp, target)
    except OSError:
        # Renaming onto a non-empty folder fails: another process published it after the check above.
        if keep_existing is not None and keep_existing(target):
            return
        if old is not None:
            os.replace(old, target)
        raise
    _fsync_dir(target.parent)
    if old is not None:
        _remove(old)


def _temp_name(name: str, kind: str = "tmp") -> str:
    return f".{kind}-{name}-{os.getpid()}-{secrets.token_hex(4)}"


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """Flush every file below `folder`, then the folders themselves, to disk."""
    for parent, _, names in os.walk(folder, topdown=False):
        for name in names:
            path = os.path.join(parent, name)
            if os.path.isfile(path) and not os.path.islink(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(Path(parent))


def _fsync_dir(path: Path) -> None:
    """Make a rename in or a file creation below `path` durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def unwritable_reason(path: str | Path) -> str | None:
    """Why `path` (a file or folder a command is about to create, append to or replace) cannot be written, in words
    that follow "--out PATH: ", or None when it can. Meant for before a command loads a model or computes
    anything, so that no result is lost at the end. An existing file must be writable; otherwise the folder that
    will hold the new entries (`path` itself when it is a folder, else its nearest existing ancestor) must let a
    folder be made in it: that is tried, and the try removed, because permission bits say nothing for root,
    read-only mounts or virtual file systems."""
    path = Path(path).absolute()
    if path.is_file():  # appended to or replaced in place
        return None if os.access(path, os.W_OK) else f"{path} is not writable; choose another --out"
    holder = path if path.is_dir() else next(parent for parent in path.parents if parent.exists())
    if not holder.is_dir():
        return f"{holder} is not a folder; choose another --out"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=holder))
    except OSError as exc:
        return f"nothing can be written in {holder} ({(exc.strerror or str(exc)).lower()}); choose another --out"
    return None
