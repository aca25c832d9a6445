"""Whole-volume prediction: accuracy and speed of the prediction settings, and against MONAI.

Three parts (``--parts``), all on the real nuclei volume (see label_efficiency.py):

``dice``
    Trains one model per task (two-class, three-class), seed (``--seeds``,
    default 0 1 2) and count of annotated slices per axis (``--slices``,
    default 2) with the default recipe for
    ``--train-steps`` (default 400, about the label-efficiency benchmark's
    120 s on a 2-core CPU without native bf16; models are cached in
    ``benchmarks/data/models/``), then predicts
    the volume with each candidate setting of :data:`CANDIDATES` and scores the
    Dice outside the annotated slices, and its change against the first setting
    measured (``--settings`` picks settings by their number in :data:`CANDIDATES`;
    by default all, the first being the old default: windows of the training
    patch, overlap 0.5, 8 mirrorings).
``speed``
    Times each candidate (and the current default) on the nuclei volume,
    median of ``--repeats`` (default 5), in a fresh model's process: seconds,
    Mvox/s of output, the network's FLOPs (``torch.utils.flop_counter``) per
    second, and that as a fraction of the CPU's roofline — the FLOP/s of a
    large matrix product in the same precision, the most this CPU computes.
``monai``
    Equal work against MONAI's ``sliding_window_inference``: the same module,
    one pass per window, windows of the training patch, overlap 0.5, Gaussian
    weights (sigma 0.125), 8 windows per batch.  MONAI runs as its users run
    it on a CPU (float32, contiguous tensors); napari-sparse3d runs its own
    path (its precision and memory format for this CPU).  Median of 3.

    python benchmarks/bench_prediction.py [--parts dice speed monai]

Writes ``benchmarks/results/prediction.md`` (and prints it); per-model Dice
records go to ``benchmarks/results/prediction_dice.jsonl``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import label_efficiency as le
import napari_sparse3d
from napari_sparse3d.config import PredictConfig
from napari_sparse3d.engine.devices import resolve_precision
from napari_sparse3d.engine.pixel_head import prior
from napari_sparse3d.engine.prediction import WindowGrid, plan_window, predict_blocks, resolve_window
from napari_sparse3d.engine.volume import as_volume
from napari_sparse3d.io.checkpoint import load_checkpoint, save_checkpoint

MODELS = le.DATA_DIR / "models"
RECORD_VERSION = 2  # records of models with the pixel classifier, and "auto" windows fitted to the volume
OLD_DEFAULT = {"window": "patch", "overlap": 0.5, "mirror_tta": True}
#: a window value of this benchmark: the patch grown to window_voxels as "auto" does, without fitting it to the volume
PLANNED = "planned"
#: name -> PredictConfig fields; the first is the reference (the default before this benchmark)
CANDIDATES = {
    "old default: patch, overlap 0.5, mirrored": OLD_DEFAULT,
    "patch, overlap 0.5": {"window": "patch", "overlap": 0.5, "mirror_tta": False},
    "planned 2^18, not fitted, overlap 0.25 (default before fit_window)":
        {"window": PLANNED, "window_voxels": 2**18, "overlap": 0.25, "mirror_tta": False},
    "auto 2^18, overlap 0.5": {"window": "auto", "window_voxels": 2**18, "overlap": 0.5, "mirror_tta": False},
    "auto 2^18, overlap 0.25": {"window": "auto", "window_voxels": 2**18, "overlap": 0.25, "mirror_tta": False},
    "auto 2^18, overlap 0.125": {"window": "auto", "window_voxels": 2**18, "overlap": 0.125, "mirror_tta": False},
    "auto 2^20, overlap 0.25": {"window": "auto", "window_voxels": 2**20, "overlap": 0.25, "mirror_tta": False},
    "auto 2^20, overlap 0.125": {"window": "auto", "window_voxels": 2**20, "overlap": 0.125, "mirror_tta": False},
}


def trained_model(image, instances, task: str, seed: int, steps: int, k: int = 2):
    path = MODELS / f"{task}-k{k}-seed{seed}-{int(steps)}steps.pt"
    if path.exists():
        return load_checkpoint(path)
    truth = le.make_truth(instances, task)
    slices, _, sparse = le.annotation(truth, k)
    from napari_sparse3d.engine.training import Trainer

    trainer = Trainer.from_inputs(image, sparse, slices, spacing=le.SPACING, device="cpu", seed=seed)
    t0 = time.perf_counter()
    for _ in trainer.steps(max_iterations=steps):
        pass
    le.log(f"trained {task} k={k} seed {seed}: {steps} steps in {time.perf_counter() - t0:.0f} s")
    save_checkpoint(trainer.model, path)
    return load_checkpoint(path)


def predict(image, model, fields: dict) -> np.ndarray:
    return napari_sparse3d.predict(image, _with(model, fields, image.shape), device="cpu")


def settings(fields: dict, model, shape) -> PredictConfig:
    """The PredictConfig of a candidate's fields for ``model`` on a volume of ``shape``."""
    fields = {**PredictConfig().__dict__, **fields}
    if fields["window"] == PLANNED:
        fields["window"] = plan_window(model.sparse3d.patch_size, model.divisor, shape, fields["window_voxels"])
    return PredictConfig(**fields)


