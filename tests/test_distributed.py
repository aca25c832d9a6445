"""Prediction on a dask.distributed LocalCluster (two worker processes): equal to one process, robust, restartable."""

import os
import signal

import numpy as np
import pytest
import zarr

import napari_sparse3d
from napari_sparse3d.config import Config
from napari_sparse3d.distributed import predict_distributed
from napari_sparse3d.engine.prediction import predict_volume
from napari_sparse3d.engine.volume import as_volume
from napari_sparse3d.io.arrays import load_array

distributed = pytest.importorskip("distributed", reason="the 'cluster' extra (dask.distributed) is not installed")

SHAPE = (16, 128, 192)  # output chunks (16, 64, 64): six tiles of one chunk each with TILE voxels
TILE = 16 * 64 * 64


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


@pytest.fixture(scope="module")
def volume_and_model(tmp_path_factory):
    """A uint16 zarr volume of bright blobs and a model (with its pixel classifier) trained a few steps on it."""
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    truth = np.zeros(SHAPE, np.uint8)
    for cz, cy, cx in rng.uniform((4, 10, 10), (12, 118, 182), size=(25, 3)):
        truth[((zz - cz) / 3) ** 2 + ((yy - cy) / 7) ** 2 + ((xx - cx) / 7) ** 2 < 1] = 1
    image = (1000 + 800 * truth.astype(np.float32) + rng.normal(0, 150, SHAPE)).clip(0, 65535).astype(np.uint16)
    path = tmp_path_factory.mktemp("cluster") / "image.zarr"
    z = zarr.create_array(str(path), shape=SHAPE, dtype="uint16", chunks=(16, 64, 64))
    z[...] = image
    labels = np.zeros(SHAPE, np.uint8)
    labels[8] = truth[8] + 1
    labels[:, 64] = truth[:, 64] + 1
    config = Config.from_dict({
        "model": {"levels": 3, "base_features": 4},
        "train": {"patch_size": [8, 32, 32], "batch_size": 2, "warmup_steps": 0, "validation": 0.0},
        "predict": {"mirror_tta": False},
    })
    res = napari_sparse3d.run(image, labels, max_iterations=3, device="cpu", config=config, seed=0)
    return path, res.model


@pytest.fixture(scope="module")
def reference(volume_and_model):
    path, model = volume_and_model
    return predict_volume(as_volume(load_array(path)), model, keep_probabilities=True)


def _wait_idle(client, timeout=60.0):
    """Until the tasks of an interrupted run that were already running on the workers have finished."""
    import time

    end = time.monotonic() + timeout
    while any(client.processing().values()) and time.monotonic() < end:
        time.sleep(0.1)


def _check_equal(result, reference):
    labels, probabilities = reference
    np.testing.assert_array_equal(np.asarray(result.labels[...]), labels)
    if result.probabilities is not None:
        np.testing.assert_allclose(np.asarray(result.probabilities[...]), probabilities, atol=1e-5)


def test_two_workers_give_the_single_process_result(client, volume_and_model, reference, tmp_path):
    path, model = volume_and_model
    reports = []
    result = predict_distributed(path, model, tmp_path / "labels.zarr", client=client, tile_voxels=TILE,
                                 keep_probabilities=True, progress=reports.append)
    assert (result.tiles, result.skipped, result.computed) == (6, 0, 6)
    _check_equal(result, reference)
    assert reports[-1].windows_done == reports[-1].windows_total  # progress over the windows of finished tiles
    # the finished output is the OME-Zarr image a single-process prediction writes, and reads back as labels
    np.testing.assert_array_equal(np.asarray(load_array(tmp_path / "labels.zarr")[...]), reference[0])
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no partial output left behind
    # and the public entry point routes to the cluster
    labels = napari_sparse3d.predict(path, model, out=tmp_path / "again.zarr", client=client)
    np.testing.assert_array_equal(np.asarray(labels[...]), reference[0])


