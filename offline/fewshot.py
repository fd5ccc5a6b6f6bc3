"""k-shot curves of the training-free branch: how good is it from 1, 2, 4, 8 good images?

Paper 002's setting: no weights are trained, only a pretrained backbone and k good images. For
each k the first k training images fill the branch's bank, then every test image is scored and
the image AUROC (overall, per anomaly type) and F1-max are reported. The first k images, not a
random draw, so that a curve is reproducible and each k's shots include the previous k's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lineguard.engines.banks import FewShotBank, fewshot_descriptors
from lineguard.engines.errors import ConfigError
from lineguard.engines.input_size import parse_input_size
from lineguard.engines.model import CSADModel, ModelConfig
from lineguard.offline.datasets import load_image, open_dataset
from lineguard.offline.evaluate import EvaluationError, auroc, f1_max


@torch.no_grad()
def fewshot_curve(
    data_dir: Path | str,
    shots: Sequence[int] = (1, 2, 4, 8),
    *,
    backbone: str = "efficientnet_lite0",
    input_size: int | tuple[int, int] = 256,
    batch: int = 16,
    log: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Metrics of the few-shot branch alone for each k in ``shots``."""
    dataset = open_dataset(data_dir)
    if not dataset.test:
        raise EvaluationError(f"{data_dir} has no test split: the curve needs labelled tests")
    if max(shots) > len(dataset.train) or min(shots) < 1:
        raise ConfigError(f"shots {list(shots)} must be in 1..{len(dataset.train)}")
    test = list(dataset.test)
    y = np.array([s.label for s in test])
    types = np.array([s.anomaly_type for s in test])
    size = parse_input_size(input_size)
    log(f"reading {len(test)} test images")
    images = np.stack([load_image(s.path, size) for s in test])
    shots_images = np.stack([load_image(s.path, size) for s in dataset.train[: max(shots)]])
    model = CSADModel(ModelConfig(backbone=backbone, input_size=size)).eval()

    def taps(chunk: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        f = model.backbone(model.preprocess(torch.from_numpy(chunk)))
        return f[1], f[2]

    # the backbone runs once per image; only the bank changes with k
    tests = [taps(images[i : i + batch]) for i in range(0, len(images), batch)]
    shot_desc = fewshot_descriptors(*taps(shots_images))
    rows = []
    for k in sorted(shots):
        bank = FewShotBank(shot_desc.shape[-1], k, (size[0] // 8, size[1] // 8))
        info = bank.fit(shot_desc[:k])
        scores = [bank(f8, f16).numpy() for f8, f16 in tests]
        s = np.concatenate(scores).astype(np.float64)
        good = y == 0
        row = {
            "shots": k,
            "auroc": auroc(y, s),
            "f1_max": f1_max(y, s),
            "by_type": {
                t: auroc(y[good | (types == t)], s[good | (types == t)])
                for t in sorted(set(types[~good]))
            },
            "masking": bool(info["masking"]),
            "foreground_fraction": info["foreground_fraction"],
        }
        log(f"k={k}: AUROC {row['auroc']:.3f}, F1-max {row['f1_max']:.3f}")
        rows.append(row)
    return {"dataset": str(Path(data_dir).resolve()), "backbone": backbone, "curve": rows}
