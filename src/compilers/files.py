"""Writing files and directories so that readers see the old content or the new, never part of it, and a
failure leaves nothing half-written behind. What is written gets the user's umask, like any new file."""
from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from pathlib import Path
from typing import Iterator


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