def test_a_worker_killed_mid_run_does_not_stop_the_prediction(client, volume_and_model, reference, tmp_path):
    path, model = volume_and_model
    pids = client.run(os.getpid)  # worker address -> process id
    victim = sorted(pids.values())[0]
    killed = []

    def kill_once(report):
        if not killed:
            os.kill(victim, signal.SIGKILL)  # the nanny restarts it; its tasks go to the other worker
            killed.append(report.windows_done)

    result = predict_distributed(path, model, tmp_path / "labels.zarr", client=client, tile_voxels=TILE,
                                 keep_probabilities=True, progress=kill_once)
    assert killed and result.computed == 6
    _check_equal(result, reference)


def _interrupted_run(client, path, model, out, **options):
    """A run stopped (Ctrl-C) after its first finished tile; returns once the tiles already running are done."""

    def interrupt(report):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict_distributed(path, model, out, client=client, tile_voxels=TILE, progress=interrupt, **options)
    assert not out.exists()  # nothing half-written under the name asked for
    _wait_idle(client)


def test_an_interrupted_run_resumes_where_it_stopped(client, volume_and_model, reference, tmp_path):
    path, model = volume_and_model
    out = tmp_path / "labels.zarr"
    _interrupted_run(client, path, model, out, keep_probabilities=True)
    assert len(list(tmp_path.glob(".labels.zarr.cluster-*"))) == 1  # the partial output, kept for the next run
    result = predict_distributed(path, model, out, client=client, tile_voxels=TILE, keep_probabilities=True)
    assert result.skipped >= 1 and result.skipped + result.computed == result.tiles == 6
    _check_equal(result, reference)


def test_a_partial_output_of_other_settings_is_not_resumed(client, volume_and_model, reference, tmp_path):
    path, model = volume_and_model
    out = tmp_path / "labels.zarr"
    _interrupted_run(client, path, model, out)
    result = predict_distributed(path, model, out, client=client, tile_voxels=2 * TILE)  # other tiles: a fresh start
    assert result.skipped == 0 and result.computed == result.tiles
    assert not list(tmp_path.glob(".labels.zarr.cluster-*"))  # the earlier run's partial output is gone
    np.testing.assert_array_equal(np.asarray(result.labels[...]), reference[0])


def test_bad_inputs_are_refused_before_any_work(client, volume_and_model, tmp_path):
    path, model = volume_and_model
    with pytest.raises(TypeError, match="image must be a path"):
        predict_distributed(np.zeros(SHAPE), model, tmp_path / "a.zarr", client=client)
    with pytest.raises(TypeError, match="out must be a path"):
        predict_distributed(path, model, np.zeros(SHAPE, np.uint8), client=client)
    with pytest.raises(TypeError, match="client must be a dask.distributed Client"):
        predict_distributed(path, model, tmp_path / "a.zarr", client=object())
    with pytest.raises(ValueError, match="tile_voxels must be a positive integer"):
        predict_distributed(path, model, tmp_path / "a.zarr", client=client, tile_voxels=0)
    with pytest.raises(ValueError, match="is .* the input"):
        predict_distributed(path, model, path, client=client, overwrite=True)


def test_each_run_ships_its_model_under_keys_of_its_own(client, volume_and_model, tmp_path, monkeypatch):
    """Two runs on one cluster (two users, or a run resumed after an interrupted one) must not share
    the keys of their scattered networks: releasing one run's keys would lose the other's data, and
    two different models would overwrite each other."""
    path, model = volume_and_model
    keys = []
    real = client.scatter

    def scatter(data, **kwargs):
        futures = real(data, **kwargs)
        keys.append({f.key for f in (futures.values() if isinstance(futures, dict) else futures)})
        return futures

    monkeypatch.setattr(client, "scatter", scatter)
    for name in ("a.zarr", "b.zarr"):
        predict_distributed(path, model, tmp_path / name, client=client, tile_voxels=TILE)
    assert len(keys) == 2 and all(keys)
    assert not keys[0] & keys[1]
    assert not {"state_dict", "info", "format_version"} & (keys[0] | keys[1])
