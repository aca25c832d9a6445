"""The console command under hostile conditions: signals mid-training, outputs it cannot write, odd options.

Each case here once printed a Python traceback, failed only after the whole training
budget, or silently ignored what the user asked for.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tifffile

import napari_sparse3d
from napari_sparse3d.cli import main


@pytest.fixture
def files(small_volume, tiny_config, tmp_path):
    image, labels, _, _ = small_volume
    tifffile.imwrite(tmp_path / "image.tif", image)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    (tmp_path / "config.json").write_text(tiny_config.to_json())
    return tmp_path


def _train_command(d, seconds=300):
    return [sys.executable, "-m", "napari_sparse3d.cli", "train", str(d / "image.tif"), str(d / "labels.tif"),
            "--slices", "z=8", "--seconds", str(seconds), "--config", str(d / "config.json"), "--device", "cpu",
            "-o", str(d / "model.pt")]


def _start_training(d):
    """A console training run, returned once its progress bar shows training steps."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(_train_command(d), cwd=d, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    seen = bytearray()

    def read():
        while chunk := proc.stderr.read1(4096):
            seen.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while b"step " not in seen:  # tqdm redraws with \r, so there is no line to wait for
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"training did not start: {bytes(seen).decode(errors='replace')[-2000:]}")
        time.sleep(0.1)
    return proc, seen, reader


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_training_stops_it_and_saves_the_model(files, signum):
    """Ctrl-C, or a cluster scheduler's SIGTERM: the steps trained so far are predicted and saved, no traceback."""
    proc, seen, reader = _start_training(files)
    proc.send_signal(signum)
    out = proc.stdout.read()  # not communicate(): it would take stderr from the reader
    proc.wait(timeout=240)
    reader.join(timeout=10)
    err = bytes(seen).decode(errors="replace")
    assert proc.returncode == 0, err[-2000:]
    assert f"{signal.Signals(signum).name}: training stops after this step" in err and "Traceback" not in err
    assert "(stopped early by a signal)" in out.decode()
    steps = int(out.decode().split("trained ")[1].split()[0])
    model = napari_sparse3d.predict(str(files / "image.tif"), str(files / "model.pt"))  # a whole, loadable checkpoint
    assert steps >= 1 and model.shape == (20, 36, 28)