def _with(model, fields: dict, shape):
    """The model with other prediction settings (a shallow copy of its metadata)."""
    import dataclasses

    info = model.sparse3d
    config = info.config.replace(predict=settings(fields, model, shape).__dict__)
    model.sparse3d = dataclasses.replace(info, config=config)
    return model


def part_dice(args, image, instances, lines: list[str]) -> None:
    out = le.RESULTS_DIR / "prediction_dice.jsonl"
    done = {(r["task"], r.get("k", 2), r["seed"], r["setting"]): r for r in le.read_results(out)
            if r.get("train_steps") == args.train_steps and r.get("version") == RECORD_VERSION}
    chosen = [name for i, name in enumerate(CANDIDATES) if args.settings is None or i in args.settings]
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in chosen}
    measured: list[str] = []
    for task in args.tasks:
        truth = le.make_truth(instances, task)
        for k in args.slices:
            _, annotated, _ = le.annotation(truth, k)
            for seed in args.seeds:
                model = None
                reference = None
                if args.no_train and not all((task, k, seed, name) in done for name in chosen):
                    continue  # a table of what has been measured
                measured.append(f"{task} k={k} seed {seed}")
                for name in chosen:
                    key = (task, k, seed, name)
                    if key in done:  # results are kept as they finish; a rerun goes on from there
                        dice = done[key]["dice"]
                    else:
                        model = model or trained_model(image, instances, task, seed, args.train_steps, k)
                        config = settings(CANDIDATES[name], model, image.shape)
                        t0 = time.perf_counter()
                        labels = predict(image, model, CANDIDATES[name])
                        seconds = time.perf_counter() - t0
                        dice, per_class = le.score(labels, truth, annotated)
                        window = resolve_window(model.sparse3d, model, image.shape, config)
                        le.append_result(out, {
                            "task": task, "k": k, "seed": seed, "setting": name, "fields": CANDIDATES[name],
                            "window": list(window), "dice": dice, "per_class": per_class, "seconds": seconds,
                            "train_steps": args.train_steps, "version": RECORD_VERSION, "finite": bool(np.isfinite(dice)),
                        })
                        le.log(f"{task} k={k} seed {seed} {name}: window {window}, dice {dice:.4f} in {seconds:.1f} s")
                    reference = dice if reference is None else reference
                    rows[name].append((dice, dice - reference))
    lines += [
        "## Dice of each setting on trained models",
        "",
        f"Models: default recipe, {args.train_steps} training steps, {'/'.join(map(str, args.slices))} annotated"
        f" slices per axis, {len(measured)} models ({', '.join(measured)}); Dice outside the annotated slices;"
        f" change against the first setting on the same model.",
        "",
        "| setting | models | mean Dice | mean change | worst change | best change |",
        "|---|---|---|---|---|---|",
    ]
    for name, values in rows.items():
        if not values:
            continue
        d = np.array(values)
        lines.append(f"| {name} | {len(d)} | {d[:, 0].mean():.4f} | {d[:, 1].mean():+.4f} | {d[:, 1].min():+.4f}"
                     f" | {d[:, 1].max():+.4f} |")
    lines.append("")


def roofline(dtype: torch.dtype) -> float:
    """FLOP/s of a large matrix product in ``dtype``: the most this CPU computes (best of 5)."""
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048**3 / best


def window_flops(model, window, channels_last: bool, dtype: torch.dtype) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, model.in_channels + model.prior_channels, *window)  # the network's input, prior included
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.eval()(x)
    return float(counter.get_total_flops())


