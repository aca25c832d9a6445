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

import math
import os
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_sparse3d.config import Config, resolve_config
from napari_sparse3d.engine.volume import TrainingInputs
from napari_sparse3d.io.arrays import chunks_for, image_hash
from napari_sparse3d.io.files import check_output_path, fsync_tree, replace_with, write_json
from napari_sparse3d.io.manifest import (
    MANIFEST,
    PROJECT_FORMAT,
    PROJECT_FORMAT_VERSION,
    read_manifest,
    safe_version,
    validate_manifest,
)
from napari_sparse3d.io.store import ProjectLockedError, ProjectWriteError, VersionedStore, package_versions, take_writer_lock

__all__ = [
    "PROJECT_FORMAT_VERSION",
    "Project",
    "ProjectLockedError",
    "ProjectWriteError",
    "image_hash",
    "is_project",
    "validate_manifest",
]



def is_project(path: Any) -> bool:
    """Whether ``path`` is a project directory."""
    try:
        return isinstance(path, (str, os.PathLike)) and (Path(path) / MANIFEST).is_file()
    except OSError:
        return False


class Project(VersionedStore):
    """Open with :meth:`Project.open`, make with :meth:`Project.create`; ``close()`` (or ``with``) when done."""

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
    ) -> Project:
        """A new project for ``image`` (copied in, or referenced by ``image_path`` with its hash), open for writing.

        ``path`` must not exist or be an empty folder; with ``overwrite`` an earlier
        *project* there is replaced (never any other folder, nor the image's file), and
        only once the new one is complete.
        """
        from napari_sparse3d.engine.annotations import stored_annotations
        from napari_sparse3d.engine.volume import as_volume, check_spacing

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
        config = None if config is None else resolve_config(config)  # refused before anything is written
        if labels is not None or annotated_slices:
            labels, annotated_slices = stored_annotations(labels, annotated_slices, shape)
        replacing = path.exists() and any(path.iterdir())
        old_lock = take_writer_lock(path) if replacing else None  # do not replace a project someone writes into
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
                "versions": package_versions(),
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
                stored = group.create_array("image", shape=array.shape, dtype=array.dtype, chunks=chunks_for(array.shape))
                stored[...] = array
            fsync_tree(target)
            write_json(target / MANIFEST, manifest)
            if old_lock is not None:
                old_lock.release()
                replace_with(target, path)
        except OSError as exc:
            if replacing and target.exists():
                shutil.rmtree(target, ignore_errors=True)
            raise ProjectWriteError(exc.errno, f"could not create the project {str(path)!r}: {exc.strerror or exc}") from exc
        finally:
            if old_lock is not None:
                old_lock.release()
        project = cls(path, manifest, writer_lock=take_writer_lock(path))
        if config is not None:
            project.save_config(config)
        if labels is not None:
            project.save_annotations(labels, annotated_slices or {})
        return project

    @classmethod
    def open(cls, path: str | os.PathLike, *, writable: bool = False, check_image: bool = True) -> Project:
        """Open a project, read-only unless ``writable``.

        A writable project holds the project's writer lock until :meth:`close` and
        collects the leftovers of killed saves; with ``check_image`` a referenced
        image must still have its saved hash.
        """
        path = Path(path)
        manifest = read_manifest(path)
        lock = take_writer_lock(path) if writable else None
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
        """The image's spatial shape (z, y, x)."""
        z, y, x = self.manifest["shape"]
        return (int(z), int(y), int(x))

    @property
    def spacing(self) -> tuple[float, float, float] | None:
        """The voxel size (z, y, x), or None (isotropic)."""
        s = self.manifest.get("spacing")
        return None if s is None else (float(s[0]), float(s[1]), float(s[2]))

    @property
    def history(self) -> list[dict[str, Any]]:
        """One entry per training step of the latest checkpoint (thinned; see ``engine.trained.thin_history``)."""
        return list(self.manifest.get("history") or [])

    @property
    def annotated_slices(self) -> dict[int, list[int]]:
        """The fully annotated slices, ``{axis: [indices]}``, as last saved."""
        return {int(a): [int(i) for i in v] for a, v in (self.manifest.get("annotated_slices") or {}).items()}

    def image(self, *, verify: bool = False) -> Any:
        """The image (the stored copy, lazy, or the referenced file), checked against its hash (a copy with ``verify``)."""
        ref = self.manifest["image"]
        if ref.get("path") is None:
            import zarr

            array, source = zarr.open_array(str(self.path / "image"), mode="r"), str(self.path / "image")
        else:
            from napari_sparse3d.io.arrays import load_array

            source = ref["path"]
            if not Path(source).exists():
                raise ValueError(f"image: the project's image {source!r} is missing; move it back or pass image=")
            array = load_array(source, name="image")
        stored_as = ref["dtype"] if ref.get("path") is None else None  # the dtype it was hashed as
        if (verify or ref.get("path") is not None) and image_hash(array, dtype=stored_as) != ref["hash"]:
            raise ValueError(
                f"image: {source!r} changed since the project was saved (content hash differs); the annotations"
                " may no longer fit it. Restore the original or make a new project"
            )
        if list(array.shape) != ref["shape"]:
            raise ValueError(
                f"{self.path / MANIFEST!s}: the image has shape {tuple(array.shape)}, the manifest says {tuple(ref['shape'])}"
            )
        return array

    def _array(self, kind: str) -> Any:
        name = self.manifest["current"].get(kind)
        if name is None:
            return None
        if not safe_version(self.path, name):  # checked on open; the folder may have changed since
            raise ValueError(f"{self.path / MANIFEST!s}: version {name!r} is not inside the project folder")
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
        """The latest prediction (labels), or None."""
        array = self._array("prediction")
        return None if array is None else np.asarray(array[...])

    def probabilities(self) -> np.ndarray | None:
        """The latest prediction's class probabilities ``(K, Z, Y, X)`` as float32, or None."""
        array = self._array("probabilities")
        return None if array is None else np.asarray(array[...], dtype=np.float32)

    def config(self) -> Config | None:
        """The configuration of the latest training, or None before the first."""
        text = self.manifest.get("config")
        if text is None:
            return None
        try:
            return Config.from_json(text)
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"{self.path / MANIFEST!s}: field 'config' is not a valid configuration ({exc})") from exc

    def checkpoint(self, which: str = "latest") -> Path | None:
        """Path of the ``"latest"`` or ``"best"`` checkpoint, or None."""
        name = self.manifest["current"].get(f"checkpoint_{which}")
        if name is None:
            return None
        if not safe_version(self.path, name):
            raise ValueError(f"{self.path / MANIFEST!s}: checkpoint {name!r} is not inside the project folder")
        return self.path / name

    @property
    def best(self) -> tuple[str, float] | None:
        """``(criterion, value)`` of the best checkpoint, ``("val_dice", Dice)`` or ``("loss", mean loss)``, or None.

        See :class:`~napari_sparse3d.engine.checkpointing.CheckpointSaver`; manifests written before validation
        hold only ``best_loss``.  Untrusted like the rest of the manifest: anything malformed means none.
        """
        metric = self.manifest.get("best_metric", "loss")
        value = self.manifest.get("best_value" if "best_metric" in self.manifest else "best_loss")
        if metric not in ("val_dice", "loss") or isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return (metric, float(value)) if math.isfinite(value) else None

    def training_inputs(
        self,
        *,
        labels: Any = None,
        annotated_slices: Mapping[int, Sequence[int]] | None = None,
        spacing: Sequence[float] | None = None,
        config: Any = None,
        init: Any = None,
    ) -> TrainingInputs:
        """What a training run on this project starts from; an argument given replaces the project's own.

        Without ``labels`` the saved annotations and their annotated slices are used
        (``annotated_slices`` may still replace the latter); given labels come with
        the annotated slices given, if any.  ``init`` defaults to the latest
        checkpoint (a path): training resumes where it stopped.
        """
        if labels is None:
            labels, saved = self.annotations()
            annotated_slices = saved if annotated_slices is None else annotated_slices
        return TrainingInputs(
            image=self.image(verify=True),
            labels=labels,
            annotated_slices=annotated_slices,
            spacing=self.spacing if spacing is None else spacing,
            config=self.config() if config is None else config,
            init=self.checkpoint("latest") if init is None else init,
        )

    # -- writing ----------------------------------------------------------------------
    def save_annotations(self, labels: Any, annotated_slices: Mapping[int, Sequence[int]]) -> None:
        """Save the labels and the register of fully annotated slices together (one commit)."""
        with self.lock:
            self._check_writable("annotations")
            from napari_sparse3d.engine.annotations import stored_annotations

            labels, slices = stored_annotations(labels, annotated_slices, self.shape)
            name = self._write_array("annotations", labels, "annotations")
            changes = {"annotated_slices": {str(a): v for a, v in slices.items()}}
            self._guarded_commit(changes, {"annotations": name}, "annotations")

    def save_prediction(self, labels: np.ndarray, probabilities: np.ndarray | None = None) -> None:
        """Save a prediction (and its class probabilities, as float16) as the current one."""
        with self.lock:
            self._check_writable("prediction")
            labels = np.asarray(labels)
            if labels.shape != self.shape:
                raise ValueError(f"prediction must have the project's shape {self.shape}, got {labels.shape}")
            new = {"prediction": self._write_array("prediction", labels, "prediction")}
            if probabilities is not None:
                from napari_sparse3d.engine.devices import as_float16  # torch: not at import (napari reads this module)

                new["probabilities"] = self._write_array("probabilities", as_float16(probabilities), "probabilities")
            self._guarded_commit({}, new, "prediction")

    def save_config(self, config: Config | str | Mapping[str, Any] | None) -> None:
        """Save the configuration the next training starts with (anything ``run(config=)`` takes)."""
        with self.lock:
            self._check_writable("configuration")
            self._guarded_commit({"config": resolve_config(config).to_json()}, {}, "configuration")

    def save_checkpoint(self, model: Any, *, best: bool = False, extra: Mapping[str, Any] | None = None) -> Path:
        """Save ``model`` as the latest checkpoint (and as the best one with ``best``); history follows it."""
        with self.lock:
            self._check_writable("model")
            from napari_sparse3d.engine.trained import thin_history
            from napari_sparse3d.io.checkpoint import save_checkpoint

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
            extra = dict(extra or {})
            if "best_metric" in extra:  # the field earlier versions read, kept coherent with the new ones
                extra["best_loss"] = extra.get("best_value") if extra["best_metric"] == "loss" else None
            changes = {"history": thin_history(info.history), "config": info.config.to_json(), **extra}
            self._guarded_commit(changes, new, "model")
            return self.path / name


