"""A project: everything about one volume's segmentation in one zarr (v3) directory.

Layout of ``name.zarr/``::

    zarr.json                    the zarr group (attributes: format, format version)
    sparse3d.json                the manifest: which versions below are current, the
                                 image reference and hash, the fully annotated slices,
                                 the configuration, the history, the package versions
    image/                       the image (unless the project references a file)
    annotations-000007/          labels, 0 = not annotated (one array per saved version)
    prediction-000003/           the latest prediction
    probabilities-000003/        its class probabilities (float16), optional
    checkpoints/latest-000012.pt the latest model; checkpoints/best-000010.pt the best one

Every save writes a *new* version beside the current one and then replaces the
manifest in one ``os.replace``; only after that are the old versions deleted.
A process killed at any instant therefore leaves a manifest that names complete
data: the state of the last save that returned.  A failed write (full or
read-only disk) raises :class:`ProjectWriteError` and leaves the previous state.
New versions are flushed to disk (files and folders) before the manifest names them.

A project may come from someone else, so it is untrusted input (see :mod:`.manifest`): the manifest is
checked against a schema on open (types, ranges, version names of the expected
pattern that resolve inside the project folder, no symbolic links), and only
paths of the project's own naming pattern inside it are ever deleted.

One writer at a time: ``Project.open(path, writable=True)`` (and ``create``) take
an exclusive lock (see :class:`napari_sparse3d.files.WriterLock`); a second writer
gets :class:`ProjectLockedError`.  Read-only opens take no lock and never delete
anything.  Each commit also checks that the manifest on disk is still the one it
read, so a writer that bypassed the lock cannot make another lose a save.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .data import _chunks
from .files import LockedError, WriterLock, check_output_path, fsync_dir, fsync_tree, replace_with
from .manifest import (
    _ARRAY_NAME,
    _CHECKPOINT_FILE,
    ARRAY_KINDS,
    MANIFEST,
    PROJECT_FORMAT,
    PROJECT_FORMAT_VERSION,
    no_links,
    read_manifest,
    safe_version,
    validate_manifest,
)

__all__ = [
    "Project",
    "ProjectWriteError",
    "ProjectLockedError",
    "CheckpointSaver",
    "is_project",
    "image_hash",
    "validate_manifest",
    "PROJECT_FORMAT_VERSION",
]



class ProjectWriteError(OSError):
    """A project could not be written; its previous state is intact."""


class ProjectLockedError(LockedError):
    """The project is open for writing elsewhere (another process, or another viewer)."""


def is_project(path: Any) -> bool:
    """Whether ``path`` is a project directory."""
    try:
        return isinstance(path, (str, os.PathLike)) and (Path(path) / MANIFEST).is_file()
    except OSError:
        return False


def image_hash(array: Any, *, block_voxels: int = 1 << 24) -> str:
    """SHA-256 of an array's shape, dtype and values, read slab by slab (bounded memory)."""
    h = hashlib.sha256()
    h.update(json.dumps([list(map(int, array.shape)), str(np.dtype(array.dtype))]).encode())
    if len(array.shape) == 0:
        h.update(np.ascontiguousarray(np.asarray(array)).tobytes())
        return h.hexdigest()
    per_slab = max(1, int(np.prod(array.shape[1:], dtype=np.int64)))
    step = max(1, block_voxels // per_slab)
    for start in range(0, int(array.shape[0]), step):
        h.update(np.ascontiguousarray(np.asarray(array[start : start + step])).tobytes())
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {}
    for dist in ("napari-sparse3d", "torch", "numpy", "zarr", "napari"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return versions


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _take_lock(path: Path) -> WriterLock:
    try:
        return WriterLock(path)
    except LockedError as exc:
        raise ProjectLockedError(f"project {exc}") from None
    except OSError as exc:
        raise ProjectWriteError(exc.errno, f"could not lock the project {str(path)!r} for writing: {exc.strerror or exc}") from exc


class Project:
    """Open with :meth:`Project.open`, make with :meth:`Project.create`; ``close()`` (or ``with``) when done."""

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

    def __enter__(self) -> "Project":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- opening ----------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        image: Any,
        *,
        labels: Any = None,
        annotated_slices: Mapping[int, Sequence[int]] | None = None,
        spacing: Sequence[float] | None = None,
        config: Any = None,
        image_path: str | os.PathLike | None = None,
        overwrite: bool = False,
    ) -> "Project":
        """A new project for ``image`` (copied in, or referenced by ``image_path`` with its hash), open for writing.

        ``path`` must not exist or be an empty folder; with ``overwrite`` an earlier
        *project* there is replaced (never any other folder, nor the image's file), and
        only once the new one is complete.
        """
        from .data import as_volume, check_spacing

        path = Path(path)
        check_output_path(
            path,
            name="path",
            overwrite=overwrite,
            inputs=[image_path] if image_path is not None else [],
            is_replaceable=is_project,
            what="napari-sparse3d project",
        )
        volume = as_volume(image)
        spacing = check_spacing(spacing)
        shape = volume.spatial_shape
        replacing = path.exists() and any(path.iterdir())
        old_lock = _take_lock(path) if replacing else None  # do not replace a project someone writes into
        target = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:12]}") if replacing else path
        try:
            import zarr

            group = zarr.open_group(str(target), mode="w", zarr_format=3)
            group.attrs.update({"format": PROJECT_FORMAT, "format_version": PROJECT_FORMAT_VERSION})
            array = np.asarray(image) if image_path is None else image
            manifest: dict[str, Any] = {
                "format": PROJECT_FORMAT,
                "format_version": PROJECT_FORMAT_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "versions": _versions(),
                "shape": list(shape),
                "image": {
                    "path": None if image_path is None else str(Path(image_path).resolve()),
                    "hash": image_hash(array),
                    "shape": [int(s) for s in array.shape],
                    "dtype": str(np.dtype(array.dtype)),
                },
                "spacing": None if spacing is None else list(spacing),
                "config": None,
                "annotated_slices": {},
                "current": {},
                "counter": 0,
                "revision": 0,
                "history": [],
            }
            if image_path is None:
                stored = group.create_array("image", shape=array.shape, dtype=array.dtype, chunks=_chunks(array.shape))
                stored[...] = array
            fsync_tree(target)
            _write_json_atomic(target / MANIFEST, manifest)
            if replacing:
                old_lock.release()  # type: ignore[union-attr]
                replace_with(target, path)
        except OSError as exc:
            if replacing and target.exists():
                shutil.rmtree(target, ignore_errors=True)
            raise ProjectWriteError(exc.errno, f"could not create the project {str(path)!r}: {exc.strerror or exc}") from exc
        finally:
            if old_lock is not None:
                old_lock.release()
        project = cls(path, manifest, writer_lock=_take_lock(path))
        if config is not None:
            project.save_config(config)
        if labels is not None:
            project.save_annotations(labels, annotated_slices or {})
        return project

    @classmethod
    def open(cls, path: str | os.PathLike, *, writable: bool = False, check_image: bool = True) -> "Project":
        """Open a project, read-only unless ``writable``.

        A writable project holds the project's writer lock until :meth:`close` and
        collects the leftovers of killed saves; with ``check_image`` a referenced
        image must still have its saved hash.
        """
        path = Path(path)
        manifest = read_manifest(path)
        lock = _take_lock(path) if writable else None
        try:
            if lock is not None:
                manifest = read_manifest(path)  # what the previous writer left, now that it has gone
            project = cls(path, manifest, writer_lock=lock)
            if writable:
                project._collect_garbage()
            if check_image:
                project.image()
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return project

    # -- reading ----------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["shape"])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float] | None:
        s = self.manifest.get("spacing")
        return None if s is None else tuple(s)  # type: ignore[return-value]

    @property
    def history(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("history") or [])

    @property
    def annotated_slices(self) -> dict[int, list[int]]:
        return {int(a): [int(i) for i in v] for a, v in (self.manifest.get("annotated_slices") or {}).items()}

    def image(self) -> Any:
        """The image: the stored copy (a lazy zarr array) or the referenced file, checked against its hash."""
        ref = self.manifest["image"]
        if ref.get("path") is None:
            import zarr

            array = zarr.open_array(str(self.path / "image"), mode="r")
        else:
            from .data import load_array

            source = ref["path"]
            if not Path(source).exists():
                raise ValueError(f"image: the project's image {source!r} is missing; move it back or pass image=")
            array = load_array(source, name="image")
            if image_hash(array) != ref["hash"]:
                raise ValueError(
                    f"image: {source!r} changed since the project was saved (content hash differs); the annotations"
                    " may no longer fit it. Restore the original file or make a new project"
                )
        if list(array.shape) != ref["shape"]:
            raise ValueError(f"{str(self.path / MANIFEST)}: the image has shape {tuple(array.shape)}, the manifest says {tuple(ref['shape'])}")
        return array

    def _array(self, kind: str) -> Any:
        name = self.manifest["current"].get(kind)
        if name is None:
            return None
        if not safe_version(self.path, name):  # checked on open; the folder may have changed since
            raise ValueError(f"{str(self.path / MANIFEST)}: version {name!r} is not inside the project folder")
        import zarr

        try:
            array = zarr.open_array(str(self.path / name), mode="r")
        except Exception as exc:  # a missing or foreign array
            raise ValueError(f"{str(self.path)!r}: the {kind} version {name!r} is missing or unreadable ({exc})") from exc
        expected = self.shape if kind != "probabilities" else None
        if expected is not None and tuple(array.shape) != expected:
            raise ValueError(f"{str(self.path)!r}: the {kind} version {name!r} has shape {tuple(array.shape)}, not {expected}")
        return array

    def annotations(self) -> tuple[np.ndarray, dict[int, list[int]]]:
        """``(labels, annotated_slices)`` as last saved (zeros and {} when nothing was saved)."""
        array = self._array("annotations")
        labels = np.zeros(self.shape, np.uint8) if array is None else np.asarray(array[...])
        return labels, self.annotated_slices

    def prediction(self) -> np.ndarray | None:
        array = self._array("prediction")
        return None if array is None else np.asarray(array[...])

    def probabilities(self) -> np.ndarray | None:
        array = self._array("probabilities")
        return None if array is None else np.asarray(array[...], dtype=np.float32)

    def config(self) -> Any:
        from .config import Config

        text = self.manifest.get("config")
        if text is None:
            return None
        try:
            return Config.from_json(text)
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"{str(self.path / MANIFEST)}: field 'config' is not a valid configuration ({exc})") from exc

    def checkpoint(self, which: str = "latest") -> Path | None:
        """Path of the ``"latest"`` or ``"best"`` checkpoint, or None."""
        name = self.manifest["current"].get(f"checkpoint_{which}")
        if name is None:
            return None
        if not safe_version(self.path, name):
            raise ValueError(f"{str(self.path / MANIFEST)}: checkpoint {name!r} is not inside the project folder")
        return self.path / name

    # -- writing ----------------------------------------------------------------------
    def _check_writable(self, what: str) -> None:
        if not self.writable:
            raise ProjectWriteError(
                0, f"could not save the {what}: the project {str(self.path)!r} is open read-only (Project.open(..., writable=True))"
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
        manifest["versions"] = _versions()
        manifest["saved"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        manifest["revision"] = int(manifest.get("revision") or 0) + 1
        old = {k: self.manifest["current"].get(k) for k in new}
        for name in new.values():  # durable before named
            fsync_tree(self.path / name)
        _write_json_atomic(self.path / MANIFEST, manifest)
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
            and bool(_CHECKPOINT_FILE.match(file))
            and no_links(self.path, name)
            and (self.path / name).resolve().parent == (self.path / "checkpoints").resolve()
        )

    def _collect_garbage(self) -> None:
        """Delete versions no manifest names (left by a kill between write and commit); writers only."""
        if not self.writable:
            return
        current = set(self.manifest["current"].values())
        for entry in self.path.iterdir():
            if entry.name not in current and _ARRAY_NAME.match(entry.name) and not entry.is_symlink():
                self._remove(entry.name)
        folder = self.path / "checkpoints"
        if folder.is_dir() and not folder.is_symlink():
            for entry in folder.iterdir():
                name = f"checkpoints/{entry.name}"
                if name not in current and _CHECKPOINT_FILE.match(entry.name) and not entry.is_symlink():
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
                str(self.path / name), shape=data.shape, dtype=data.dtype, chunks=_chunks(data.shape), fill_value=0
            )
            array[...] = data
        except OSError as exc:
            raise self._failed(exc, what, [name]) from exc
        return name

    def save_annotations(self, labels: Any, annotated_slices: Mapping[int, Sequence[int]]) -> None:
        """Save the labels and the register of fully annotated slices together (one commit)."""
        with self.lock:
            self._check_writable("annotations")
            from .data import _integer_labels, check_slices

            # work in progress may hold a single class: only what would corrupt the project is refused
            if tuple(np.shape(labels)) != self.shape:
                raise ValueError(f"labels must have the project's shape {self.shape}, got {tuple(np.shape(labels))}")
            labels = _integer_labels(labels)
            slices = check_slices(annotated_slices or {}, self.shape)
            slices = {a: v for a, v in slices.items() if v}
            name = self._write_array("annotations", labels, "annotations")
            self._guarded_commit({"annotated_slices": {str(a): v for a, v in slices.items()}}, {"annotations": name}, "annotations")

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

    def save_prediction(self, labels: np.ndarray, probabilities: np.ndarray | None = None) -> None:
        with self.lock:
            self._check_writable("prediction")
            labels = np.asarray(labels)
            if labels.shape != self.shape:
                raise ValueError(f"prediction must have the project's shape {self.shape}, got {labels.shape}")
            new = {"prediction": self._write_array("prediction", labels, "prediction")}
            if probabilities is not None:
                new["probabilities"] = self._write_array("probabilities", np.asarray(probabilities, np.float16), "probabilities")
            self._guarded_commit({}, new, "prediction")

    def save_config(self, config: Any) -> None:
        with self.lock:
            self._check_writable("configuration")
            from .api import resolve_config

            self._guarded_commit({"config": resolve_config(config).to_json()}, {}, "configuration")

    def save_checkpoint(self, model: Any, *, best: bool = False, extra: Mapping[str, Any] | None = None) -> Path:
        """Save ``model`` as the latest checkpoint (and as the best one with ``best``); history follows it."""
        with self.lock:
            self._check_writable("model")
            from .checkpoint import save_checkpoint, thin_history

            info = model.sparse3d
            folder = self.path / "checkpoints"
            if folder.is_symlink():
                raise ProjectWriteError(0, f"could not save the model: {str(folder)!r} is a symbolic link")
            name = f"checkpoints/latest-{self._next('c')[2:]}.pt"
            new = {"checkpoint_latest": name}
            try:
                save_checkpoint(model, self.path / name)
                if best:
                    best_name = name.replace("latest-", "best-")
                    shutil.copyfile(self.path / name, self.path / best_name)
                    new["checkpoint_best"] = best_name
            except OSError as exc:
                raise self._failed(exc, "model", list(new.values())) from exc
            changes = {"history": thin_history(info.history), "config": info.config.to_json(), **(extra or {})}
            self._guarded_commit(changes, new, "model")
            return self.path / name


class CheckpointSaver:
    """Writes the model into a project every ``every`` seconds of training, and at the end.

    The "best" checkpoint is the one with the lowest mean loss over its last 50 steps.
    """

    def __init__(self, project: Any, every: float) -> None:
        self.project, self.every, self.clock = project, every, time.perf_counter
        self.last = self.clock()

    def _save(self, model: Any) -> None:
        history = model.sparse3d.history
        recent = [h["loss"] for h in history[-50:]]
        loss = float(np.mean(recent)) if recent else float("inf")
        best = self.project.manifest.get("best_loss")
        is_best = best is None or loss <= best
        self.project.save_checkpoint(model, best=is_best, extra={"best_loss": loss} if is_best else None)
        self.last = self.clock()

    def step(self, model: Any) -> None:
        if self.project is not None and self.clock() - self.last >= self.every:
            self._save(model)

    def final(self, model: Any) -> None:
        if self.project is not None:
            self._save(model)
