"""Projects: the zarr store, atomic saves, resume, and survival of SIGKILL."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import napari_sparse3d
from napari_sparse3d.io.checkpoint import load_checkpoint
from napari_sparse3d.io.project import MANIFEST, Project, ProjectWriteError, is_project


@pytest.fixture
def project(tmp_path, small_volume, tiny_config):
    image, labels, truth, slices = small_volume
    created = Project.create(tmp_path / "p.zarr", image, labels=labels, annotated_slices=slices, config=tiny_config)
    yield created  # open for writing
    created.close()


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
    import napari_sparse3d.io.store as module  # the versioned store under Project commits the manifest

    before, before_slices = project.annotations()
    changed = before.copy()
    changed[1, 1, 1] = 2

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module, "write_json", full_disk)
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
    project.close()
    Project.open(project.path)  # a reader deletes nothing: the leftover may be another writer's save in progress
    assert (project.path / "annotations-999999").exists()
    Project.open(project.path, writable=True)
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
    with pytest.raises(ValueError, match="already exists; refusing to replace it"):
        Project.create(project.path, np.zeros(shape, np.float32))
    with pytest.raises(ValueError, match="is not a napari-sparse3d project"):
        Project.open(project.path.parent)


def test_run_on_a_project_saves_and_resumes(project, small_volume):
    image, labels, truth, slices = small_volume
    project.close()  # run() takes the writer lock itself
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
    from napari_sparse3d.engine.training import Trainer
    from napari_sparse3d.io.checkpoint import as_model
    from napari_sparse3d.project import Project

    path, truth_path = sys.argv[1], sys.argv[2]
    truth = np.load(truth_path)
    project = Project.open(path, writable=True)
    labels, slices = project.annotations()
    slices = {a: list(v) for a, v in slices.items()}
    config = Config.from_dict({"model": {"levels": 3, "base_features": 4},
                               "train": {"patch_size": [8, 16, 16], "batch_size": 1, "warmup_steps": 0}})
    init = project.checkpoint("latest")
    trainer = Trainer.from_inputs(project.image(), labels, slices, config=None if init else config, device="cpu",
                                  init=None if init is None else as_model(init))
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
    project.close()  # each child takes the writer lock; a killed child's lock dies with it
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
        # only whole lines count: under PYTHONUNBUFFERED print() writes word by word, and the kill may cut one
        for line in out.split("\n")[:-1]:
            kind, value = line.split()
            if kind == "ANN":
                acked_slices.add(int(value))
            elif kind == "CKPT":
                acked_iteration = max(acked_iteration, int(value))
        reopened = Project.open(project.path, writable=True)  # the killed child's lock died with it
        saved, saved_slices = reopened.annotations()
        # every annotation saved before the kill is there (one more may have landed unacknowledged)
        assert acked_slices <= set(saved_slices[1]) and len(saved_slices[1]) <= len(acked_slices) + 1
        for index in saved_slices[1]:
            np.testing.assert_array_equal(saved[:, index], truth[:, index])
        model = load_checkpoint(reopened.checkpoint("latest"))
        assert int(model.sparse3d.history[-1]["iteration"]) >= acked_iteration
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert len(list(project.path.glob("annotations-*"))) == 1  # a writer's open collects the leftovers
        reopened.close()
    assert acked_iteration > 4  # the rounds did train


# -- untrusted projects ----------------------------------------------------------------------
def _edit_manifest(path, edit):
    manifest = json.loads((path / MANIFEST).read_text())
    edit(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture
def victim(tmp_path):
    """A folder of the user's that a hostile project must neither delete nor read."""
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work")
    (folder / "latest-000001.pt").write_bytes(b"someone's model")
    return folder


def _untouched(victim):
    return (victim / "thesis.txt").read_text() == "years of work" and (victim / "latest-000001.pt").is_file()


@pytest.mark.parametrize(
    "name",
    ["../victim", "{victim}", "annotations-000001/../../victim", "annotations-1", "image", "checkpoints/latest-000001.pt"],
)
@pytest.mark.parametrize("writable", [False, True])
def test_a_manifest_naming_paths_outside_is_refused(project, victim, name, writable):
    project.close()
    _edit_manifest(project.path, lambda m: m["current"].update(annotations=name.format(victim=victim)))
    with pytest.raises(ValueError, match=r"sparse3d.json: field 'current.annotations' must be"):
        Project.open(project.path, writable=writable)
    assert _untouched(victim)


