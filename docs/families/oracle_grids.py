"""Which Patch Histogram grids carry logical evidence, on the selection seeds only (issue 17).

The histogram branch can only see what its grids resolve: a swap keeps every class's share of
the image and changes only where it lies. To choose the grids without training (and without
the report seeds), this feeds the branch's own algebra (``engines.histogram``: class shares per
cell, regularised Gaussian, Mahalanobis, trimmed normalisation, sum over grids) the synthetic
line's *ground-truth* component maps instead of the segmentation's, for every family's
selection seed: the best a grid set can do with perfect labels. Kinds that no good part has
(a foreign spring, a button) are mapped to background, so colour and foreign-part subtypes are
invisible to it by construction.

Usage: ``python docs/families/oracle_grids.py [--size 128] [--json OUT]`` (seconds per family).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from lineguard.engines.histogram import class_histograms, fit_gaussian, mahalanobis, trimmed_stats
from lineguard.offline.evaluate import auroc
from lineguard.offline.families_bench import seed_for
from lineguard.offline.synth import PRODUCTS, make_scene, render_components, sample_good, scene_rng

GRID_SETS = ((1,), (2,), (4,), (8,), (1, 2), (1, 4), (1, 2, 4), (1, 2, 4, 8))
COUNTS = {"train": 200, "validation": 100, "test_good": 100, "test_logical": 100}


def _maps(family: str, seed: int, split: str, kinds: list[str], size: int):
    """Ground-truth class maps with the family's good kinds as classes 1…K."""
    out, subtypes = [], []
    for i in range(COUNTS[split]):
        scene = make_scene(family, seed, split, i)
        comp, names = render_components(scene, size)
        lut = np.array([0, *(kinds.index(k) + 1 if k in kinds else 0 for k in names[1:])])
        out.append(lut[comp])
        subtypes.append(scene.subtype)
    return torch.from_numpy(np.stack(out).astype(np.int64)), subtypes


def study(family: str, size: int) -> dict[str, dict]:
    seed = seed_for(family, "selection")
    goods = [sample_good(family, scene_rng(seed, "train", i)) for i in range(30)]
    kinds = sorted({it.kind for s in goods for it in s.items})
    classes = len(kinds) + 1
    train, _ = _maps(family, seed, "train", kinds, size)
    val, _ = _maps(family, seed, "validation", kinds, size)
    good, _ = _maps(family, seed, "test_good", kinds, size)
    bad, subtypes = _maps(family, seed, "test_logical", kinds, size)
    rows = {}
    for grids in GRID_SETS:
        score_good, score_bad = np.zeros(len(good)), np.zeros(len(bad))
        for g in grids:
            mean, inv = (
                torch.from_numpy(a)
                for a in fit_gaussian(class_histograms(train, classes, g, size).numpy())
            )

            def distance(x: torch.Tensor, g: int = g, mean=mean, inv=inv) -> np.ndarray:
                return mahalanobis(class_histograms(x, classes, g, size), mean, inv).numpy()

            mu, sigma = trimmed_stats(distance(val))
            score_good += (distance(good) - mu) / sigma
            score_bad += (distance(bad) - mu) / sigma
        y = np.r_[np.zeros(len(good)), np.ones(len(bad))]
        per = {}
        for st in sorted(set(subtypes)):
            sel = np.array([s == st for s in subtypes])
            per[st] = auroc(
                np.r_[np.zeros(len(good)), np.ones(sel.sum())], np.r_[score_good, score_bad[sel]]
            )
        rows[",".join(map(str, grids))] = {
            "logical": auroc(y, np.r_[score_good, score_bad]),
            "subtypes": per,
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = {family: study(family, args.size) for family in PRODUCTS}
    names = [",".join(map(str, g)) for g in GRID_SETS]
    print("family      " + " ".join(f"{n:>9}" for n in names))
    for family, rows in result.items():
        print(f"{family:<11} " + " ".join(f"{rows[n]['logical']:9.3f}" for n in names))
    means = [np.mean([result[f][n]["logical"] for f in result]) for n in names]
    print(f"{'mean':<11} " + " ".join(f"{m:9.3f}" for m in means))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
