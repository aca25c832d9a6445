"""Projects: the zarr store, atomic saves, resume, and survival of SIGKILL."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tifffile
import torch

import napari_sparse3d
from napari_sparse3d.checkpoint import load_checkpoint
from napari_sparse3d.project import MANIFEST, Project, ProjectWriteError, is_project


@pytest.fixture
def project(tmp_path, small_volume, tiny_config):
    image, labels, truth, slices = small_volume
    return Project.create(tmp_path / "p.zarr", image, labels=labels, annotated_slices=slices, config=tiny_config)


def test_create_open_round_trip(project, small_volume, tiny_config):
    image, labels, truth, slices = small_volume
    again = Project.open(project.path)
    assert is_project(project.path) and not is_project(project.path / "missing")
    np.testing.assert_array_equal(np.asarray(again.image()), image)
    saved, saved_slices = again.annotations()
    np.testing.assert_array_equal(saved, labels)
    assert saved_slices == slices
    assert again.config() == tiny_config
    assert again.prediction() is None and again.checkpoint() is None
    assert again.manifest["versions"]["numpy"] == np.__version__
    # a plain zarr reader sees a group with the image and one annotation array
    import zarr

    group = zarr.open_group(str(project.path), mode="r")
    assert group.attrs["format"] == "napari-sparse3d-project"
    assert sorted(name for name, _ in group.arrays()) == ["annotations-000001", "image"]


def test_saves_replace_versions_and_keep_one(project, small_volume):
    image, labels, truth, slices = small_volume
    for k in range(3):
        labels = labels.copy()
        labels[0, 0, k] = 1
        project.save_annotations(labels, {0: [k]})
    names = sorted(p.name for p in project.path.glob("annotations-*"))
    assert names == [project.manifest["current"]["annotations"]]
    saved, saved_slices = Project.open(project.path).annotations()
    np.testing.assert_array_equal(saved, labels)
    assert saved_slices == {0: [2]}


def test_failed_write_keeps_the_previous_state(project, small_volume, monkeypatch):
    import napari_sparse3d.project as module

    before, before_slices = project.annotations()
    changed = before.copy()
    changed[1, 1, 1] = 2

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module, "_write_json_atomic", full_disk)
    with pytest.raises(ProjectWriteError, match="could not save the annotations .* No space left on device; the previous state is kept"):
        project.save_annotations(changed, {0: [1]})
    monkeypatch.undo()
    reopened = Project.open(project.path)
    saved, saved_slices = reopened.annotations()
    np.testing.assert_array_equal(saved, before)
    assert saved_slices == before_slices
    assert len(list(project.path.glob("annotations-*"))) == 1  # the half-made version is gone


def test_leftovers_of_a_kill_are_collected(project):
    (project.path / "annotations-999999").mkdir()
    (project.path / "checkpoints").mkdir(exist_ok=True)
    (project.path / "checkpoints" / "latest-999999.pt.tmp").write_bytes(b"partial")
    Project.open(project.path)
    assert not (project.path / "annotations-999999").exists()
    assert not (project.path / "checkpoints" / "latest-999999.pt.tmp").exists()


def test_referenced_image_is_checked_by_hash(tmp_path, small_volume):
    image, labels, truth, slices = small_volume
    path = tmp_path / "image.tif"
    tifffile.imwrite(path, image)
    project = Project.create(tmp_path / "ref.zarr", tifffile.imread(path), image_path=path)
    assert not (project.path / "image").exists()
    np.testing.assert_array_equal(Project.open(project.path).image(), image)
    changed = image.copy()
    changed[0, 0, 0] += 1
    tifffile.imwrite(path, changed)
    with pytest.raises(ValueError, match="changed since the project was saved"):
        Project.open(project.path)
    path.unlink()
    with pytest.raises(ValueError, match="is missing"):
        Project.open(project.path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(format_version=99), "written by a newer napari-sparse3d .project format 99"),
        (lambda m: m.update(format="something else"), "is not a napari-sparse3d project"),
    ],
)
def test_foreign_or_newer_projects_are_refused(project, edit, message):
    manifest = json.loads((project.path / MANIFEST).read_text())
    edit(manifest)
    (project.path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=message):
        Project.open(project.path)


def test_bad_saves_are_refused_without_touching_the_project(project):
    before = project.manifest["current"]["annotations"]
    shape = project.shape
    with pytest.raises(ValueError, match="labels must have the project's shape"):
        project.save_annotations(np.zeros((2, 2, 2), np.uint8), {})
    with pytest.raises(ValueError, match="fractional"):
        project.save_annotations(np.full(shape, 0.5), {})
    with pytest.raises(ValueError, match="negative"):
        project.save_annotations(np.full(shape, -1), {})
    with pytest.raises(ValueError, match="out of range"):
        project.save_annotations(np.zeros(shape, np.uint8), {0: [shape[0]]})
    assert project.manifest["current"]["annotations"] == before
    with pytest.raises(ValueError, match="already exists and is not empty"):
        Project.create(project.path, np.zeros(shape, np.float32))
    with pytest.raises(ValueError, match="is not a napari-sparse3d project"):
        Project.open(project.path.parent)


def test_run_on_a_project_saves_and_resumes(project, small_volume):
    image, labels, truth, slices = small_volume
    first = napari_sparse3d.run(str(project.path), max_iterations=4, checkpoint_every=1e-6, device="cpu")
    reopened = Project.open(project.path)
    assert [h["iteration"] for h in reopened.history] == [1, 2, 3, 4]
    np.testing.assert_array_equal(reopened.prediction(), first.labels)
    assert reopened.probabilities().shape == first.probabilities.shape
    assert reopened.checkpoint("latest").is_file() and reopened.checkpoint("best").is_file()
    latest = napari_sparse3d.predict(image, reopened.checkpoint("latest"), device="cpu")
    np.testing.assert_array_equal(latest, first.labels)
    # resume: the second run starts from the latest checkpoint, with the project's configuration
    second = napari_sparse3d.run(str(project.path), max_iterations=2, device="cpu")
    assert [r.iteration for r in second.history] == [5, 6]
    assert second.model.sparse3d.config == reopened.config()
    assert [h["iteration"] for h in Project.open(project.path).history] == list(range(1, 7))
    assert len(list((project.path / "checkpoints").glob("latest-*.pt"))) == 1


CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from napari_sparse3d.config import Config
    from napari_sparse3d.data import as_volume, prepare_annotations
    from napari_sparse3d.project import Project
    from napari_sparse3d.training import Trainer

    path, truth_path = sys.argv[1], sys.argv[2]
    truth = np.load(truth_path)
    project = Project.open(path)
    labels, slices = project.annotations()
    slices = {a: list(v) for a, v in slices.items()}
    config = Config.from_dict({"model": {"levels": 3, "base_features": 4},
                               "train": {"patch_size": [8, 16, 16], "batch_size": 1, "warmup_steps": 0}})
    init = project.checkpoint("latest")
    trainer = Trainer(as_volume(project.image()), prepare_annotations(labels, labels.shape, slices),
                      config=None if init else config, device="cpu", init=init)
    print("START", trainer.iteration, flush=True)
    for report in trainer.steps():
        project.save_checkpoint(trainer.model)
        print("CKPT", report.iteration, flush=True)
        # a new fully annotated y slice every other step (annotations only grow)
        free = [i for i in range(labels.shape[1]) if i not in slices.get(1, [])]
        if report.iteration % 2 == 0 and free:
            index = free[0]
            labels[:, index] = truth[:, index]
            slices.setdefault(1, []).append(index)
            project.save_annotations(labels, slices)
            print("ANN", index, flush=True)
    """
)


