"""The artifact on disk: a directory of the engine's files plus `manifest.json` (format, target, signature,
versions, report, every file's sha256 and the content digest).

`write` stages a new artifact beside its destination and swaps it in whole (`files.swapped_in`); `verify`
checks that a directory holds exactly the files its manifest lists; `read` verifies and opens an artifact,
starting over when a concurrent save replaced it meanwhile. The manifest itself is read only when it is a
regular file of bounded size whose JSON nests to a bounded depth. No backend library is needed here:
`runtime.load` gives `read` the function that opens the engine.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from .errors import ArtifactError, CompilerError, TargetError
from .files import remove, staging_dir, swapped_in, sync_tree
from .report import Report
from .signature import Signature
from .target import Target

FORMAT = "compilers-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DIGEST_PREFIX = "sha256:"
#: a manifest larger than this is not one (the largest real ones, with big reports, are a few hundred KiB)
MAX_MANIFEST_BYTES = 16 << 20
#: a manifest nests no deeper than this (a real one nests under 20; a model's outputs nested 90 deep reach it)
MAX_MANIFEST_DEPTH = 200
#: names quoted at most in one message (a directory of 100,000 stray files gives a short error)
_QUOTED = 5
_ATTEMPTS = 40      # reads of an artifact that a concurrent save keeps replacing, before giving up

T = TypeVar("T")


# -- writing ---------------------------------------------------------------------------------------------
def write(path: Path, save_files: Callable[[Path], None], records: Mapping[str, Any], what: str) -> str:
    """Write an artifact at `path` and return its content digest: `save_files(dir)` writes the engine's files,
    `records` are the manifest's target, signature, versions, bound and report. Readers of `path` see the old
    artifact or the new one, never a half-written one nor none; an existing `path` is replaced only when it is
    empty or a compilers artifact (ArtifactError otherwise, with nothing deleted). `what` names the writer in
    errors (the backend)."""
    check_destination(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(path.parent, f".{path.name}.tmp-")
    try:
        save_files(tmp)
        present, odd = _tree(tmp)
        if odd:
            raise ArtifactError(f"the {what} engine saved links or special files {_quote(odd)}; an artifact holds "
                                "regular files only (a bug in its backend: please report it)")
        files = {name: _sha256(file) for name, file in sorted(present.items())}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **records, "files": files}
        manifest["digest"] = _content_digest(files, manifest)
        manifest["generation"] = uuid.uuid4().hex   # tells one save from the next of the same model (read)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        sync_tree(tmp)
        with swapped_in(tmp, path):
            pass
    finally:
        remove(tmp)
    return manifest["digest"]


def check_destination(path: str | os.PathLike) -> bool:
    """Whether writing an artifact at `path` would replace one (True) or make a new one (False); ArtifactError,
    before anything is built, when it cannot write there: `path` or a parent is a file, or `path` is a
    directory that is not a compilers artifact. An artifact whose directory holds only the files its manifest
    lists may be replaced (they may be damaged: a cache rebuilds over those)."""
    path = Path(path)
    parent = path.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ArtifactError(f"cannot write an artifact at {path}: {parent} is a file, not a directory")
    if not os.path.lexists(path):
        return False
    if not path.is_dir():
        raise ArtifactError(f"{path} exists and is not a directory, so not a compilers artifact; choose an empty "
                            "or new directory")
    try:
        present, odd = _tree(path)
        raw = _read_manifest(path)
        if raw is None and not present and not odd:
            return False
        manifest = _parse_manifest(path, raw) if raw is not None else None
    except (ArtifactError, OSError):
        manifest = None
    if manifest is None or odd or set(present) != set(manifest["files"]):
        raise ArtifactError(f"{path} exists and is not a compilers artifact (it holds files no artifact manifest "
                            "lists); nothing was deleted. Choose an empty or new directory, or remove it yourself")
    return True


# -- reading ---------------------------------------------------------------------------------------------
def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The artifact's manifest, format checked but files not hashed (what it says, not proof of what is there:
    `read` and `verify` check the files); ArtifactError when there is none or it is malformed."""
    path = Path(path)
    raw = _read_manifest(path)
    if raw is None:
        raise ArtifactError(f"{path} is not a compilers artifact: {MANIFEST} is missing")
    return _parse_manifest(path, raw)


def verify(path: str | os.PathLike, *, digest: str | None = None) -> dict[str, Any]:
    """The manifest of the artifact at `path`, after checking its format and that its directory holds exactly
    the files the manifest lists, each with its sha256 (no backend library needed); its "digest" is the
    content digest computed from them. ArtifactError saying what is wrong otherwise, or when `digest`
    ("sha256:...") is given and differs."""
    return _verified(Path(path), digest)[0]


def digest(path: str | os.PathLike) -> str:
    """The content digest ("sha256:...") of the verified artifact at `path`: what load(path, digest=...) pins."""
    return verify(path)["digest"]