def test_symbolic_links_are_never_followed(project, victim):
    project.close()
    # a current version that is a link out of the project
    (project.path / "annotations-000050").symlink_to(victim, target_is_directory=True)
    _edit_manifest(project.path, lambda m: m.update(counter=60))
    saved = json.loads((project.path / MANIFEST).read_text())
    _edit_manifest(project.path, lambda m: m["current"].update(annotations="annotations-000050"))
    with pytest.raises(ValueError, match="not a symbolic link"):
        Project.open(project.path, writable=True)
    assert _untouched(victim)
    # the same link, unnamed (garbage by its name), and checkpoints/ a link to the victim
    (project.path / MANIFEST).write_text(json.dumps(saved))
    (project.path / "checkpoints").symlink_to(victim, target_is_directory=True)
    with Project.open(project.path, writable=True) as opened:  # garbage collection skips links
        assert _untouched(victim)
        with pytest.raises(ProjectWriteError, match="is a symbolic link"):
            opened.save_checkpoint(napari_sparse3d.io.checkpoint.load_checkpoint(_tiny_checkpoint(project)))
        labels, slices = opened.annotations()
        opened.save_annotations(labels, slices)  # other saves work, and delete nothing outside
    assert _untouched(victim) and (project.path / "annotations-000050").is_symlink()
    # an image/ that is a link
    shutil.rmtree(project.path / "image")
    (project.path / "image").symlink_to(victim, target_is_directory=True)
    with pytest.raises(ValueError, match="field 'image' must be stored in the project"):
        Project.open(project.path)


def _tiny_checkpoint(project):
    path = project.path.parent / "tiny.pt"
    if not path.exists():
        image = np.asarray(Project.open(project.path, check_image=False).image())
        labels, slices = Project.open(project.path, check_image=False).annotations()
        from napari_sparse3d.config import Config

        config = Config.from_dict({"model": {"levels": 2, "base_features": 2}, "train": {"patch_size": [8, 16, 16], "batch_size": 1}})
        napari_sparse3d.run(image, labels, annotated_slices=slices, max_iterations=1, device="cpu", config=config).save(path)
    return path


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda m: m.pop("shape"), "shape"),
        (lambda m: m.pop("current"), "current"),
        (lambda m: m.pop("image"), "image"),
        (lambda m: m.update(shape="20x36x28"), "shape"),
        (lambda m: m.update(shape=[20, 36, -1]), "shape"),
        (lambda m: m.update(format_version="1"), "format_version"),
        (lambda m: m.update(counter=-1), "counter"),
        (lambda m: m.update(counter=0), "counter"),  # lower than a current version: the next save would reuse its name
        (lambda m: m.update(current=["annotations-000001"]), "current"),
        (lambda m: m["current"].update(annotations=5), "current.annotations"),
        (lambda m: m["current"].update(prediction="annotations-000001"), "current.prediction"),
        (lambda m: m["current"].update(code="annotations-000001"), "current"),
        (lambda m: m.update(annotated_slices=[[0, 8]]), "annotated_slices"),
        (lambda m: m.update(annotated_slices={"3": [1]}), "annotated_slices"),
        (lambda m: m.update(annotated_slices={"0": [99]}), "annotated_slices.0"),
        (lambda m: m.update(spacing=[1, 1]), "spacing"),
        (lambda m: m.update(config={"model": {}}), "config"),
        (lambda m: m["image"].update(hash=None), "image.hash"),
        (lambda m: m["image"].update(dtype="object"), "image.dtype"),
        (lambda m: m.update(history={"loss": 1}), "history"),
        # `napari-sparse3d project` described the last entry and failed with KeyError: 'iteration'
        (lambda m: m.update(history=[{}]), "history[0]"),
        (lambda m: m.update(history=[{"iteration": "5", "loss": 0.1}]), "history[0]"),
    ],
)
def test_a_malformed_manifest_names_the_file_and_field(project, edit, field):
    project.close()
    _edit_manifest(project.path, edit)
    with pytest.raises(ValueError) as info:
        Project.open(project.path)
    assert f"sparse3d.json: field '{field}'" in str(info.value)


def test_an_invalid_config_in_the_manifest_is_a_clear_error(project):
    project.close()
    _edit_manifest(project.path, lambda m: m.update(config='{"train": {"learning_rate": "fast"}}'))
    with pytest.raises(ValueError, match="sparse3d.json: field 'config' is not a valid configuration"):
        Project.open(project.path).config()


def test_a_manifest_that_is_not_json_or_not_an_object(project):
    project.close()
    (project.path / MANIFEST).write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object"):
        Project.open(project.path)
    (project.path / MANIFEST).write_text("{")
    with pytest.raises(ValueError, match="is unreadable"):
        Project.open(project.path)


# -- one writer at a time --------------------------------------------------------------------
HOLDER = textwrap.dedent(
    """
    import sys, time
    from napari_sparse3d.project import Project
    project = Project.open(sys.argv[1], writable=True)
    print("HOLDING", flush=True)
    time.sleep(60)
    """
)


