"""Dense Dice and instance F1 on the real nuclei volume after one default run (2 slices per axis, 120 s).

Trains ``napari_sparse3d.run`` (defaults, CPU, seed 0) on the three-class and the
two-class nuclei task, prints the Dice outside the annotated slices, and for the
three-class model the matched instance F1 (IoU > 0.5) of
``instances_from_prediction`` against the volume's 20 instance labels, after
``clean_labels`` with several ``min_size``.

Command (from the repository root)::

    python benchmarks/nuclei_instances.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import napari_sparse3d
from label_efficiency import annotation, load_data, make_truth, score
from napari_sparse3d import clean_labels, instances_from_prediction
from napari_sparse3d.evaluation.metrics import instance_f1

image, inst, _ = load_data()
sp = (0.29, 0.26, 0.26)
for task in ("three-class", "two-class"):
    truth = make_truth(inst, task)
    slices, mask, sparse = annotation(truth, 2)
    res = napari_sparse3d.run(image, sparse, annotated_slices=slices, spacing=sp, max_seconds=120, seed=0, device="cpu")
    dice = score(res.labels, truth, mask)[0]
    line = f"{task}: Dice {dice:.3f} ({len(res.history)} steps)"
    if task == "three-class":
        for m in (0, 100, 300):
            labels = clean_labels(res.labels, min_size=m) if m else res.labels
            ins = instances_from_prediction(labels, interior=1, boundary=2, min_size=m, spacing=sp)
            f = instance_f1(ins, inst)
            line += f"; instances min_size {m}: F1 {f['f1']:.3f} (tp {f['tp']} fp {f['fp']} fn {f['fn']})"
    print(line, flush=True)
