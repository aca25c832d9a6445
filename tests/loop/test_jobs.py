"""The docks' long jobs as plain generators: previews, phases, stop and cancel."""

import threading

import numpy as np


def test_training_job_previews_stops_and_predicts(small_volume, tiny_config):
    from napari_sparse3d.engine.prediction import Block
    from napari_sparse3d.engine.training import Trainer, TrainReport
    from napari_sparse3d.loop.jobs import Phase, Preview, training_job

    image, labels, truth, slices = small_volume
    trainer = Trainer.from_inputs(image, labels, slices, config=tiny_config, device="cpu")
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
    from napari_sparse3d.engine.prediction import Block
    from napari_sparse3d.engine.training import Trainer
    from napari_sparse3d.loop.jobs import Phase, training_job

    image, labels, truth, slices = small_volume
    config = tiny_config.replace(predict={"tile_voxels": 2000})  # several tiles, so several blocks
    trainer = Trainer.from_inputs(image, labels, slices, config=config, device="cpu")
    cancel = threading.Event()
    items = []
    for item in training_job(trainer, max_iterations=2, cancel=cancel):
        items.append(item)
        if isinstance(item, Block):
            cancel.set()
    assert [i.name for i in items if isinstance(i, Phase)] == ["training", "predicting", "cancelled"]
    assert sum(isinstance(i, Block) for i in items) == 1


def test_a_finished_or_cancelled_prediction_gives_the_cached_device_memory_back(small_volume, tiny_config, monkeypatch):
    from napari_sparse3d.engine import devices
    from napari_sparse3d.engine.prediction import Block
    from napari_sparse3d.engine.training import Trainer
    from napari_sparse3d.loop.jobs import training_job

    image, labels, truth, slices = small_volume
    released = []
    monkeypatch.setattr(devices, "release_cached_memory", lambda device: released.append(device.type))
    config = tiny_config.replace(predict={"tile_voxels": 2000})
    for cancel_at_first_block in (False, True):
        released.clear()
        trainer = Trainer.from_inputs(image, labels, slices, config=config, device="cpu")
        cancel = threading.Event()
        blocks = 0
        for item in training_job(trainer, max_iterations=2, cancel=cancel):
            if isinstance(item, Block):
                assert released == []  # not while windows still run
                blocks += 1
                if cancel_at_first_block:
                    cancel.set()
        assert released == ["cpu"] and blocks >= 1