def test_a_second_signal_or_one_outside_training_aborts():
    """In-process, so that the signals' timing is exact (two signals of one kind sent at once are one)."""
    from napari_sparse3d.cli.progress import Interrupt, Progress

    progress = Progress(quiet=True)
    before = signal.getsignal(signal.SIGINT)
    with Interrupt(progress) as interrupt:
        with pytest.raises(KeyboardInterrupt):  # setting up: nothing trained yet to save
            os.kill(os.getpid(), signal.SIGINT)
        progress.phase = "train"
        os.kill(os.getpid(), signal.SIGTERM)
        assert interrupt.stop.is_set() and "SIGTERM: training stops after this step" in progress.notice
        with pytest.raises(KeyboardInterrupt):  # the second: abort now
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_an_abort_is_one_line_and_exit_status_130(files, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(napari_sparse3d.api, "run", interrupted)
    d = files
    _refused(capsys, ["train", str(d / "image.tif"), str(d / "labels.tif"), "--slices", "z=8", "-o", str(d / "m.pt")],
             "interrupted; outputs are written whole or not at all", code=130)
    assert not (d / "m.pt").exists()


def test_run_stops_when_its_event_is_set(small_volume, tiny_config):
    """``run(stop=)``: the headless form of napari's Stop; what was trained is still predicted."""
    image, labels, _, slices = small_volume
    stop = threading.Event()

    def progress(report):
        if getattr(report, "iteration", 0) >= 3:
            stop.set()

    res = napari_sparse3d.run(image, labels, annotated_slices=slices, max_iterations=500, config=tiny_config,
                              device="cpu", progress=progress, stop=stop)
    assert len(res.history) == 3 and res.labels.shape == image.shape


def _refused(capsys, argv, message, code=2):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == code and message in err and "Traceback" not in err, err
    return err


def test_unwritable_outputs_are_refused_before_training(files, capsys):
    """These failed after the whole budget: torch's RuntimeError for the checkpoint, or 'Is a directory'."""
    d = files
    common = [str(d / "image.tif"), str(d / "labels.tif"), "--slices", "z=8", "--iterations", "1", "--config",
              str(d / "config.json"), "--quiet"]
    (d / "folder").mkdir()
    _refused(capsys, ["train", *common, "-o", str(d / "folder")], "is a folder; give the path of the file to write")
    (d / "plain").write_text("not a folder")
    _refused(capsys, ["train", *common, "-o", str(d / "plain" / "m.pt")], "plain' is a file, not a folder")
    _refused(capsys, ["run", *common, "-o", str(d / "plain")], "plain' is a file, not a folder")
    if os.geteuid() != 0:  # root writes anywhere
        (d / "ro").mkdir()
        (d / "ro").chmod(0o555)
        _refused(capsys, ["train", *common, "-o", str(d / "ro" / "m.pt")], "ro' is not writable")
    assert not (d / "folder" / "model.pt").exists() and not list((d / "folder").iterdir())


def test_options_that_were_silently_ignored_are_refused(files, capsys, tmp_path):
    d = files
    assert main(["train", str(d / "image.tif"), str(d / "labels.tif"), "--slices", "z=8", "--iterations", "1",
                 "--config", str(d / "config.json"), "-o", str(d / "m.pt"), "--quiet"]) == 0
    predict = ["predict", str(d / "m.pt"), str(d / "image.tif"), "-o", str(d / "out"), "--quiet"]
    _refused(capsys, [*predict, "--pyramid", "2"], "--pyramid must be >= 0 and needs --format zarr, got 2 with --format tif")
    _refused(capsys, [*predict, "--format", "zarr", "--pyramid", "-1"], "--pyramid must be >= 0")
    _refused(capsys, ["run", "--sample", "cells", "--slices", "z=3", "-o", str(tmp_path / "s")],
             "--slices does not apply to --sample")
    _refused(capsys, ["run", "--sample", "cells", "--sample-slices", "100000", "-o", str(tmp_path / "s")],
             "per_axis (slices per axis) must be an integer from 1 to")
    assert not (d / "out").exists()


def test_broken_inputs_get_one_line_naming_them(files, capsys):
    d = files
    (d / "empty.npy").write_bytes(b"")
    np.save(d / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (d / "broken.json").write_text("{model: 3")
    train = ["train", "--slices", "z=8", "--iterations", "1", "-o", str(d / "m.pt"), "--quiet"]
    _refused(capsys, [*train, str(d / "empty.npy"), str(d / "labels.tif")], "is not a readable .npy array")
    _refused(capsys, [*train, str(d / "objects.npy"), str(d / "labels.tif")], "is not a readable .npy array")
    _refused(capsys, [*train, str(d / "image.tif"), str(d / "labels.tif"), "--config", str(d / "broken.json")],
             "--config: ")
    (d / "nan.json").write_text('{"train": {"dice_weight": NaN}}')
    _refused(capsys, [*train, str(d / "image.tif"), str(d / "labels.tif"), "--config", str(d / "nan.json")],
             "config.train.dice_weight must be a finite number, got nan")
    _refused(capsys, ["run", str(d / "nope.zarr"), "-o", str(d / "o")], "nope.zarr' does not exist")


def test_training_that_diverges_ends_with_its_message_not_a_traceback(files, capsys):
    d = files
    (d / "wild.json").write_text('{"model": {"levels": 3, "base_features": 4}, "train": {"patch_size": [8, 16, 16],'
                                 ' "batch_size": 1, "learning_rate": 1e12, "warmup_steps": 0}}')
    _refused(capsys, ["train", str(d / "image.tif"), str(d / "labels.tif"), "--slices", "z=8", "--iterations", "30",
                      "--config", str(d / "wild.json"), "-o", str(d / "m.pt"), "--quiet"],
             "lower config.train.learning_rate", code=1)
    assert not (d / "m.pt").exists()


def test_min_size_that_removes_everything_says_so(files, capsys):
    d = files
    assert main(["train", str(d / "image.tif"), str(d / "labels.tif"), "--slices", "z=8", "--iterations", "1",
                 "--config", str(d / "config.json"), "-o", str(d / "m.pt"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["predict", str(d / "m.pt"), str(d / "image.tif"), "-o", str(d / "out"), "--min-size", "100000000",
                 "--quiet"]) == 0
    assert "--min-size 100000000 removed every object: the labels are all 0" in capsys.readouterr().err
    assert (tifffile.imread(d / "out" / "image_labels.tif") == 0).all()
