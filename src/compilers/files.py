"""Writing files and directories so that readers see the old content or the new, never part of it, and a
failure leaves nothing half-written behind. What is written gets the user's umask, like any new file.

Files: `replacing` / `write_text`. Directories: fill a `staging_dir` beside the destination, then
`swapped_in` puts it in place (the artifact save, `compilers publish`, the Triton export)."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh path beside `path` for the block to write; when the block succeeds it replaces `path` in one
    rename, and in any case it is gone afterwards. It keeps `path`'s suffix (savefig picks its format from it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Replace the file at `path` with `text`, atomically (see `replacing`)."""
    with replacing(path) as tmp:
        tmp.write_text(text)


def staging_dir(parent: Path, prefix: str) -> Path:
    """A new empty directory inside `parent`, to fill and then rename into place; unlike mkdtemp's private
    0700, it has the permissions any new directory gets (the umask's)."""
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    return staging


@contextlib.contextmanager
def swapped_in(new: Path, path: Path, *, replace: bool = True) -> Iterator[None]:
    """Put the directory `new` at `path` as the block starts; if the block raises, what was at `path` is put
    back (and the new directory is left at `new`); when it succeeds, the old directory is removed.

    replace=True: readers of `path` see the old directory or the new one, never none, where Linux's
    renameat2(RENAME_EXCHANGE) swaps them in one step; elsewhere the old one is renamed aside to
    `.<name>.old-*` beside `path` and the new one renamed in (an exception in between puts the old one back).
    replace=False: FileExistsError when anything is at `path` already, with nothing moved (one atomic rename
    that never replaces, so concurrent writers each get their own `path`)."""
    new, path = Path(new), Path(path)
    if not replace:
        _rename_new(new, path)
        old = None
    else:
        old = _swap(new, path)
    try:
        yield
    except BaseException:
        if old is None:
            os.rename(path, new)
        elif old == new:
            _rename2(new, path, _RENAME_EXCHANGE)     # exchanged: exchange back
        else:
            os.rename(path, new)
            os.rename(old, path)
            remove(old.parent)
        raise
    finally:
        _sync_dir(path.parent)
    if old is not None:
        remove(old.parent if old != new else old)


def _rename_new(new: Path, path: Path) -> None:
    """Rename `new` to `path`, which must not exist (FileExistsError otherwise, nothing moved)."""
    if _rename2(new, path, _RENAME_NOREPLACE):
        return
    os.mkdir(path)      # portable no-replace: claim the name first (FileExistsError if taken), then fill it
    try:
        os.rename(new, path)
    except BaseException:
        os.rmdir(path)
        raise


def _swap(new: Path, path: Path) -> Path | None:
    """Put `new` at `path`; where the old directory went (`new` itself after an exchange, or a `.old-`
    directory beside `path`), or None when there was none."""
    if not os.path.lexists(path):
        try:
            os.rename(new, path)
            return None
        except OSError as e:        # another writer put something there first
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    if _rename2(new, path, _RENAME_EXCHANGE):
        return new
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent)) / "old"
    try:
        os.rename(path, aside)
        try:
            os.rename(new, path)
        except BaseException:
            os.rename(aside, path)
            raise
    except BaseException:
        remove(aside.parent)
        raise
    return aside


def remove(path: Path) -> None:
    """Remove a directory tree (or a link, not what it points to); nothing if it is gone."""
    path = Path(path)
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _sync_dir(path: Path) -> None:
    """fsync a directory, so a rename in it is on disk (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sync_tree(root: Path) -> None:
    """fsync every file and directory under `root`, so a rename never publishes data still in the page cache."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _sync_dir(Path(dirpath))


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
_renameat2: Any = None


def _rename2(a: Path, b: Path, flags: int) -> bool:
    """Linux renameat2(a, b, flags); False where this libc, kernel or filesystem cannot do it."""
    global _renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        try:
            _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
            _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            _renameat2.restype = ctypes.c_int
        except (AttributeError, OSError):     # a libc without renameat2 (glibc < 2.28)
            _renameat2 = False
    if _renameat2 is False:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False                          # this filesystem or kernel cannot: fall back to plain renames
    raise OSError(err, os.strerror(err), str(b))