def read(path: Path, digest: str | None, open_verified: Callable[[Path, dict[str, Any]], T]) -> T:
    """`open_verified(path, manifest)` on the verified artifact at `path` (pinned to `digest` when given); a
    save that replaces `path` meanwhile makes it start over, so it opens the old or the new artifact whole.
    An error of the engine's library while opening files that match the manifest is an ArtifactError."""
    for attempt in range(_ATTEMPTS):
        manifest, raw = _verified(path, digest)
        try:
            opened = open_verified(path, manifest)
        except CompilerError:
            if not _changed(path, raw):
                raise
        except Exception as e:
            if not _changed(path, raw):
                backend = manifest["target"].get("backend")
                raise ArtifactError(f"{path}: the {backend} engine cannot be loaded from its files "
                                    f"({type(e).__name__}: {e}); they match the manifest, so they were saved "
                                    f"broken or for another {backend}: re-save the artifact") from e
        else:
            if not _changed(path, raw):
                return opened
        _pause(attempt)
    raise ArtifactError(f"{path} kept changing while it was loaded ({_ATTEMPTS} tries): something saves over it "
                        "continually; load it again once that stops")


def manifest_records(path: str | os.PathLike, manifest: Mapping[str, Any]) -> tuple[Target, Signature, Report]:
    """The target, signature and report a manifest (from `read_manifest` or `verify`) holds, each checked field
    by field; ArtifactError naming the field when one is malformed."""
    path = Path(path)
    return malformed(path, lambda: (Target.from_dict(manifest["target"], source=str(path / MANIFEST)),
                                    Signature.from_dict(manifest["signature"]),
                                    Report.from_dict(manifest.get("report"))))


def malformed(path: Path, read_field: Callable[[], T]) -> T:
    """`read_field()`, its ValueError / TargetError about the manifest as an ArtifactError saying what to do."""
    try:
        return read_field()
    except (ValueError, TargetError) as e:
        raise ArtifactError(f"{path / MANIFEST} is malformed: {e}. Re-save the artifact (or fetch it again)") from None


def _read_manifest(path: Path) -> bytes | None:
    """The manifest's bytes, None when there is none; ArtifactError, before reading a byte, unless it is a
    regular file (never through a link; a FIFO, device or directory is refused, not waited on) of at most
    MAX_MANIFEST_BYTES."""
    file = path / MANIFEST
    try:
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ArtifactError(f"{file} is a symbolic link; an artifact holds regular files only: "
                                "re-save or fetch the artifact again") from None
        raise ArtifactError(f"{file} cannot be read ({e.strerror}); check its permissions") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ArtifactError(f"{file} is {_kind(mode)}, not a regular file; an artifact's manifest is a JSON "
                                "file: re-save or fetch the artifact again")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{file} is larger than {MAX_MANIFEST_BYTES >> 20} MiB, which no manifest is; "
                            "re-save or fetch the artifact again")
    return data


def _nests_deeper(value: Any, depth: int) -> bool:
    """Whether parsed JSON nests more than `depth` lists / objects deep (walked level by level, no recursion)."""
    level = [value]
    for _ in range(depth + 1):
        containers = [v for v in level if isinstance(v, (dict, list))]
        if not containers:
            return False
        level = [child for v in containers for child in (v.values() if isinstance(v, dict) else v)]
    return True


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def _parse_manifest(path: Path, raw: bytes) -> dict[str, Any]:
    deeper = f"{path / MANIFEST} is corrupt: its JSON nests deeper than any manifest does; re-save or fetch the " \
             "artifact again"
    try:
        manifest = json.loads(raw.decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path / MANIFEST} is corrupt: {str(e)[:200]}; re-save or fetch the artifact "
                            "again") from None
    except RecursionError:
        raise ArtifactError(deeper) from None
    except ValueError:            # a number of more digits than Python converts (sys.get_int_max_str_digits)
        raise ArtifactError(f"{path / MANIFEST} is corrupt: it holds a number longer than any manifest's; "
                            "re-save or fetch the artifact again") from None
    if _nests_deeper(manifest, MAX_MANIFEST_DEPTH):   # what reads it later (signature, treespec) recurses
        raise ArtifactError(deeper)
    version = manifest.get("format_version", 0) if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(version, int) \
            or version > FORMAT_VERSION:
        got = str(manifest)[:60] if not isinstance(manifest, dict) else \
            f"{str(manifest.get('format'))[:40]} v{str(manifest.get('format_version'))[:20]}"
        raise ArtifactError(f"{path}: artifact format {got} is not readable by this compilers (reads {FORMAT} "
                            f"v{FORMAT_VERSION}); upgrade compilers, or save the model again with cm.save(dir)")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise ArtifactError(f"{path / MANIFEST}: 'files' must list every file of the artifact with its sha256; "
                            "re-save the artifact")
    for key in ("target", "signature"):
        if not isinstance(manifest.get(key), dict):
            raise ArtifactError(f"{path / MANIFEST}: '{key}' is missing or malformed; re-save the artifact")
    return manifest


def _quote(names: list[str]) -> str:
    """Up to _QUOTED names, and how many more."""
    more = f" and {len(names) - _QUOTED} more" if len(names) > _QUOTED else ""
    return ", ".join(n[:200] for n in names[:_QUOTED]) + more


