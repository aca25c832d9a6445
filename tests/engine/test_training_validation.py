"""The trainer holds out a share of the annotations, reports a validation Dice, and trains across spacings."""

import numpy as np

from napari_sparse3d.engine.resample import ResampledVolume
from napari_sparse3d.engine.training import Trainer
from napari_sparse3d.sample_data import evenly_spaced_slices, make_cells, sparse_annotations


def _cells(shape=(24, 64, 64), seed=0):
    image, truth = make_cells(shape, seed=seed)
    slices = evenly_spaced_slices(shape, 2)
    return image, truth, sparse_annotations(truth, slices), slices


def test_validation_dice_is_reported_every_few_steps_on_voxels_that_never_train(tiny_config):
    image, _, labels, slices = _cells()
    config = tiny_config.replace(train={"validation": 0.1, "validation_every": 4})
    trainer = Trainer.from_inputs(image, labels, slices, config=config, device="cpu")
    held = trainer.data.held_out[0]
    assert (held >= 0).sum() > 0
    # held-out voxels are annotated for the user but unlabeled for the sampler
    assert (trainer.annotations.target[held >= 0] >= 0).all()
    assert (trainer.sampler.samplers[0].target[held >= 0] == -1).all()
    reports = list(trainer.steps(max_iterations=12))
    measured = {r.iteration: r.val_dice for r in reports if r.val_dice is not None}
    assert sorted(measured) == [4, 8, 12]
    assert all(0.0 <= v <= 1.0 for v in measured.values())
    assert [h["val_dice"] for h in trainer.history if h["val_dice"] is not None] == list(measured.values())


def test_no_validation_when_switched_off_or_annotations_are_few(tiny_config):
    image, _, labels, slices = _cells()
    off = Trainer.from_inputs(image, labels, slices, config=tiny_config.replace(train={"validation": 0.0}), device="cpu")
    assert off.data.validator is None
    assert all(r.val_dice is None for r in off.steps(max_iterations=3))
    few = np.zeros_like(labels)
    few[12, 30:34, 30:34] = 1
    few[12, 2:6, 2:6] = 2
    trainer = Trainer.from_inputs(image, few, config=tiny_config, device="cpu")
    assert trainer.data.validator is None  # every one of 32 voxels is needed for training


def test_corrections_update_the_training_targets_and_the_held_out_share(tiny_config):
    image, truth, labels, slices = _cells()
    trainer = Trainer.from_inputs(image, labels, slices, config=tiny_config, device="cpu")
    before = int((trainer.sampler.samplers[0].target >= 0).sum())
    more = labels.copy()
    more[3] = truth[3]
    trainer.update_annotations(more, {**slices, 0: sorted({*slices[0], 3})})
    assert int((trainer.sampler.samplers[0].target >= 0).sum()) > before
    assert trainer.annotations.annotated_slices[0] == sorted({*slices[0], 3})


def test_a_volume_at_another_spacing_is_trained_on_the_models_grid(tiny_config):
    a_image, _, a_labels, a_slices = _cells((24, 64, 64), seed=0)
    b_image, b_truth = make_cells((12, 64, 64), radius=(2.5, 5.0), seed=1)  # z voxels twice as thick
    b_slices = {0: [6], 1: [32]}
    b_labels = sparse_annotations(b_truth, b_slices)
    trainer = Trainer.from_many(
        [a_image, b_image], [a_labels, b_labels], [a_slices, b_slices], spacing=(1.0, 1.0, 1.0),
        spacings=[(1.0, 1.0, 1.0), (2.0, 1.0, 1.0)], config=tiny_config, device="cpu",
    )
    resampled = trainer.volumes[1]
    assert isinstance(resampled, ResampledVolume) and resampled.spatial_shape == (24, 64, 64)
    annotations = trainer.all_annotations[1]
    assert annotations.target.shape == (24, 64, 64)
    # the annotated z slice survives on the finer grid (as two planes) with its labels, and the y slice too
    z_planes = [z for z in range(24) if (annotations.target[z] >= 0).all()]
    assert z_planes == [12, 13]
    assert (annotations.target[12] == b_truth[6]).all()
    assert annotations.annotated_slices == {0: [12], 1: [32]}
    assert len(list(trainer.steps(max_iterations=2))) == 2
