"""The pixel classifier alone, across volumes of different character: is a change to its fit general?

The classifier is the network's starting point and, at budgets of 15-30 s on a
CPU, most of what a user sees.  A change to how it is fitted is cheap to try
and easy to tune to one volume, so this benchmark measures it on several:

- ``nuclei2`` / ``nuclei3``: the real nuclei volume (two- and three-class tasks of
  ``label_efficiency.py``), scored outside the annotated slices (``in``) and, trained
  on the left half only, on the whole right half (``transfer``);
- ``organ``, ``vessels``, ``cells3``: generated volumes of
  :mod:`napari_sparse3d.sample_data` (one large object; thin tubes; noisy touching
  cells with a boundary class), scored outside the annotated slices and on a second
  volume drawn with another seed (``transfer``).

For each volume, slices per axis and seed, a :class:`~napari_sparse3d.engine.training.Trainer`
is set up as ``napari_sparse3d.run`` sets it up, and the training voxels it gives
the classifier (annotated, minus the validation share) are kept.  Each variant is
then fitted on exactly those voxels: ``engine`` is the shipped
:meth:`PixelClassifier.fit`; the others change one thing (learning rate, schedule,
steps; see ``VARIANTS``), and ``forest`` is a random forest on the same responses.
A variant of ``SCALES`` is the engine's fit on a filter bank at other scales, fitted on
the same training voxels and scored on that bank's responses.
The ``engine`` records in ``classifier_fit.jsonl`` were made while the engine fitted a single
perceptron (what ``constant-3e-3`` does); since then the engine fits ``bag4-cosine-1e-2``, so
a new ``engine`` run replaces its row's baseline with the bag (compare against ``constant-3e-3``).
Dice is the mean over foreground classes of the argmax.

    python benchmarks/bench_classifier.py --volumes nuclei3 cells3 --slices 1 2 3 --seeds 0 1 2 3 4 \\
        --variants engine cosine-2e-2

Records go to ``results/classifier_fit.jsonl``; a table of each variant's change
against ``engine`` (mean and worst over the runs) is printed and written to
``results/classifier_fit.md``.
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import label_efficiency as le
from napari_sparse3d.engine import pixel_head
from napari_sparse3d.engine.features import filter_bank, scaled_sigmas
from napari_sparse3d.engine.training import Trainer
from napari_sparse3d.engine.volume import as_volume
from napari_sparse3d.sample_data import make_cells, make_organ, make_vessels

RESULTS = le.RESULTS_DIR / "classifier_fit.jsonl"
VOLUMES = ("nuclei2", "nuclei3", "organ", "vessels", "cells3")
#: Alternatives to the shipped fit: Adam at ``lr`` for ``steps`` steps, optionally annealed by a cosine.
VARIANTS = {
    "constant-3e-3": dict(lr=3e-3, cosine=False),  # what the engine did at the time of writing
    "constant-2e-2": dict(lr=2e-2, cosine=False),
    "cosine-1e-2": dict(lr=1e-2, cosine=True),
    "cosine-2e-2": dict(lr=2e-2, cosine=True),
    "cosine-2e-2-300": dict(lr=2e-2, cosine=True, steps=300),
    "constant-3e-3-1500": dict(lr=3e-3, cosine=False, steps=1500),
}

#: Bagged perceptrons: ``bagN-V`` averages N fits of variant V, each on a bootstrap sample of the voxels.
BAGS = ("bag4-constant-3e-3", "bag4-cosine-1e-2")
#: Another filter bank: the engine's fit on responses at these scales (voxels of the finest axis).
SCALES = {"scales-1-16": (1.0, 2.0, 4.0, 8.0, 16.0)}


def volumes(names):
    """name -> (image, truth, spacing, new image, new truth, whether 'transfer' trains on the left half)."""
    image = instances = None
    for name in names:
        if name.startswith("nuclei"):
            if image is None:
                image, instances, _ = le.load_data()
            truth = le.make_truth(instances, "two-class" if name == "nuclei2" else "three-class")
            half = image.shape[2] // 2
            yield name, image, truth, le.SPACING, image[..., half:], truth[..., half:], True
        else:
            make = {"organ": make_organ, "vessels": make_vessels,
                    "cells3": lambda seed: make_cells(seed=seed, classes=3)}[name]
            yield name, *make(seed=1), None, *make(seed=2), False


def training_voxels(image, sparse, slices, spacing, seed):
    """The classifier's training responses and classes of a default run, and its trainer's set-up."""
    kept = {}
    fit = pixel_head.PixelClassifier.fit

    def keep(self, features, labels, **_):
        kept["x"], kept["y"] = features, labels
        self.fitted.zero_()  # the probability map of an unfitted classifier is uniform, and cheap

    pixel_head.PixelClassifier.fit = keep
    try:
        trainer = Trainer.from_inputs(image, sparse, annotated_slices=slices, spacing=spacing, seed=seed, device="cpu")
    finally:
        pixel_head.PixelClassifier.fit = fit
    return trainer, kept["x"], kept["y"]


def responses(trainer, image, sigmas=None) -> torch.Tensor:
    """``(voxels, features)`` of ``image``, normalised as the trainer normalises a new volume."""
    volume = as_volume(image)
    norm = trainer.normalization.for_volume(volume)
    block = torch.from_numpy(np.ascontiguousarray(norm.apply(volume.read((slice(None),) * 3)), dtype=np.float32))
    with torch.no_grad():
        bank = filter_bank(block, trainer.model.pixel_head.sigmas.numpy() if sigmas is None else sigmas)
    return bank.reshape(bank.shape[0], -1).T.contiguous()


def fit_variant(x, y, classes, seed, *, lr, cosine, steps=pixel_head.FIT_STEPS):
    """The engine's perceptron and sampling, with another optimiser setting; returns a logits function."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    h = pixel_head.HIDDEN
    net = nn.Sequential(nn.Linear(x.shape[1], h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, classes))
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if cosine else None
    for _ in range(steps):
        index = torch.randint(0, len(y), (min(pixel_head.FIT_BATCH, len(y)),), generator=generator)
        loss = F.cross_entropy(net((x[index] - mean) / std), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
    return lambda f: net((f - mean) / std)


def other_bank(variant, trainer, seed):
    """The engine's classifier at the scales of ``variant``, fitted on the trainer's training voxels."""
    spacing = trainer.spacing
    head = pixel_head.PixelClassifier(trainer.volume.channels, len(trainer.class_values),
                                      sigmas=scaled_sigmas(spacing, SCALES[variant]))
    data = trainer.data
    head.fit(*pixel_head.training_samples(head, list(zip(data.volumes, data.normalizations, data.training_targets)),
                                          seed=seed), seed=seed)
    return head


def fitted(variant, trainer, x, y, seed):
    classes = len(trainer.class_values)
    if variant == "engine":
        head = trainer.model.pixel_head
        head.fit(x, y, seed=seed)
        return lambda f: head.logits((f - head.mean) / head.std)
    if variant.startswith("bag"):  # an average of perceptrons, each fitted on a bootstrap sample: a forest's idea
        members, setting = int(variant[3]), VARIANTS[variant.split("-", 1)[1]]
        generator = torch.Generator().manual_seed(seed)
        fns = []
        for m in range(members):
            pick = torch.randint(0, len(y), (len(y),), generator=generator)
            fns.append(fit_variant(x[pick], y[pick], classes, seed * members + m, **setting))
        return lambda f: torch.stack([fn(f).softmax(1) for fn in fns]).mean(0).log()
    if variant == "forest":
        from sklearn.ensemble import RandomForestClassifier

        forest = RandomForestClassifier(n_estimators=100, max_depth=20, max_features="sqrt", random_state=seed, n_jobs=-1)
        forest.fit(x.numpy(), y.numpy())
        return lambda f: torch.from_numpy(forest.predict_proba(f.numpy()))
    return fit_variant(x, y, classes, seed, **VARIANTS[variant])


def labels_of(logits_fn, feats, class_values, shape) -> np.ndarray:
    with torch.no_grad():
        index = torch.cat([logits_fn(feats[i : i + (1 << 18)]).argmax(1) for i in range(0, len(feats), 1 << 18)])
    return np.asarray(class_values)[index.numpy()].reshape(shape)


def mean_dice(prediction, truth, mask=None) -> float:
    keep = np.ones(truth.shape, bool) if mask is None else mask
    scores = []
    for c in [int(c) for c in np.unique(truth) if c != 0]:
        p, t = (prediction == c) & keep, (truth == c) & keep
        scores.append(2 * np.count_nonzero(p & t) / max(1, np.count_nonzero(p) + np.count_nonzero(t)))
    return float(np.mean(scores))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--volumes", nargs="+", default=list(VOLUMES), choices=VOLUMES)
    p.add_argument("--slices", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--variants", nargs="+", default=["engine", "cosine-2e-2"],
                   choices=["engine", "forest", *VARIANTS, *SCALES, *BAGS])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name, image, truth, spacing, new_image, new_truth, left_half in volumes(args.volumes):
        trained_on = [("in", image, truth)]
        if left_half:
            trained_on.append(("transfer", image[..., : image.shape[2] // 2], truth[..., : image.shape[2] // 2]))
        banks = {}
        for k in args.slices:
            for seed in args.seeds:
                for mode, im, tru in trained_on:
                    slices, mask, sparse = le.annotation(tru, k)
                    trainer, x, y = training_voxels(im, sparse, slices, spacing, seed)
                    scores_new = mode == "transfer" or not left_half  # nuclei: the right half is new only then
                    if mode not in banks:
                        banks[mode] = (responses(trainer, im), responses(trainer, new_image) if scores_new else None)
                    for variant in args.variants:
                        t0 = time.perf_counter()
                        if variant in SCALES:  # its own filter bank: its own responses of both volumes
                            head = other_bank(variant, trainer, seed)
                            sigmas = head.sigmas.numpy()
                            if (mode, variant) not in banks:
                                banks[mode, variant] = (responses(trainer, im, sigmas),
                                                        responses(trainer, new_image, sigmas) if scores_new else None)
                            own, new = banks[mode, variant]
                            logits = lambda f, head=head: head.logits((f - head.mean) / head.std)
                        else:
                            own, new = banks[mode]
                            logits = fitted(variant, trainer, x, y, seed)
                        record = dict(volume=name, mode=mode, slices=k, seed=seed, variant=variant,
                                      voxels=int(len(y)), fit_seconds=round(time.perf_counter() - t0, 2))
                        if scores_new:
                            new_labels = labels_of(logits, new, trainer.class_values, new_truth.shape)
                            record["new_dice"] = round(mean_dice(new_labels, new_truth), 4)
                        if mode == "in":
                            record["dice"] = round(mean_dice(labels_of(logits, own, trainer.class_values, tru.shape),
                                                             tru, ~mask), 4)
                        le.append_result(RESULTS, record)
                        le.log(str(record))
    write_table()


def write_table() -> None:
    """Each variant against ``engine``: change in Dice (mean, worst) per volume and score, from the records."""
    by_run = collections.defaultdict(dict)
    for r in le.read_results(RESULTS):
        run = (r["volume"], r["mode"], r["slices"], r["seed"])
        by_run[run][r["variant"]] = r
    rows = collections.defaultdict(list)
    for (volume, mode, _, _), got in by_run.items():
        if "engine" not in got:
            continue
        for variant, r in got.items():
            for score in ("dice", "new_dice"):
                if score in r:
                    rows[(volume, mode, score, variant)].append((r[score], r[score] - got["engine"][score]))
    lines = ["# The pixel classifier alone: fit variants against the engine's fit", "",
             "`python benchmarks/bench_classifier.py ...` (all records in `classifier_fit.jsonl`). Dice: mean over"
             " foreground classes; `dice` outside the annotated slices of the annotated volume, `new_dice` on the"
             " new volume (nuclei: the right half, trained on the left half; generated: another seed).", "",
             "| volume | trained on | score | variant | runs | mean Dice | change vs engine: mean | worst | best |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (volume, mode, score, variant), values in sorted(rows.items()):
        dice, change = np.array([v[0] for v in values]), np.array([v[1] for v in values])
        lines.append(f"| {volume} | {mode} | {score} | {variant} | {len(values)} | {dice.mean():.4f} |"
                     f" {change.mean():+.4f} | {change.min():+.4f} | {change.max():+.4f} |")
    (le.RESULTS_DIR / "classifier_fit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
