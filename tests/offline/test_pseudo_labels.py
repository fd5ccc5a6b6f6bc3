"""Component clustering (stage 1 of train): which cues decide the classes."""

from __future__ import annotations

import numpy as np

from lineguard.offline.pseudo_labels import (
    EXTRA_BLOCKS,
    balance_blocks,
)

DEEP = 320  # lite0's last stage: the pooled deep features are this many columns


def _components(
    rng: np.random.Generator,
    n: int,
    look: np.ndarray,
    colour: tuple[float, float, float],
    log_area: float,
    shape: tuple[float, float],
) -> np.ndarray:
    """``n`` components that look alike to the backbone (``look`` + noise), of one colour,
    size and shape (log-elongation, fill)."""
    deep = look + rng.normal(0.0, 0.02, (n, DEEP))
    deep /= np.linalg.norm(deep, axis=1, keepdims=True)
    lab = np.asarray(colour) + rng.normal(0.0, 0.02, (n, 3))
    area = log_area + rng.normal(0.0, 0.05, (n, 1))
    form = np.asarray(shape) + rng.normal(0.0, 0.05, (n, 2))
    return np.concatenate([deep, lab, area, form], axis=1).astype(np.float32)


def _blocks_and_cables(n: int) -> np.ndarray:
    """A grey block in every image and a cable whose colour is the product variant: red,
    blue or yellow, each in a third of the images (the connectors family)."""
    rng = np.random.default_rng(2)
    block_look, cable_look = rng.normal(0, 1, DEEP) / 18, rng.normal(0, 1, DEEP) / 18
    colours = [(1.6, 2.2, 2.0), (1.2, 1.6, 1.0), (2.4, 1.5, 2.4)]
    third = n // 3
    cables = np.concatenate(
        [_components(rng, third, cable_look, c, -5.0, (1.5, 0.3)) for c in colours]
    )
    blocks = _components(rng, n, block_look, (1.5, 1.5, 1.5), -3.5, (0.2, 0.9))
    return np.concatenate([blocks, cables])


def test_each_cue_gets_its_share_of_the_clustering() -> None:
    x = _blocks_and_cables(90)
    z = balance_blocks(x, (1.0, 2.0, 1.0, 0.5))
    norms, start = [], 0
    for width in (8, *EXTRA_BLOCKS):
        norms.append(float(np.sqrt((z[:, start : start + width] ** 2).sum(axis=1).mean())))
        start += width
    np.testing.assert_allclose(norms, [1.0, 2.0, 1.0, 0.5], rtol=1e-6)
