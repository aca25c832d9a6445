"""A crash-safe versioned folder: the mechanics under :class:`~napari_sparse3d.io.project.Project`.

Every save writes a *new* version (an array folder or a checkpoint file) beside
the current one, flushes it to disk, and then replaces the manifest in one
``os.replace``; only after that are the old versions deleted.  A process killed
at any instant therefore leaves a manifest that names complete data.  A failed
write raises :class:`ProjectWriteError` and leaves the previous state.

Deletion is the dangerous part of a store whose manifest may come from someone
else: only names of the store's own pattern, inside the folder, reached through
no symbolic link, are ever removed (see :mod:`napari_sparse3d.io.manifest`).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from napari_sparse3d.io.arrays import chunks_for
from napari_sparse3d.io.files import LockedError, WriterLock, fsync_tree, write_json
from napari_sparse3d.io.manifest import (
    ARRAY_KINDS,
    ARRAY_NAME,
    CHECKPOINT_FILE,
    MANIFEST,
    no_links,
    safe_version,
)

__all__ = ["ProjectLockedError", "ProjectWriteError", "VersionedStore", "package_versions", "take_writer_lock"]


class ProjectWriteError(OSError):
    """A project could not be written; its previous state is intact."""


class ProjectLockedError(LockedError):
    """The project is open for writing elsewhere (another process, or another viewer)."""


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {}
    for dist in ("napari-sparse3d", "torch", "numpy", "zarr", "napari"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return versions


def take_writer_lock(path: Path) -> WriterLock:
    try:
        return WriterLock(path)
    except LockedError as exc:
        raise ProjectLockedError(f"project {exc}") from None
    except OSError as exc:
        reason = exc.strerror or exc
        raise ProjectWriteError(exc.errno, f"could not lock the project {str(path)!r} for writing: {reason}") from exc


_Store = TypeVar("_Store", bound="VersionedStore")


class VersionedStore:
    """A folder whose manifest names the current version of each kind; one writer at a time."""

    def __init__(self, path: Path, manifest: dict[str, Any], *, writer_lock: WriterLock | None = None) -> None:
        self.path = path
        self.manifest = manifest
        self._writer_lock = writer_lock
        # the GUI saves annotations on its thread and checkpoints on the training thread
        self.lock = threading.RLock()

    @property
    def writable(self) -> bool:
        return self._writer_lock is not None and self._writer_lock.held

    def close(self) -> None:
        """Release the writer lock (a read-only project has none); the object then reads only."""
        with self.lock:
            if self._writer_lock is not None:
                self._writer_lock.release()
                self._writer_lock = None

    def __enter__(self: _Store) -> _Store:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- writing ----------------------------------------------------------------------
    def _check_writable(self, what: str) -> None:
        if not self.writable:
            raise ProjectWriteError(
                0,
                f"could not save the {what}: the project {str(self.path)!r} is open read-only"
                " (Project.open(..., writable=True))",
            )

    def _commit(self, changes: Mapping[str, Any], new: Mapping[str, str] = {}) -> None:
        """Replace the manifest with ``changes`` applied; ``new`` names the versions just written."""
        try:
            on_disk = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise ProjectWriteError(0, f"the manifest of {str(self.path)!r} is unreadable ({exc})") from exc
        if not isinstance(on_disk, dict) or on_disk.get("revision") != self.manifest.get("revision"):
            raise ProjectWriteError(
                0,
                f"the project {str(self.path)!r} was changed on disk by another writer (revision"
                f" {on_disk.get('revision') if isinstance(on_disk, dict) else '?'}, expected {self.manifest.get('revision')});"
                " reopen it",
            )
        manifest = json.loads(json.dumps(self.manifest))
        manifest.update({k: v for k, v in changes.items() if k != "current"})
        manifest["current"].update(new)
        manifest["versions"] = package_versions()
        manifest["saved"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        manifest["revision"] = int(manifest.get("revision") or 0) + 1
        old = {k: self.manifest["current"].get(k) for k in new}
        for name in new.values():  # durable before named
            fsync_tree(self.path / name)
        write_json(self.path / MANIFEST, manifest)
        self.manifest = manifest
        for name in old.values():
            if name and name not in manifest["current"].values():
                self._remove(name)

    def _remove(self, name: str) -> None:
        """Delete a version of this project: only a name of its own pattern, inside it, through no link."""
        if not safe_version(self.path, name) and not self._leftover(name):
            return
        target = self.path / name
        try:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        except OSError:
            pass  # left for the next writer's garbage collection

    def _leftover(self, name: str) -> bool:
        """A partial checkpoint file of a killed save (``checkpoints/latest-000012.pt.<tag>.tmp``)."""
        folder, _, file = name.partition("/")
        return (
            folder == "checkpoints"
            and bool(CHECKPOINT_FILE.match(file))
            and no_links(self.path, name)
            and (self.path / name).resolve().parent == (self.path / "checkpoints").resolve()
        )

    def _collect_garbage(self) -> None:
        """Delete versions no manifest names (left by a kill between write and commit); writers only."""
        if not self.writable:
            return
        current = set(self.manifest["current"].values())
        for entry in self.path.iterdir():
            if entry.name not in current and ARRAY_NAME.match(entry.name) and not entry.is_symlink():
                self._remove(entry.name)
        folder = self.path / "checkpoints"
        if folder.is_dir() and not folder.is_symlink():
            for entry in folder.iterdir():
                name = f"checkpoints/{entry.name}"
                if name not in current and CHECKPOINT_FILE.match(entry.name) and not entry.is_symlink():
                    self._remove(name)

    def _next(self, kind: str) -> str:
        while True:
            self.manifest["counter"] = int(self.manifest.get("counter", 0)) + 1
            number = f"{self.manifest['counter']:06d}"
            names = [f"{kind}-{number}"] if kind in ARRAY_KINDS else [f"checkpoints/{w}-{number}.pt" for w in ("latest", "best")]
            if not any((self.path / n).exists() or (self.path / n).is_symlink() for n in names):
                return f"{kind}-{number}"

    def _write_array(self, kind: str, data: np.ndarray, what: str) -> str:
        import zarr

        name = self._next(kind)
        try:
            array = zarr.create_array(
                str(self.path / name), shape=data.shape, dtype=data.dtype, chunks=chunks_for(data.shape), fill_value=0
            )
            array[...] = data
        except OSError as exc:
            raise self._failed(exc, what, [name]) from exc
        return name

    def _failed(self, exc: OSError, what: str, written: Sequence[str]) -> ProjectWriteError:
        """Remove what a failed save wrote; the error to raise, naming what was not saved."""
        for name in written:
            self._remove(name)
        return ProjectWriteError(
            exc.errno, f"could not save the {what} to {str(self.path)!r}: {exc.strerror or exc}; the previous state is kept"
        )

    def _guarded_commit(self, changes: Mapping[str, Any], new: Mapping[str, str], what: str) -> None:
        try:
            self._commit(changes, new)
        except OSError as exc:
            raise self._failed(exc, what, list(new.values())) from exc