def test_sigkill_at_random_moments_loses_nothing(project, small_volume, tmp_path):
    image, labels, truth, slices = small_volume
    truth_path = tmp_path / "truth.npy"
    np.save(truth_path, truth)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    rng = np.random.default_rng(0)
    acked_slices = set(slices[1])
    acked_iteration = 0
    for round_ in range(4):
        child = subprocess.Popen(
            [sys.executable, str(script), str(project.path), str(truth_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        start = child.stdout.readline().split()
        assert start and start[0] == "START", child.stderr.read()
        assert int(start[1]) >= acked_iteration  # training resumed from the latest checkpoint
        time.sleep(float(rng.uniform(0.3, 1.5)))
        os.kill(child.pid, signal.SIGKILL)
        out, _ = child.communicate()
        for line in out.splitlines():
            kind, value = line.split()
            if kind == "ANN":
                acked_slices.add(int(value))
            elif kind == "CKPT":
                acked_iteration = max(acked_iteration, int(value))
        reopened = Project.open(project.path)
        saved, saved_slices = reopened.annotations()
        # every annotation saved before the kill is there (one more may have landed unacknowledged)
        assert acked_slices <= set(saved_slices[1]) and len(saved_slices[1]) <= len(acked_slices) + 1
        for index in saved_slices[1]:
            np.testing.assert_array_equal(saved[:, index], truth[:, index])
        model = load_checkpoint(reopened.checkpoint("latest"))
        assert int(model.sparse3d.history[-1]["iteration"]) >= acked_iteration
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert len(list(project.path.glob("annotations-*"))) == 1
    assert acked_iteration > 4  # the rounds did train
