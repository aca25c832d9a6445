"""Training jobs with further volumes: build_trainer / update_trainer / check_annotations with ``extra``."""

import numpy as np
import pytest


def _second_volume(small_volume):
    """Another volume (other shape): the first one mirrored along x and cropped along y."""
    image, labels, truth, slices = small_volume
    image2 = np.ascontiguousarray(image[:, 2:34, ::-1])
    labels2 = np.ascontiguousarray(labels[:, 2:34, ::-1])
    slices2 = {0: [8, 14], 1: [10, 24], 2: [27 - 10, 27 - 20]}
    return image2, labels2, slices2


def test_without_extra_it_is_the_single_volume_trainer(small_volume, tiny_config):
    from napari_sparse3d.engine.training import Trainer
    from napari_sparse3d.loop.jobs import build_trainer

    image, labels, truth, slices = small_volume
    trainer = build_trainer(image, labels, slices, config=tiny_config, device="cpu", extra=[])
    same = Trainer.from_inputs(image, labels, slices, config=tiny_config, device="cpu")
    assert len(trainer.volumes) == 1 and len(trainer.sampler.samplers) == 1
    assert trainer.class_values == same.class_values and trainer.patch_size == same.patch_size
    np.testing.assert_array_equal(trainer.annotations.target, same.annotations.target)


def test_extra_volume_trains_and_only_the_first_is_predicted(small_volume, tiny_config):
    from napari_sparse3d.engine.prediction import Block
    from napari_sparse3d.engine.training import TrainReport
    from napari_sparse3d.loop.jobs import ExtraVolume, Phase, Preview, build_trainer, training_job

    image, labels, truth, slices = small_volume
    image2, labels2, slices2 = _second_volume(small_volume)
    config = tiny_config.replace(train={"batch_size": 4})
    extra = [ExtraVolume(image2, labels2, slices2)]
    trainer = build_trainer(image, labels, slices, config=config, device="cpu", extra=extra)
    assert len(trainer.volumes) == 2 and len(trainer.sampler.samplers) == 2
    assert trainer.volume.spatial_shape == image.shape and trainer.volumes[1].spatial_shape == image2.shape
    assert trainer.class_values == [0, 1, 2]
    region = (slice(None), slice(9, 10), slice(None))
    items = list(training_job(trainer, max_iterations=4, view=lambda: region, preview_every=0.0))
    assert sum(isinstance(i, TrainReport) for i in items) == 4
    assert all(n > 0 for n in trainer.sampler.drawn), trainer.sampler.drawn  # patches from both volumes
    painted = np.zeros(image.shape, bool)
    for block in (i for i in items if isinstance(i, Block)):
        painted[block.region] = True  # regions of the first volume's grid
    assert painted.all()
    for preview in (i for i in items if isinstance(i, Preview)):
        for block in preview.blocks:
            assert all(s.stop is None or s.stop <= n for s, n in zip(block.region, image.shape))
    assert [i.name for i in items if isinstance(i, Phase)] == ["training", "predicting", "done"]


def test_extra_volume_at_another_spacing_is_resampled(small_volume, tiny_config):
    from napari_sparse3d.loop.jobs import ExtraVolume, build_trainer, update_trainer

    image, labels, truth, slices = small_volume
    image2, labels2, slices2 = _second_volume(small_volume)
    extra = [ExtraVolume(image2, labels2, slices2, spacing=(2.0, 1.0, 1.0))]
    trainer = build_trainer(image, labels, slices, spacing=(1.0, 1.0, 1.0), config=tiny_config, device="cpu", extra=extra)
    z, y, x = image2.shape
    assert trainer.volumes[1].spatial_shape == (2 * z, y, x)
    assert trainer.all_annotations[1].target.shape == (2 * z, y, x)
    assert trainer.volume.spatial_shape == image.shape  # the first volume is at the model's spacing

    # the kept trainer takes new annotations of both volumes, the extra one resampled like its image
    before = np.count_nonzero(trainer.all_annotations[1].target >= 0)
    more = labels2.copy()
    assert not more[4, 0:3, 0:3].any()
    more[4, 0:3, 0:3] = 1  # a scribble outside the annotated slices
    update_trainer(trainer, labels, slices, [ExtraVolume(image2, more, slices2, spacing=(2.0, 1.0, 1.0))])
    after = trainer.all_annotations[1]
    assert after.target.shape == (2 * z, y, x)
    assert np.count_nonzero(after.target >= 0) > before
    assert after.class_values == trainer.class_values


def test_update_trainer_refuses_other_volumes(small_volume, tiny_config):
    from napari_sparse3d.loop.jobs import ExtraVolume, build_trainer, update_trainer

    image, labels, truth, slices = small_volume
    image2, labels2, slices2 = _second_volume(small_volume)
    trainer = build_trainer(image, labels, slices, config=tiny_config, device="cpu")
    with pytest.raises(ValueError, match="learns from 1 volumes"):
        update_trainer(trainer, labels, slices, [ExtraVolume(image2, labels2, slices2)])
    update_trainer(trainer, labels, slices)  # as before: the first volume only
    trainer2 = build_trainer(image, labels, slices, config=tiny_config, device="cpu", extra=[ExtraVolume(image2, labels2, slices2)])
    bad = labels2.copy()
    bad[0, 0, 0] = 7  # a class the model does not have
    with pytest.raises(ValueError, match="volume 1"):
        update_trainer(trainer2, labels, slices, [ExtraVolume(image2, bad, slices2)])


def test_check_annotations_with_extra_volumes(small_volume):
    from napari_sparse3d.loop.jobs import ExtraVolume, check_annotations

    image, labels, truth, slices = small_volume
    image2, labels2, slices2 = _second_volume(small_volume)
    check_annotations(labels, slices, None)  # the single-volume check, unchanged
    check_annotations(labels, slices, [ExtraVolume(image2, labels2, slices2)])
    # each volume one class, together two: accepted (scribbles, no annotated slices)
    only_one = np.zeros_like(labels)
    only_one[5, 5:9, 5:9] = 1
    only_two = np.zeros_like(labels2)
    only_two[5, 5:9, 5:9] = 2
    with pytest.raises(ValueError, match="only one class"):
        check_annotations(only_one, None)
    check_annotations(only_one, None, [ExtraVolume(image2, only_two)])
    with pytest.raises(ValueError, match="volume 1"):
        check_annotations(labels, slices, [ExtraVolume(image2, np.zeros_like(labels2))])