def convolution_seconds(volume, model, cfg: PredictConfig) -> float:
    """Seconds spent in the network's convolution kernels during one prediction (the probabilities given)."""
    from torch.profiler import ProfilerActivity, profile

    info = model.sparse3d
    whole = tuple(slice(0, s) for s in volume.spatial_shape)
    dtype = resolve_precision(torch.device("cpu"), info.config.train.precision)
    given = (prior(model.pixel_head, volume, info.normalization, whole, dtype=dtype).float().numpy()
             if model.pixel_head else None)
    list(predict_blocks(volume, model, device="cpu", config=cfg, prior_map=given))  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        list(predict_blocks(volume, model, device="cpu", config=cfg, prior_map=given))
    return sum(e.self_cpu_time_total for e in prof.key_averages() if "conv" in e.key) / 1e6


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN primitive creation, allocator
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def part_speed(args, image, instances, lines: list[str]) -> None:
    model = trained_model(image, instances, "three-class", 0, args.train_steps)
    info = model.sparse3d
    dtype = resolve_precision(torch.device("cpu"), info.config.train.precision)
    peak = roofline(dtype)
    volume = as_volume(image)
    lines += [
        "## Speed of each setting",
        "",
        f"Nuclei volume {image.shape} ({image.size / 1e6:.1f} Mvox), three-class model, median of {args.repeats};"
        f" precision {str(dtype).replace('torch.', '')}, roofline (2048² matrix product) {peak / 1e9:.0f} GFLOP/s.",
        "",
        "| setting | window | windows | seconds | Mvox/s | network GFLOP/s | roofline fraction |",
        "|---|---|---|---|---|---|---|",
    ]
    candidates = {"**current default**": {}, **{name: fields for i, (name, fields) in enumerate(CANDIDATES.items())
                                                if args.settings is None or i in args.settings}}
    for name, fields in candidates.items():
        cfg = settings(fields, model, image.shape)
        if name != "**current default**" and cfg == PredictConfig():
            continue
        if cfg.mirror_tta and args.repeats > 1 and not args.time_mirrored:
            continue  # 8x the work: timed once in the dice part
        window = resolve_window(info, model, volume.spatial_shape, cfg)
        n = WindowGrid(volume.spatial_shape, window, cfg.overlap, cfg.gaussian_sigma).count()
        flops = window_flops(model, window, info.config.train.channels_last, dtype) * n * (8 if cfg.mirror_tta else 1)
        seconds = timed(lambda cfg=cfg: list(predict_blocks(volume, model, device="cpu", config=cfg)), args.repeats)
        lines.append(f"| {name} | {'x'.join(map(str, window))} | {n} | {seconds:.2f} | {image.size / seconds / 1e6:.2f} |"
                     f" {flops / seconds / 1e9:.1f} | {flops / seconds / peak:.2f} |")
        le.log(lines[-1])
    lines.append("")


