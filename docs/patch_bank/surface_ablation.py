"""What each part of the patch bank's recipe is worth on a surface, with a selection split.

Usage (one heavy job; run under ``nice`` on a shared machine)::

    python docs/patch_bank/surface_ablation.py DATA OUT [--codec raw|png|jpeg:Q]
        [--norm model|imagenet] [--variants cap,capprior,capscale,codecscale@4096,...]

The descriptors (PatchCore's mid-level lite0 taps at 256 px) of the training, validation and
test images are extracted once, as ``lineguard train`` splits them, and cached in OUT. Each
variant then builds a bank (greedy coreset, cached too), scores the test images with exact
nearest neighbours (faiss flat) and reports image AUROC on all test images, on the
**selection** half and on the **report** half. The halves are fixed by a hash of each test
image's path, so a default is chosen on the selection half and the report half says what it
is worth on images that took no part in the choice.

``--norm imagenet`` feeds the backbone torchvision's ImageNet mean and std (lineguard's lite0
normalisation before the fix in ``engines/backbones.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from sklearn.metrics import roc_auc_score

from lineguard.engines.codec import FrameCodec
from lineguard.engines.model import CSADModel, ModelConfig
from lineguard.offline.augment import codec_jitter
from lineguard.offline.banks import PATCH_BANK_CAP, bank_coreset
from lineguard.offline.calibrate import _blur, _relative_spread
from lineguard.offline.datasets import load_image, open_dataset

SIZE = 256
# name: (bank from the codec-jittered copies too, bank cap or None for 10 %, prior, spread);
# "NAME@N" caps the bank at N entries instead
VARIANTS = {
    "cap": (False, PATCH_BANK_CAP, False, False),
    "capprior": (False, PATCH_BANK_CAP, True, False),
    "capscale": (False, PATCH_BANK_CAP, True, True),
    "capcodec": (True, PATCH_BANK_CAP, False, False),
    "codecprior": (True, PATCH_BANK_CAP, True, False),
    "codecscale": (True, PATCH_BANK_CAP, True, True),
    "f10": (False, None, False, False),
    "f10scale": (False, None, True, True),
}


def main() -> None:
    import faiss

    parser = argparse.ArgumentParser()
    parser.add_argument("data", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--codec", default="raw")
    parser.add_argument("--norm", choices=("model", "imagenet"), default="model")
    parser.add_argument("--variants", default="cap,capprior,capscale")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    ds = open_dataset(args.data)
    codec = FrameCodec.parse(args.codec)
    config = ModelConfig(input_size=SIZE, patch_bank=1, patch_descriptor="mid")
    model = CSADModel(config, backbone_weights="imagenet").eval()
    if args.norm == "imagenet":
        model.pixel_mean.copy_(255 * torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        model.pixel_std.copy_(255 * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    @torch.no_grad()
    def describe(images: np.ndarray) -> np.ndarray:
        parts = []
        for i in range(0, len(images), 16):
            x = model.preprocess(torch.from_numpy(images[i : i + 16]))
            d = model.describe_patches(model.backbone(x)).float()
            parts.append(d.permute(0, 2, 3, 1).reshape(d.shape[0], -1, d.shape[1]))
        return torch.cat(parts).numpy()

    def load(samples: list) -> np.ndarray:
        return np.stack([load_image(s.path, SIZE, codec) for s in samples])

    cache = args.out / "descriptors.safetensors"
    if cache.exists():
        z = load_file(str(cache))
        train, val, test, jittered = z["train"], z["val"], z["test"], z["jittered"]
    else:
        t0 = time.perf_counter()
        train_images = load(ds.train)
        train, val, test = (
            describe(train_images),
            describe(load(ds.validation)),
            describe(load(ds.test)),
        )
        jittered = describe(codec_jitter(train_images, np.random.default_rng(7), 1.0))
        save_file({"train": train, "val": val, "test": test, "jittered": jittered}, str(cache))
        print(f"descriptors in {time.perf_counter() - t0:.0f} s", flush=True)
    labels = np.array([0 if s.anomaly_type == "good" else 1 for s in ds.test])
    defects = np.array([s.defect for s in ds.test])
    selection = np.array(
        [
            int(hashlib.md5(str(Path(s.path).relative_to(args.data)).encode()).hexdigest(), 16) % 2
            == 0
            for s in ds.test
        ]
    )
    grid = config.patch_grid

    for name in args.variants.split(","):
        base, _, entries = name.partition("@")  # "codecscale@4096": that recipe, that cap
        with_copies, cap, prior, spread = VARIANTS[base]
        cap = int(entries) if entries else cap
        t0 = time.perf_counter()
        source = np.concatenate([train, jittered[: len(train) // 2]]) if with_copies else train
        patches = source.reshape(-1, source.shape[-1])
        size = int(np.ceil(0.1 * len(patches)))
        size = min(size, cap) if cap else size
        chosen_file = args.out / f"coreset_{len(source)}_{size}.safetensors"
        if chosen_file.exists():
            chosen = load_file(str(chosen_file))["chosen"]
        else:
            owners = torch.arange(len(source)).repeat_interleave(source.shape[1])
            chosen = bank_coreset(torch.from_numpy(patches), owners, size).numpy()
            save_file({"chosen": chosen}, str(chosen_file))
        index = faiss.IndexFlatL2(patches.shape[1])
        index.add(np.ascontiguousarray(patches[chosen]))

        def maps(x: np.ndarray, index: faiss.Index = index) -> torch.Tensor:
            d, _ = index.search(np.ascontiguousarray(x.reshape(-1, x.shape[-1])), 1)
            return torch.from_numpy(np.sqrt(np.maximum(d[:, 0], 0)).reshape(len(x), 1, *grid))

        m = maps(test)
        if prior:
            good = maps(val)
            m = m - _blur(good.mean(dim=0, keepdim=True))
            if spread:
                var = good.square().mean(dim=0, keepdim=True) - good.mean(dim=0, keepdim=True) ** 2
                m = m / _relative_spread(var)
        scores = m.flatten(1).amax(dim=1).numpy()
        row: dict[str, object] = {"variant": name, "bank": int(size), "codec": codec.spec}
        row["norm"] = args.norm
        for part, keep in (("all", np.ones_like(selection)), ("selection", selection)):
            row[part] = round(float(roc_auc_score(labels[keep], scores[keep])), 4)
        row["report"] = round(float(roc_auc_score(labels[~selection], scores[~selection])), 4)
        for defect in sorted(set(defects[labels == 1])):
            keep = (labels == 0) | (defects == defect)
            row[defect] = round(float(roc_auc_score(labels[keep], scores[keep])), 3)
        row["seconds"] = round(time.perf_counter() - t0)
        print(json.dumps(row), flush=True)
        with (args.out / "results.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
