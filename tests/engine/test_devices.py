"""Device and precision choice: clear errors for what is not here, float32 where bf16 would be emulated."""

import numpy as np
import pytest
import torch

from napari_sparse3d.engine.devices import (
    as_float16,
    autocast,
    cpu_supports_bf16,
    release_cached_memory,
    resolve_device,
    resolve_precision,
)


def test_auto_picks_what_the_machine_has():
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto").type == expected
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize(
    ("device", "error", "match"),
    [
        ("gpu", ValueError, "device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'gpu'"),
        (3, TypeError, "device must be 'auto'.*got 3"),
        ("meta", ValueError, "got 'meta'"),
    ],
)
def test_bad_devices_are_named(device, error, match):
    with pytest.raises(error, match=match):
        resolve_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")
def test_asking_for_cuda_without_it_says_so():
    with pytest.raises(ValueError, match="CUDA is not available here"):
        resolve_device("cuda:0")


def test_cpu_precision_follows_native_bf16_support():
    cpu = torch.device("cpu")
    assert resolve_precision(cpu, "fp32") == torch.float32
    assert resolve_precision(cpu, "bf16") == torch.bfloat16
    assert resolve_precision(cpu, "auto") == (torch.bfloat16 if cpu_supports_bf16() else torch.float32)
    with pytest.raises(ValueError, match="'fp16' is for CUDA"):
        resolve_precision(cpu, "fp16")


def test_autocast_is_a_no_op_in_float32_and_casts_in_bf16():
    cpu = torch.device("cpu")
    a, b = torch.ones(4, 4), torch.ones(4, 4)
    with autocast(cpu, torch.float32):
        assert (a @ b).dtype == torch.float32
    with autocast(cpu, torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16


def test_releasing_cached_memory_is_safe_on_any_device():
    release_cached_memory(torch.device("cpu"))  # nothing cached on the CPU: must not raise
    if torch.cuda.is_available():
        torch.ones(1024, 1024, device="cuda")
        release_cached_memory(torch.device("cuda"))
        assert torch.cuda.memory_reserved() == torch.cuda.memory_allocated()


def test_as_float16_gives_numpys_bits_also_below_the_normal_range():
    rng = np.random.default_rng(0)
    # probabilities near 0 (float16 subnormals and underflow), ordinary ones, and the edges
    values = np.concatenate([rng.random(1000) ** 12, rng.random(1000), [0.0, 1.0, 6e-8, 2.9e-8, 65504.0, -1e-6]])
    values = values.astype(np.float32).reshape(2, -1)
    expected = values.astype(np.float16)
    assert (expected[expected != 0] < 6.1e-5).any()  # subnormals are in the test
    got = as_float16(values)
    assert got.dtype == np.float16 and np.array_equal(got.view(np.uint16), expected.view(np.uint16))
    out = np.full((2, 2 * values.shape[1]), 7.0, np.float16)
    as_float16(values[:, ::-1], out=out[:, ::2])  # strided in and out
    assert np.array_equal(out[:, ::2].view(np.uint16), expected[:, ::-1].view(np.uint16))
    assert (out[:, 1::2] == 7.0).all()