def part_monai(args, image, instances, lines: list[str]) -> None:
    from monai.inferers import sliding_window_inference

    model = trained_model(image, instances, "three-class", 0, args.train_steps)
    info = model.sparse3d
    patch = tuple(info.patch_size)
    volume = as_volume(image)
    # equal work: the same windows and passes; each side batches them its own way (MONAI: 8 a batch, as
    # specified; napari-sparse3d: its default, which measured faster here than 8)
    cfg = PredictConfig(window="patch", overlap=0.5, mirror_tta=False)
    n = WindowGrid(volume.spatial_shape, patch, 0.5, 0.125).count()
    dtype = resolve_precision(torch.device("cpu"), info.config.train.precision)

    def ours():
        return list(predict_blocks(volume, model, device="cpu", config=cfg))

    def monai():
        # what a MONAI user writes: normalise the whole volume, add the classifier's probabilities (the
        # network's other input channels, the same function as ours), then slide over the whole
        x = torch.from_numpy(info.normalization.apply(volume.read()))
        if model.pixel_head is not None:
            box = tuple(slice(0, s) for s in volume.spatial_shape)
            x = torch.cat([x, prior(model.pixel_head, volume, info.normalization, box, dtype=dtype)])
        x = x[None]
        net = model.to(memory_format=torch.contiguous_format).eval()
        with torch.inference_mode():
            logits = sliding_window_inference(x, patch, 8, net, overlap=0.5, mode="gaussian", sigma_scale=0.125)
            return torch.softmax(logits, 1)

    ours_s = timed(ours, 3)
    monai_s = timed(monai, 3)
    # both sides compute the classifier's probabilities once, with the same function (ours: one tile)
    whole = tuple(slice(0, s) for s in volume.spatial_shape)
    prior_s = (timed(lambda: prior(model.pixel_head, volume, info.normalization, whole, dtype=dtype), 3)
               if model.pixel_head else 0.0)
    model.to(memory_format=torch.channels_last_3d if info.config.train.channels_last else torch.contiguous_format)
    conv_s = convolution_seconds(volume, model, cfg)
    flops = window_flops(model, patch, False, torch.float32) * n
    peak32 = roofline(torch.float32)
    peak = roofline(dtype)
    (block,) = ours()  # one tile: the whole volume
    m = monai()[0].numpy()
    diff = np.abs(block.probabilities - m)
    agree = float((block.probabilities.argmax(0) == m.argmax(0)).mean())
    lines += [
        "## Equal work against MONAI",
        "",
        f"Windows of the training patch {'x'.join(map(str, patch))}, overlap 0.5, Gaussian, one pass"
        f" (MONAI: sw_batch_size 8; napari-sparse3d: {cfg.batch_size} a batch):"
        f" {n} windows on both sides; MONAI {__import__('monai').__version__} in float32, contiguous; napari-sparse3d"
        f" in {str(dtype).replace('torch.', '')}, channels-last-3d: {info.config.train.channels_last}. Median of 3."
        f" The two place windows differently (MONAI steps by the overlap and aligns the last window to the end;"
        f" napari-sparse3d spreads them evenly), so the results differ slightly: mean absolute difference of the"
        f" probabilities {diff.mean():.4f}, labels equal on {100 * agree:.2f}% of the voxels.",
        "",
        "| implementation | seconds | Mvox/s | network GFLOP/s | roofline fraction |",
        "|---|---|---|---|---|",
        f"| MONAI sliding_window_inference | {monai_s:.2f} | {image.size / monai_s / 1e6:.2f} |"
        f" {flops / monai_s / 1e9:.1f} | {flops / monai_s / peak32:.2f} |",
        f"| napari-sparse3d predict_blocks | {ours_s:.2f} | {image.size / ours_s / 1e6:.2f} |"
        f" {flops / ours_s / 1e9:.1f} | {flops / ours_s / peak:.2f} |",
        "",
        f"**napari-sparse3d / MONAI speed: {monai_s / ours_s:.2f}x**",
        "",
        f"Both include the pixel classifier's probabilities, computed once by the same function ({prior_s:.2f} s,"
        f" median of 3); without them the sliding window alone takes {monai_s - prior_s:.2f} s (MONAI) and"
        f" {ours_s - prior_s:.2f} s (napari-sparse3d): {(monai_s - prior_s) / (ours_s - prior_s):.2f}x.",
        "",
        f"**The bound:** the network's convolutions alone (oneDNN's kernels: self time under torch.profiler, one"
        f" run with the classifier's probabilities given) take {conv_s:.2f} s of napari-sparse3d's sliding window."
        f" Were everything else free (normalisation, activations, blending, reading), it would take"
        f" {conv_s + prior_s:.2f} s with the probabilities: at most **{monai_s / (conv_s + prior_s):.2f}x** MONAI"
        f" ({(monai_s - prior_s) / conv_s:.2f}x without them).",
        "",
    ]
    le.log(lines[-2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["dice", "speed", "monai"], choices=["dice", "speed", "monai"])
    parser.add_argument("--tasks", nargs="+", default=list(le.TASKS), choices=le.TASKS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--slices", nargs="+", type=int, default=[2], help="dice: annotated slices per axis")
    parser.add_argument("--settings", nargs="+", type=int, help="dice, speed: numbers of the CANDIDATES to measure (default all)")
    # steps, not seconds, so that a busy machine trains the same models: 400 steps are about 120 s of
    # training on a 2-core AVX-512 CPU without native bf16 (0.3 s a step)
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-train", action="store_true", help="dice: only the models whose records are complete")
    parser.add_argument("--time-mirrored", action="store_true", help="also time mirrored settings --repeats times")
    parser.add_argument("--out", default=str(le.RESULTS_DIR / "prediction.md"))
    args = parser.parse_args()
    image, instances, source = le.load_data()
    lines = [
        "# Whole-volume prediction",
        "",
        f"Command: `python benchmarks/bench_prediction.py {' '.join(sys.argv[1:])}` (torch {torch.__version__},"
        f" {torch.get_num_threads()} threads; data: {source})",
        "",
    ]
    for part in args.parts:
        {"dice": part_dice, "speed": part_speed, "monai": part_monai}[part](args, image, instances, lines)
    text = "\n".join(lines)
    print(text)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and set(args.parts) != {"dice", "speed", "monai"}:
        text = path.read_text().rstrip() + "\n\n" + "\n".join(lines[2:])  # a partial run adds its command and sections
    path.write_text(text)


if __name__ == "__main__":
    main()
