"""The "best" checkpoint: the validation Dice's peak when it is measured, the lowest recent loss otherwise."""

import json

import numpy as np
import pytest

from napari_sparse3d.config import Config
from napari_sparse3d.engine.checkpointing import BEST_WINDOW, VAL_WINDOW, CheckpointSaver, best_score
from napari_sparse3d.engine.model import build_model
from napari_sparse3d.engine.preprocess import Normalization
from napari_sparse3d.engine.trained import ModelInfo
from napari_sparse3d.engine.training import TrainReport
from napari_sparse3d.io.checkpoint import load_checkpoint
from napari_sparse3d.io.manifest import MANIFEST
from napari_sparse3d.io.project import Project

EVERY = 25  # validation_every


def _model(history=None):
    config = Config.from_dict({"model": {"levels": 2, "base_features": 2}, "train": {"validation_every": EVERY}})
    model = build_model(1, 2, config.model, None)
    norm = Normalization(lower=(0.0,), upper=(1.0,), mean=(0.0,), std=(1.0,))
    model.sparse3d = ModelInfo(config, [0, 1], norm, (8, 16, 16), None, 1, list(history or []))
    return model


def _dice(iteration):
    """Peaks at iteration 150, then falls: the network overfits while the loss keeps falling."""
    return 0.9 - abs(iteration - 150) / 300


def _train(model, saver, steps, *, validate=True, save_every=75):
    for it in range(model.sparse3d.history[-1]["iteration"] + 1 if model.sparse3d.history else 1, steps + 1):
        val = _dice(it) if validate and it % EVERY == 0 else None
        model.sparse3d.history.append(TrainReport(it, 1.0 / it, 1e-3, 0.0, 0.0, 0.0, val_dice=val).to_dict())
        if it % save_every == 0:
            saver.final(model)  # one save now (what step() does every few seconds)


@pytest.fixture
def project(tmp_path):
    created = Project.create(tmp_path / "p.zarr", np.zeros((8, 16, 16), np.float32))
    yield created
    created.close()


def _best_iteration(project):
    return load_checkpoint(project.checkpoint("best")).sparse3d.history[-1]["iteration"]


def test_best_is_the_validation_peak_while_the_loss_keeps_falling(project):
    model = _model()
    _train(model, CheckpointSaver(project, every=1e9), 300)  # saves at 75, 150, 225, 300
    assert _best_iteration(project) == 150
    assert project.checkpoint("latest") != project.checkpoint("best")
    expected = float(np.mean([_dice(i) for i in (100, 125, 150)]))  # the mean of the last VAL_WINDOW
    assert VAL_WINDOW == 3
    assert project.best == ("val_dice", pytest.approx(expected))
    assert project.manifest["best_metric"] == "val_dice" and project.manifest["best_loss"] is None
    path = project.path
    project.close()
    assert Project.open(path).best == ("val_dice", pytest.approx(expected))


def test_without_validation_the_lowest_loss_is_best(project):
    model = _model()
    _train(model, CheckpointSaver(project, every=1e9), 300, validate=False)
    assert _best_iteration(project) == 300
    expected = float(np.mean([1.0 / i for i in range(301 - BEST_WINDOW, 301)]))
    assert project.best == ("loss", pytest.approx(expected))
    assert project.manifest["best_loss"] == pytest.approx(expected)  # what earlier versions read


def test_best_score_windows():
    history = [{"iteration": i, "loss": 1.0 / i, "val_dice": _dice(i) if i % EVERY == 0 else None} for i in range(1, 201)]
    assert best_score(_model(history)) == ("val_dice", pytest.approx(np.mean([_dice(i) for i in (150, 175, 200)])))
    # measurements of an earlier round, long ago: the loss judges
    later = history + [{"iteration": i, "loss": 0.5, "val_dice": None} for i in range(201, 301)]
    assert best_score(_model(later)) == ("loss", pytest.approx(0.5))
    # malformed values are not measurements
    odd = [{"iteration": i, "loss": 2.0, "val_dice": v} for i, v in enumerate([float("nan"), "0.9", True], 1)]
    assert best_score(_model(odd)) == ("loss", 2.0)


def _edit_manifest(path, **fields):
    manifest = json.loads((path / MANIFEST).read_text())
    for key, value in fields.items():
        if value is ...:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    (path / MANIFEST).write_text(json.dumps(manifest))


def test_old_manifest_with_best_loss_only(project):
    path = project.path
    _train(_model(), CheckpointSaver(project, every=1e9), 75, validate=False)
    project.close()
    _edit_manifest(path, best_metric=..., best_value=..., best_loss=0.01)  # as earlier versions wrote it
    old = Project.open(path, writable=True)
    assert old.best == ("loss", 0.01)
    first_best = old.checkpoint("best")
    # a worse loss does not replace the best ...
    model = _model([{"iteration": 1, "loss": 0.5}])
    CheckpointSaver(old, every=1e9).final(model)
    assert old.checkpoint("best") == first_best and old.best == ("loss", 0.01)
    # ... a better one does
    model.sparse3d.history.append({"iteration": 2, "loss": 0.0001})
    model.sparse3d.history[0]["loss"] = 0.0001
    CheckpointSaver(old, every=1e9).final(model)
    assert old.checkpoint("best") != first_best and old.best == ("loss", pytest.approx(0.0001))
    # a validation Dice does not compare with a loss: the first measured checkpoint becomes the best
    second_best = old.checkpoint("best")
    model.sparse3d.history.append({"iteration": 3, "loss": 0.9, "val_dice": 0.2})
    CheckpointSaver(old, every=1e9).final(model)
    assert old.checkpoint("best") != second_best and old.best == ("val_dice", pytest.approx(0.2))
    old.close()


@pytest.mark.parametrize(
    "fields",
    [
        {"best_metric": "accuracy", "best_value": 0.5},
        {"best_metric": "val_dice", "best_value": "0.5"},
        {"best_metric": "val_dice", "best_value": True},
        {"best_metric": ["val_dice"], "best_value": 0.5},
        {"best_metric": "val_dice", "best_value": None},
        {"best_metric": "val_dice", "best_value": ...},
        {"best_metric": ..., "best_value": ..., "best_loss": ...},
    ],
)
def test_malformed_best_means_none(project, fields):
    path = project.path
    project.close()
    _edit_manifest(path, **fields)
    reopened = Project.open(path, writable=True)
    assert reopened.best is None
    CheckpointSaver(reopened, every=1e9).final(_model([{"iteration": 1, "loss": 0.3}]))  # then the next one is best
    assert reopened.checkpoint("best") is not None and reopened.best == ("loss", 0.3)
    reopened.close()