def _check_files(path: Path, manifest: Mapping[str, Any]) -> str:
    """The content digest, after checking that the directory's files are exactly those the manifest lists,
    each with its sha256. Only files found inside `path` (no link followed) are read, so a listed name
    outside it (`../x`, `/etc/x`) is as absent as any other: the message reveals nothing about it."""
    listed: dict[str, str] = manifest["files"]
    present, odd = _tree(path)
    missing = sorted(set(listed) - set(present))
    unlisted = sorted(set(present) - set(listed))
    altered = [] if missing or unlisted or odd else \
        sorted(name for name in listed if _sha256(present[name]) != listed[name])
    if missing or unlisted or altered or odd or not listed:
        parts = ([f"{name} listed in the manifest is missing" for name in missing]
                 + [f"{name} is not listed in the manifest" for name in unlisted]
                 + [f"{name} does not match its sha256 in the manifest" for name in altered]
                 + [f"{name} is a link or special file" for name in odd]) or ["the manifest lists no model file"]
        if len(parts) > _QUOTED:
            parts[_QUOTED:] = [f"{len(parts) - _QUOTED} more such file(s)"]
        raise ArtifactError(f"{path}: its files are not those its manifest lists ({'; '.join(p[:300] for p in parts)}): "
                            "the artifact is incomplete or was altered; re-save it or fetch it again")
    return _content_digest(listed, manifest)


def _tree(root: Path) -> tuple[dict[str, Path], list[str]]:
    """The regular files under `root` by relative posix path (the top-level manifest aside), and the entries
    that are neither regular files nor directories (links, devices...), without following any link."""
    files: dict[str, Path] = {}
    odd: list[str] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as entries:
            for entry in entries:
                name = f"{rel}/{entry.name}" if rel else entry.name
                if rel == "" and entry.name == MANIFEST:
                    continue         # read on its own, regular files only (_read_manifest)
                if entry.is_symlink():
                    odd.append(name)
                elif entry.is_dir(follow_symlinks=False):
                    stack.append(name)
                elif entry.is_file(follow_symlinks=False):
                    files[name] = Path(entry.path)
                else:
                    odd.append(name)
    return files, sorted(odd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _content_digest(files: Mapping[str, str], manifest: Mapping[str, Any]) -> str:
    """The artifact's content digest: sha256 over its files (sorted path and sha256 pairs), its signature and
    its target, i.e. everything load() runs. The rest of the manifest (report, versions) is description."""
    content = {"files": sorted(files.items()), "signature": manifest["signature"], "target": manifest["target"]}
    return DIGEST_PREFIX + hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _save_in_progress(path: Path) -> bool:
    """A save to `path` is under way (its staging or set-aside directory exists)."""
    try:
        return any(p.name.startswith((f".{path.name}.tmp-", f".{path.name}.old-")) for p in path.parent.iterdir())
    except OSError:
        return False


def _changed(path: Path, raw: bytes | None) -> bool:
    """The artifact at `path` is not the one whose manifest read `raw` (a save replaced it meanwhile)."""
    try:
        now = _read_manifest(path)
    except ArtifactError:         # the manifest became a link or unreadable: report that, do not wait
        return False
    return now != raw or (raw is None and _save_in_progress(path))


def _pause(attempt: int) -> None:
    time.sleep(min(0.001 * 2 ** attempt, 0.05))


def _verified(path: Path, digest: str | None) -> tuple[dict[str, Any], bytes]:
    """The checked manifest (with its computed "digest") and its bytes; retried while a save replaces `path`."""
    if digest is not None and not (isinstance(digest, str) and digest.startswith(DIGEST_PREFIX)):
        raise ArtifactError(f"digest={str(digest)[:80]!r}: pin an artifact with the 'sha256:...' digest that save "
                            "printed (cm.digest, compilers.artifact.digest(path))")
    last: ArtifactError | None = None
    for attempt in range(_ATTEMPTS):
        raw = None
        try:
            raw = _read_manifest(path)
            if raw is None:
                raise ArtifactError(f"{path} is not a compilers artifact: {MANIFEST} is missing; save one with cm.save(dir)")
            manifest = _parse_manifest(path, raw)
            try:
                computed = _check_files(path, manifest)
            except OSError as e:        # a file went away while it was read
                raise ArtifactError(f"{path}: a file could not be read ({e.strerror}); re-save the artifact") from None
            if digest is not None and computed != digest:
                raise ArtifactError(f"{path} is not the artifact you pinned: its digest is {computed}, not {digest}; "
                                    "nothing in it was loaded. Fetch the artifact you pinned, or pin this one if you trust it")
            manifest["digest"] = computed      # a stored one is what save printed; only a pinned one is checked
            return manifest, raw
        except ArtifactError as e:
            if not _changed(path, raw):
                raise
            last = e
        _pause(attempt)
    raise ArtifactError(f"{path} kept changing while it was read ({_ATTEMPTS} tries; the last: {last}); something "
                        "saves over it continually (or a save was killed, leaving its .tmp-/.old- directory beside "
                        "it): load it again once that stops")
