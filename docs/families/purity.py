"""What the pseudo-labels make of each family's components, on the selection seeds (issue 17).

The Patch Histogram can only count what the pseudo-labels separate: if long and short screws
share a class, a short screw where a long one belongs changes little. This runs stage 1 of
``train`` (mask proposals, component features, clustering; ``offline.pseudo_labels``) on the
good training images of a family's selection seed, as the line sends them (JPEG 90), and
compares every proposed mask with the synthetic line's ground-truth component map
(``render_components``, which training never sees): each mask is given the kind that covers
most of its pixels, and the table counts masks per (true kind, pseudo class). Column 0 is
"dropped" (a cluster seen in fewer than ``alpha`` of the images). The V-measure of the
foreground masks sums it up (1: every kind its own classes and no class shared).

Usage: ``python docs/families/purity.py [--families all|a,b] [--images 120] [--alpha 0.5]``
(two to four minutes per family on two cores, most of it the backbone).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
from sklearn.metrics import v_measure_score

from lineguard.engines.backbones import create_backbone
from lineguard.engines.codec import DEFAULT_FRAME_CODEC, FrameCodec
from lineguard.offline.families_bench import seed_for
from lineguard.offline.pseudo_labels import (
    PseudoLabelConfig,
    cluster_components,
    component_features,
    oversegment,
)
from lineguard.offline.synth import PRODUCTS, make_scene, render, render_components


def confusion(family: str, n: int, config: PseudoLabelConfig, size: int = 256) -> dict:
    seed = seed_for(family, "selection")
    codec = FrameCodec.parse(DEFAULT_FRAME_CODEC)  # the line's frames, as train reads them
    images, truth = [], []
    names: tuple[str, ...] = ()
    for i in range(n):
        scene = make_scene(family, seed, "train", i)
        images.append(codec.round_trip(render(scene, size)))
        comp, scene_names = render_components(scene, size)
        # one kind list for all images (a scene's list holds only the kinds it has)
        names = tuple(sorted(set(names) | set(scene_names[1:])))
        truth.append((comp, scene_names))
    backbone = create_backbone("efficientnet_lite0")
    batch = np.stack(images)
    masks = oversegment(backbone, batch, config)
    features, owner = component_features(backbone, batch, masks)
    classes = cluster_components(features, owner, n, config)
    kinds = []
    for (comp, scene_names), image_masks in zip(truth, masks, strict=True):
        lut = np.array([0, *(names.index(k) + 1 for k in scene_names[1:])])
        kind_map = lut[comp]
        for m in image_masks:
            kinds.append(int(np.bincount(kind_map[m], minlength=len(names) + 1).argmax()))
    kind = np.asarray(kinds)
    table = np.zeros((len(names) + 1, int(classes.max(initial=0)) + 1), int)
    for k, c in zip(kind, classes, strict=True):
        table[k, max(int(c), 0)] += 1
    fg = kind > 0
    return {
        "family": family,
        "seed": seed,
        "kinds": ("background", *names),
        "table": table,
        "masks": len(kind),
        "v_measure": float(v_measure_score(kind[fg], classes[fg])) if fg.any() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", default="all")
    parser.add_argument("--images", type=int, default=120, help="good training images")
    parser.add_argument("--alpha", type=float, default=PseudoLabelConfig.alpha)
    args = parser.parse_args()
    families = list(PRODUCTS) if args.families == "all" else args.families.split(",")
    config = replace(PseudoLabelConfig(), alpha=args.alpha)
    for family in families:
        r = confusion(family, args.images, config)
        print(f"\n{family} (seed {r['seed']}): {r['masks']} masks, V-measure {r['v_measure']:.3f}")
        header = ["dropped", *(f"c{c}" for c in range(1, r["table"].shape[1]))]
        print(f"{'true kind':>14} " + " ".join(f"{h:>7}" for h in header))
        for name, row in zip(r["kinds"], r["table"], strict=True):
            print(f"{name:>14} " + " ".join(f"{v:>7d}" for v in row))


if __name__ == "__main__":
    main()