def test_a_second_writer_is_refused_and_a_dead_writer_releases_the_lock(project, tmp_path):
    from napari_sparse3d.io.project import ProjectLockedError

    with pytest.raises(ProjectLockedError, match="already open for writing in this process"):
        Project.open(project.path, writable=True)  # a second viewer in the same napari
    Project.open(project.path).annotations()  # readers are welcome
    project.close()
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    child = subprocess.Popen([sys.executable, str(script), str(project.path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "HOLDING"
        with pytest.raises(ProjectLockedError, match=rf"open for writing by process {child.pid} on "):
            Project.open(project.path, writable=True)
        with pytest.raises(OSError, match="open for writing by process"):  # run() as well: nothing is trained
            napari_sparse3d.run(str(project.path), max_iterations=1, device="cpu")
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    with Project.open(project.path, writable=True) as again:  # the kernel released the dead writer's lock
        assert again.writable


def test_a_writer_that_bypassed_the_lock_cannot_make_another_lose_a_save(project, small_volume):
    image, labels, truth, slices = small_volume
    project.save_annotations(labels, slices)
    # someone edits the manifest behind the lock's back (e.g. a copy of the tool without locking)
    _edit_manifest(project.path, lambda m: m.update(revision=m["revision"] + 5))
    acknowledged = json.loads((project.path / MANIFEST).read_text())
    with pytest.raises(ProjectWriteError, match="was changed on disk by another writer"):
        project.save_annotations(np.zeros_like(labels), {})
    # the other writer's acknowledged state is intact, its versions are still there
    on_disk = json.loads((project.path / MANIFEST).read_text())
    assert on_disk == acknowledged
    assert (project.path / on_disk["current"]["annotations"]).is_dir()


def test_read_only_projects_refuse_to_write(project, small_volume):
    image, labels, truth, slices = small_volume
    reader = Project.open(project.path)
    with pytest.raises(ProjectWriteError, match="is open read-only"):
        reader.save_annotations(labels, slices)


def test_new_versions_reach_the_disk_before_the_manifest_names_them(project, small_volume, monkeypatch):
    import napari_sparse3d.io.store as module  # the versioned store under Project commits the manifest

    image, labels, truth, slices = small_volume
    events = []
    real_fsync, real_write = module.fsync_tree, module.write_json
    monkeypatch.setattr(module, "fsync_tree", lambda p: (events.append(("fsync", Path(p).name)), real_fsync(p))[1])
    monkeypatch.setattr(module, "write_json", lambda p, d: (events.append(("manifest", d["current"].get("annotations"))), real_write(p, d))[1])
    project.save_annotations(labels, slices)
    name = project.manifest["current"]["annotations"]
    assert events.index(("fsync", name)) < events.index(("manifest", name))


def test_overwrite_replaces_only_a_project(project, victim, small_volume):
    image = small_volume[0]
    with pytest.raises(ValueError, match="already exists; refusing"):
        Project.create(victim, image)
    with pytest.raises(ValueError, match="is not an earlier napari-sparse3d project; refusing to replace it even with overwrite"):
        Project.create(victim, image, overwrite=True)
    assert _untouched(victim)
    with pytest.raises(OSError, match="already open for writing"):  # not while someone writes into it
        Project.create(project.path, image, overwrite=True)
    project.close()
    fresh = Project.create(project.path, image * 2, overwrite=True)
    np.testing.assert_array_equal(np.asarray(fresh.image()), image * 2)
    assert fresh.manifest["current"] == {}
    assert [p.name for p in project.path.parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(labels=np.ones((2, 2, 2), np.uint8)), r"labels must have the project's shape \(20, 36, 28\), got \(2, 2, 2\)"),
        (dict(labels="ones", annotated_slices={0: [99]}), r"annotated_slices\[0\]: index 99 is out of range"),
        (dict(labels="half"), "labels contain fractional values"),
        (dict(annotated_slices={0: [4]}), "annotated_slices were given without labels"),
        (dict(annotated_slices=[0, 1], labels="ones"), "annotated_slices must be a dict"),
        (dict(config={"model": {"depth": -1}}), r"config.model has unknown keys \['depth'\]"),
    ],
)
def test_a_refused_create_leaves_no_half_made_project(tmp_path, small_volume, kwargs, message):
    """Each was refused only after the image was written: the corrected command then met 'already exists'."""
    image = small_volume[0]
    fills = {"ones": np.ones(image.shape, np.uint8), "half": np.full(image.shape, 0.5, np.float32)}
    kwargs = {k: fills.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises((ValueError, TypeError), match=message):
        Project.create(tmp_path / "p.zarr", image, **kwargs)
    assert not (tmp_path / "p.zarr").exists()
    Project.create(tmp_path / "p.zarr", image).close()  # the corrected command


def test_a_stored_image_that_lost_chunks_is_refused_for_training(project):
    """Unwritten zarr chunks read as 0: training would have learnt the annotations on a black image."""
    project.close()
    chunk = next(p for p in sorted((project.path / "image" / "c").rglob("*")) if p.is_file())
    chunk.unlink()
    reopened = Project.open(project.path)  # described and displayed as it is
    with pytest.raises(ValueError, match=r"image: '.*image' changed since the project was saved \(content hash differs\)"):
        reopened.training_inputs()


@pytest.mark.parametrize("dtype", [">u2", ">f8", "<i2", "bool"])
def test_a_stored_copy_of_any_byte_order_verifies(tmp_path, small_volume, dtype):
    image = (small_volume[0] * 100).astype(dtype)
    with Project.create(tmp_path / "p.zarr", image, labels=small_volume[1], annotated_slices=small_volume[3]) as created:
        np.testing.assert_array_equal(np.asarray(created.training_inputs().image), image)
