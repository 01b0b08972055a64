"""How well can lesion-class be told from the truth itself? (issue 11, accuracy target).

An oracle baseline for the classification target: logistic regression (scikit-learn) on
features read off the *ground-truth* lesion mask, which no image model can beat by much:
the log lesion volume (voxels of ``lesion-seg``) and the median CT value inside the
lesions. Fitted on every site's train cases pooled, scored on every site's test cases,
the same split the federation reports. The generator flips 8 % of the labels and draws a
quarter of the lesions below the CT noise, so the ceiling is below 1. Run from the
repository root on the default sites:

    .venv/bin/unicon simulate make-data --out /tmp/def/sites --sites 4 --size 32 \\
        --cases 40 --pet-sites 2 --unlabelled 10
    .venv/bin/python docs/measured/class_oracle.py --sites /tmp/def/sites
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from client.manifest import load_manifest
from client.site_folder import manifest_in

TASK, MASK_TASK, POSITIVE = "lesion-class", "lesion-seg", "malignant"


def case_features(folder: Path) -> dict[str, tuple[list[list[float]], list[int]]]:
    """Per split: ``[log1p(lesion voxels), median CT in the lesions]`` and the labels."""
    manifest = load_manifest(manifest_in(folder))
    out: dict[str, tuple[list[list[float]], list[int]]] = {}
    for case in manifest.cases:
        if TASK not in case.labels or MASK_TASK not in case.labels:
            continue
        mask = np.asarray(nib.load(folder / str(case.labels[MASK_TASK])).dataobj) > 0
        ct = np.asarray(nib.load(folder / str(case.images["ct"])).dataobj, dtype=float)
        volume = float(mask.sum())
        intensity = float(np.median(ct[mask])) if volume else 0.0
        features, labels = out.setdefault(case.split, ([], []))
        features.append([float(np.log1p(volume)), intensity])
        labels.append(int(case.labels[TASK] == POSITIVE))
    return out


def main() -> None:
    """Fit on the pooled train cases, print the test accuracy of each feature set as JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--sites", type=Path, required=True)
    args = parser.parse_args()
    pooled: dict[str, tuple[list[list[float]], list[int]]] = {}
    for folder in sorted(p for p in args.sites.iterdir() if p.is_dir()):
        for split, (features, labels) in case_features(folder).items():
            all_features, all_labels = pooled.setdefault(split, ([], []))
            all_features += features
            all_labels += labels
    train_x, train_y = np.array(pooled["train"][0]), np.array(pooled["train"][1])
    test_x, test_y = np.array(pooled["test"][0]), np.array(pooled["test"][1])
    result: dict[str, object] = {
        "train_cases": len(train_y),
        "test_cases": len(test_y),
        "test_majority": float(max(test_y.mean(), 1 - test_y.mean())),
    }
    for name, columns in {"volume": [0], "intensity": [1], "volume+intensity": [0, 1]}.items():
        model = LogisticRegression(max_iter=1000).fit(train_x[:, columns], train_y)
        result[name] = {
            "train_accuracy": float(model.score(train_x[:, columns], train_y)),
            "test_accuracy": float(model.score(test_x[:, columns], test_y)),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
