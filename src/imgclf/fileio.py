"""Atomic writes, file hashes and shared paths: shared by every module that writes or fingerprints files.

Torch-free on purpose, so ONNX-only clients (export, serving) can use it cheaply.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import secrets
import stat
from pathlib import Path


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _write_target(path: Path) -> tuple[Path, os.stat_result | None]:
    """The file a write to ``path`` replaces, and its stat (None: it does not exist yet).

    A symlink is followed to its final target; anything but a regular file there
    raises ValueError naming ``path``.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path, None
    target = path
    if stat.S_ISLNK(st.st_mode):
        target = Path(os.path.realpath(path))
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            return target, None  # a dangling link: its target is created
        if stat.S_ISLNK(st.st_mode):  # realpath gives up on a loop
            raise ValueError(f"{path}: symlink loop; cannot write through it")
    if stat.S_ISREG(st.st_mode):
        return target, st
    via = f" (a symlink to {target})" if target != path else ""
    raise ValueError(f"{path}{via} is {_kind(st.st_mode)}, not a regular file; refusing to write there")


def check_output_path(path: str | os.PathLike) -> None:
    """Raise ValueError (one line, naming the path) now if ``atomic_write_bytes(path)`` would refuse it.

    For commands to call before long work, so a bad ``--out`` fails in a second, not
    after inference: a folder, a device, FIFO or socket (directly or through a
    symlink), or a path under something that is not a folder.
    """
    path = Path(path)
    for parent in path.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise ValueError(f"{path}: {parent} is not a folder")
            break
    _write_target(path)


def _create_temp(target: Path) -> tuple[Path, int]:
    """A new empty file beside ``target``, created with mode 0666 so the umask applies
    (tempfile.mkstemp would force 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(f"{target.parent}: could not create a temporary file")


def _keep_owner_and_mode(fd: int, old: os.stat_result) -> None:
    if hasattr(os, "fchown") and (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
        try:
            os.fchown(fd, old.st_uid, old.st_gid)
        except OSError:  # only root may give a file away; the new file is then ours
            pass
    if hasattr(os, "fchmod"):
        os.fchmod(fd, stat.S_IMODE(old.st_mode))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temp file in the same folder, then rename it over ``path``: readers never see a half file.

    Only a regular file or a new path is replaced; a folder, a device (``/dev/full``),
    a FIFO or a socket raises ValueError naming the path before anything is written.
    A symlink is written through: the file it points to is replaced atomically and the
    link stays a link (a dangling link gets its target created). A replaced file keeps
    its permission bits (and its owner, where allowed); a new file gets 0666 less the
    umask like any other file the user creates (0644 under umask 022). Missing parent
    folders of ``path`` are created. As with any atomic replace, hard links to the old
    file keep the old content.
    """
    path = Path(path)
    target, old = _write_target(path)
    if target == path:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp, fd = _create_temp(target)
    try:
        with os.fdopen(fd, "wb") as f:
            if old is not None:
                _keep_owner_and_mode(f.fileno(), old)
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _digest(path: str | os.PathLike, h) -> str:
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    return _digest(path, hashlib.sha256())


def content_hash(path: str | os.PathLike) -> str:
    """Hash of the file's bytes: the same picture under another name shares its features."""
    return _digest(path, hashlib.blake2b(digest_size=20))


def content_hash_or_empty(path: str | os.PathLike) -> str:
    """:func:`content_hash`, or "" for a file that cannot be read (its decode reports it)."""
    try:
        return content_hash(path)
    except OSError:
        return ""


def default_cache_dir() -> Path:
    """Feature cache, backbone and export cache: $IMGCLF_CACHE_DIR, else the XDG cache."""
    env = os.environ.get("IMGCLF_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imgclf"


def is_within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Is ``path`` ``folder`` or below it (both resolved)?"""
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def write_csv(path: Path, rows: list[dict], fieldnames: list[str] | None = None) -> None:
    buf = io.StringIO()
    fieldnames = fieldnames or (list(rows[0]) if rows else [])
    w = csv.DictWriter(buf, fieldnames=fieldnames, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(Path(path), buf.getvalue().encode("utf-8", "surrogateescape"))  # file names keep their bytes


def csv_text(rows: list[dict], fieldnames: list[str] | None = None) -> str:
    buf = io.StringIO()
    fieldnames = fieldnames or (list(rows[0]) if rows else [])
    w = csv.DictWriter(buf, fieldnames=fieldnames, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
