"""Checkpoints: a file from somewhere else is untrusted input; writes are durable and atomic."""

import pickle
import zipfile

import numpy as np
import pytest
import torch

import napari_sparse3d
from napari_sparse3d.io.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture
def trained(tiny_checkpoint):
    return tiny_checkpoint


class _Payload:
    """Unpickling this runs ``exec``: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


@pytest.mark.parametrize("container", ["torch", "raw pickle"])
def test_a_crafted_pickle_cannot_run_code(tmp_path, container):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "model.pt"
    payload = {"format": "napari-sparse3d-checkpoint", "info": _Payload(marker)}
    if container == "torch":
        torch.save(payload, path)
        assert zipfile.is_zipfile(path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError, match="is not a readable napari-sparse3d checkpoint"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="model_or_checkpoint|checkpoint"):
        napari_sparse3d.predict(np.zeros((8, 16, 16), np.float32), str(path), device="cpu")
    assert not marker.exists()
    # the same object really does run code when unpickled without the guard
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.read_text() == "code ran"


def _edited(trained, tmp_path, edit):
    _, path = trained
    payload = torch.load(path, weights_only=True)
    edit(payload)
    out = tmp_path / "edited.pt"
    torch.save(payload, out)
    return out


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p["info"].pop("class_values"), "does not describe a valid network .KeyError: 'class_values'"),
        (lambda p: p["info"].update(in_channels="many"), "does not describe a valid network .ValueError"),
        (lambda p: p["info"].update(config="{not json"), "does not describe a valid network"),
        (lambda p: p.update(state_dict={"w": "not a tensor"}), "'state_dict' must map parameter names to tensors"),
        (lambda p: p["state_dict"].pop(next(iter(p["state_dict"]))), "does not describe a valid network .RuntimeError"),
        (lambda p: p.update(format_version="1"), "format_version must be an integer"),
        (lambda p: p.update(format="something else"), "is not a napari-sparse3d checkpoint"),
        # each of these loaded before and then predicted one class only, or failed deep in numpy
        (lambda p: p["info"].update(class_values=[0, 0]), "class_values must be at least two different label values"),
        (lambda p: p["info"].update(patch_size=[0, 16, 16]), r"patch_size must be three positive sizes .* \[0, 16, 16\]"),
        # a warm start continues the step count from the last entry: KeyError 'iteration' before
        (lambda p: p["info"].update(history=[{}]), r"history\[0\] must be an object with a step number 'iteration'"),
        (lambda p: p["info"].update(history="long"), "history must be a list of training steps, got str"),
        (lambda p: p["info"].update(patch_size=[p["info"]["patch_size"][0], p["info"]["patch_size"][1] + 1, 16]),
         "must be a multiple of the network's stride"),
    ],
)
def test_malformed_checkpoints_get_a_clear_error(trained, tmp_path, edit, message):
    with pytest.raises(ValueError, match=message) as info:
        load_checkpoint(_edited(trained, tmp_path, edit))
    assert "edited.pt" in str(info.value)


def test_non_finite_weights_are_refused_on_load(trained, tmp_path):
    def poison(payload):
        name = next(k for k, v in payload["state_dict"].items() if v.is_floating_point())
        payload["state_dict"][name][...] = float("nan")

    with pytest.raises(ValueError, match="holds NaN or infinite weights"):
        load_checkpoint(_edited(trained, tmp_path, poison))


def test_save_is_atomic_and_leaves_no_temporary_files(trained, tmp_path, monkeypatch):
    model, _ = trained
    path = tmp_path / "model.pt"
    save_checkpoint(model, path)
    before = path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(model, path)
    assert path.read_bytes() == before  # the earlier checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no partial file left behind
    for a, b in zip(load_checkpoint(path).parameters(), model.parameters()):
        assert torch.equal(a, b.detach().cpu())


def test_a_folder_is_not_a_checkpoint(tmp_path):
    (tmp_path / "model.pt").mkdir()
    with pytest.raises(ValueError, match=r"checkpoint: '.*model.pt' is a folder; give the path of a checkpoint file"):
        load_checkpoint(tmp_path / "model.pt")
