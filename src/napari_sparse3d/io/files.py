"""Writing files so that nothing is lost: durable writes, checked output paths, writer locks.

Three rules, used by the project store, checkpoints and every output path:

* **Durable before named.** Data is flushed to disk (files, then their folders)
  before anything that names it (a manifest, a final file name) is written.
* **Written aside, then renamed.** An output appears under its final name only
  when complete; an existing target is replaced only when the caller asked for it
  and only when it is of the kind being written (never a folder of other things,
  never one of the inputs).
* **One writer per project.** An exclusive OS lock (``flock``; released by the
  kernel when its process dies, so a crashed writer never leaves a stale lock)
  plus a note of who holds it, for the error message.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "LockedError",
    "WriterLock",
    "aside_path",
    "check_output_path",
    "fsync_dir",
    "fsync_tree",
    "is_within",
    "is_zarr_array",
    "replace_with",
    "same_kind",
    "write_aside",
]


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (new names, renames) to disk, where the OS allows it."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return  # Windows cannot open folders; NTFS journals its metadata
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on folders
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush a file, or every file and folder under a folder (not following links), to disk."""
    root = Path(path)
    if root.is_symlink():
        return
    if root.is_file():
        _fsync_file(root)
        fsync_dir(root.parent)
        return
    for folder, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            p = Path(folder) / name
            if not p.is_symlink():
                _fsync_file(p)
        fsync_dir(folder)
    fsync_dir(root.parent)


def aside_path(path: str | os.PathLike, tag: str = "partial") -> Path:
    """A unique hidden sibling of ``path`` to write into before renaming."""
    p = Path(path)
    return p.with_name(f".{p.name}.{tag}-{uuid.uuid4().hex[:12]}")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


def replace_with(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the finished ``source`` (a sibling written aside) at ``target``, flushed to disk.

    A file replaces a file atomically; a folder replaces an old one by two renames,
    the old one deleted only after the new one is in place.
    """
    source, target = Path(source), Path(target)
    fsync_tree(source)
    if source.is_dir() and (target.exists() or target.is_symlink()):
        old = aside_path(target, "old")
        os.replace(target, old)
        os.replace(source, target)
        fsync_dir(target.parent)
        _remove(old)
    else:
        os.replace(source, target)
        fsync_dir(target.parent)


@contextmanager
def write_aside(path: str | os.PathLike) -> Iterator[Path]:
    """``with write_aside(final) as tmp:`` write ``tmp``; on success it becomes ``final`` (durably)."""
    final = Path(path)
    tmp = aside_path(final)
    try:
        yield tmp
        replace_with(tmp, final)
    except BaseException:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)
        raise


def is_within(root: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether ``path`` (links resolved) lies inside ``root`` (links resolved)."""
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
        return True
    except ValueError:
        return False


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def is_zarr_array(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a zarr (v2 or v3) array folder."""
    p = Path(path)
    try:
        if (p / ".zarray").is_file():
            return True
        meta = p / "zarr.json"
        return meta.is_file() and json.loads(meta.read_text()).get("node_type") == "array"
    except (OSError, ValueError, AttributeError):
        return False


def same_kind(path: Path) -> bool:
    """What an output named ``path`` may replace: a file of its suffix, or (``.zarr``) an earlier prediction.

    An earlier prediction is a zarr array or an OME-Zarr label image of ours.
    """
    if path.suffix.lower() == ".zarr":
        from napari_sparse3d.io.ome import is_label_image

        return is_zarr_array(path) or is_label_image(path)
    return path.is_file() and not path.is_symlink()


def check_output_path(
    path: str | os.PathLike,
    *,
    name: str,
    overwrite: bool,
    inputs: Iterable[Any] = (),
    is_replaceable: Callable[[Path], bool] | None = None,
    what: str = "output",
) -> Path:
    """Refuse an output path that would destroy something the user did not ask to replace.

    ``path`` may not exist yet, or be an empty folder; an existing target is replaced
    only with ``overwrite`` and only when ``is_replaceable(path)`` (default:
    :func:`same_kind`) says it is the kind of thing being written.  It is never one of
    ``inputs`` nor inside or around one.
    """
    p = Path(path)
    for source in inputs:
        if not isinstance(source, (str, os.PathLike)):
            continue
        s = Path(source)
        if _same(p, s) or (s.exists() and (is_within(s, p) or is_within(p, s))):
            raise ValueError(f"{name}: {str(p)!r} is (or contains, or lies inside) the input {str(s)!r}; choose another path")
    _check_writable_folder(p, name)
    if not (p.exists() or p.is_symlink()):
        return p
    if p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
        return p
    if not overwrite:
        raise ValueError(
            f"{name}: {str(p)!r} already exists; refusing to replace it (pass overwrite=True, or --overwrite on the"
            f" command line, to replace an earlier {what})"
        )
    if p.is_symlink() or not (is_replaceable or same_kind)(p):
        raise ValueError(
            f"{name}: {str(p)!r} exists and is not an earlier {what}; refusing to replace it even with overwrite"
        )
    return p


def _check_writable_folder(path: Path, name: str) -> None:
    """Refuse, before any work, a path whose folder (or the first of its folders that exists) cannot be written."""
    folder = path.absolute().parent
    while not folder.exists() and folder != folder.parent:  # folders the writer will create
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{name}: cannot write {str(path)!r}: {str(folder)!r} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{name}: cannot write {str(path)!r}: the folder {str(folder)!r} is not writable")


# -- one writer at a time -----------------------------------------------------------------
class LockedError(BlockingIOError):
    """Another writer holds the lock (an ``OSError``: the resource is busy)."""


_HELD: set[str] = set()  # locks held by this process (flock may not exclude a process from itself on NFS)
_HELD_LOCK = threading.Lock()


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _describe_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"process {info.get('pid')} on {info.get('host')} since {info.get('since')}"
    except (OSError, ValueError, AttributeError):
        return "another process"


class WriterLock:
    """An exclusive lock on a folder, held until :meth:`release` (or the process ends)."""

    def __init__(self, folder: str | os.PathLike, filename: str = ".lock") -> None:
        self.path = Path(folder) / filename
        self.key = str(self.path.resolve())
        self._fd: int | None = None
        with _HELD_LOCK:
            if self.key in _HELD:
                raise LockedError(f"{str(Path(folder))!r} is already open for writing in this process")
            _HELD.add(self.key)
        try:
            if self.path.is_symlink():
                raise LockedError(f"{str(self.path)!r} is a symbolic link; refusing to use it as a lock")
            fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                os.close(fd)
                raise LockedError(
                    f"{str(Path(folder))!r} is open for writing by {_describe_holder(self.path)}; close it there"
                    " first (or open it read-only)"
                )
            self._fd = fd
            note = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")})
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, note.encode())
        except BaseException:
            with _HELD_LOCK:
                _HELD.discard(self.key)
            raise

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # closing the descriptor releases the flock
        with _HELD_LOCK:
            _HELD.discard(self.key)

    def __del__(self) -> None:  # pragma: no cover - depends on the garbage collector
        try:
            self.release()
        except Exception:
            pass


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Replace the JSON file ``path`` atomically and durably (see :func:`write_aside`)."""
    with write_aside(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
