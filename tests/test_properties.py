"""Property-based tests of the argument checks of run() and predict() (hypothesis).

Whatever mix of good and bad arguments comes in, the call either works or
raises a TypeError / ValueError whose message names an argument — never
another exception from deep inside numpy or torch, and never a hang.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import napari_sparse3d
from napari_sparse3d.config import Config

ARGUMENTS = (
    "image",
    "labels",
    "annotated_slices",
    "spacing",
    "max_seconds",
    "max_iterations",
    "seed",
    "config",
    "channel_axis",
    "background_label",
    "device",
    "out",
    "model",
)
TINY = Config.from_dict(
    {"model": {"levels": 2, "base_features": 2}, "train": {"patch_size": [4, 8, 8], "batch_size": 1, "warmup_steps": 0},
     "predict": {"mirror_tta": False}}
)
SHAPE = (6, 10, 9)


@st.composite
def images(draw):
    kind = draw(st.sampled_from(["ok", "ok", "2d", "4d", "empty", "object", "nan", "complex", "bool", "int", "list"]))
    rng = np.random.default_rng(draw(st.integers(0, 100)))
    if kind == "2d":
        return rng.random(SHAPE[1:]).astype(np.float32)
    if kind == "4d":
        return rng.random((2,) + SHAPE).astype(np.float32)
    if kind == "empty":
        return np.zeros((0,) + SHAPE[1:], np.float32)
    if kind == "object":
        return np.empty(SHAPE, object)
    if kind == "complex":
        return np.ones(SHAPE, np.complex64)
    if kind == "list":
        return rng.random(SHAPE).tolist()
    image = rng.random(SHAPE).astype(np.float32)
    if kind == "nan":
        image[draw(st.integers(0, SHAPE[0] - 1)), 0, 0] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    if kind == "bool":
        return image > 0.5
    if kind == "int":
        return (image * 1000).astype(np.int32)
    return image


@st.composite
def label_arrays(draw):
    kind = draw(st.sampled_from(["ok", "ok", "ok", "shape", "negative", "fraction", "empty", "one-class", "float-int"]))
    labels = np.zeros(SHAPE, np.int32)
    labels[2, 1:5, 1:5] = draw(st.integers(1, 300))
    if kind == "shape":
        return labels[:, :5]
    if kind == "negative":
        labels[0, 0, 0] = -draw(st.integers(1, 5))
    if kind == "fraction":
        return labels + 0.5
    if kind == "empty":
        return np.zeros(SHAPE, np.uint8)
    if kind == "one-class":
        return np.ones(SHAPE, np.uint8)
    if kind == "float-int":
        return labels.astype(np.float64)
    return labels


slices = st.one_of(
    st.none(),
    st.just({0: [2]}),
    st.just({0: [2], 2: [0, 8]}),
    st.dictionaries(st.integers(-1, 4), st.lists(st.integers(-2, 12), max_size=3), max_size=3),
    st.sampled_from(["z=2", [2], {0: "2"}, {0: [2.5]}, {"0": [2]}]),
)
numbers = st.one_of(st.none(), st.sampled_from([1, 2, 0, -1, 0.5, float("nan"), float("inf"), "3", True, [1]]))
spacings = st.one_of(st.none(), st.sampled_from([(1, 1, 1), (2.0, 0.5, 0.5), (0, 1, 1), (1, 1), "1,1,1", (1, np.nan, 1)]))
seeds = st.sampled_from([0, 3, -1, 1.5, "0", None, True])
configs = st.sampled_from([TINY, TINY, "nonexistent", {"train": {"batch_size": 0}}, {"model": {"levels": "4"}}, 7])


def _names_an_argument(exc: Exception) -> bool:
    message = str(exc)
    return any(name in message for name in ARGUMENTS)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    image=images(),
    labels=label_arrays(),
    annotated_slices=slices,
    spacing=spacings,
    max_iterations=numbers,
    max_seconds=numbers,
    seed=seeds,
    config=configs,
)
def test_run_either_works_or_names_the_bad_argument(
    image, labels, annotated_slices, spacing, max_iterations, max_seconds, seed, config
):
    if max_iterations is None and max_seconds is None:
        max_iterations = 1  # keep the property cheap: a valid call trains one step
    if isinstance(max_iterations, int) and not isinstance(max_iterations, bool) and max_iterations > 2:
        max_iterations = 2
    try:
        res = napari_sparse3d.run(
            image,
            labels,
            annotated_slices=annotated_slices,
            spacing=spacing,
            max_iterations=max_iterations,
            max_seconds=min(max_seconds, 2) if isinstance(max_seconds, (int, float)) and not isinstance(max_seconds, bool) and max_seconds > 0 else max_seconds,
            seed=seed,
            config=config,
            device="cpu",
        )
    except (TypeError, ValueError) as exc:
        assert _names_an_argument(exc), f"{type(exc).__name__}: {exc}"
        return
    assert res.labels.shape == SHAPE
    assert set(np.unique(res.labels)) <= set(res.class_values)


@pytest.fixture(scope="module")
def tiny_model():
    labels = np.zeros(SHAPE, np.uint8)
    labels[2, 1:5, 1:5] = 1
    res = napari_sparse3d.run(
        np.random.default_rng(0).random(SHAPE).astype(np.float32),
        labels,
        annotated_slices={0: [2]},
        max_iterations=1,
        config=TINY,
        device="cpu",
    )
    return res.model


outs = st.one_of(
    st.none(),
    st.sampled_from(["zeros", "wrong-shape", "float", "int8", "tuple", "string"]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(image=images(), out=outs, device=st.sampled_from(["cpu", "auto", "tpu", 3, "cuda:x"]), channel_axis=st.sampled_from([None, None, 0, 5, "0"]))
def test_predict_either_works_or_names_the_bad_argument(tiny_model, image, out, device, channel_axis):
    target = {
        None: None,
        "zeros": np.zeros(SHAPE, np.uint8),
        "wrong-shape": np.zeros(SHAPE[::-1], np.uint8),
        "float": np.zeros(SHAPE, np.float32),
        "int8": np.zeros(SHAPE, np.int8),
        "tuple": (1, 2, 3),
        "string": 42,
    }[out]
    try:
        labels = napari_sparse3d.predict(image, tiny_model, out=target, device=device, channel_axis=channel_axis)
    except (TypeError, ValueError) as exc:
        assert _names_an_argument(exc) or "checkpoint" in str(exc), f"{type(exc).__name__}: {exc}"
        return
    assert labels.shape[-3:] == np.asarray(image).shape[-3:] or channel_axis is not None
