"""Synthetic product lines in the MVTec LOCO AD layout (``lineguard synth``).

Logical anomalies need products that follow rules: which component sits where, how many of
each, in which colour. Real LOCO data is not always at hand (licence, air-gapped CI), so this
package draws such products itself. Each product has component kinds that differ in shape,
colour, texture and size, placed by fixed rules and jittered the way a real line jitters
(pose, per-slot placement, lighting, sensor noise, a textured background).

A scene is first described as plain data (``scene``) and only then drawn (``render``). An
anomaly is therefore an edit of a good scene, and its ground-truth mask is drawn from the same
geometry as the pixels, so masks and images cannot drift apart. Every image is a pure function
of ``(seed, split, index)`` (``writer``): the same seed gives byte-identical PNGs, and a test
image does not change when the training split grows.

Reading order: ``scene`` (the data), ``drawing`` and ``components`` (how parts look),
``product`` and one module per family (``tray``, ``connectors``; ``products`` names them),
``defects`` (structural edits shared by all), ``render``, ``writer``.
"""

from __future__ import annotations

from lineguard.offline.synth.products import PRODUCTS
from lineguard.offline.synth.render import render, render_components, render_masks
from lineguard.offline.synth.scene import LOGICAL_SUBTYPES, STRUCTURAL_SUBTYPES, Scene, SynthSummary
from lineguard.offline.synth.writer import (
    apply_anomaly,
    make_line,
    make_scene,
    sample_good,
    scene_rng,
    summary_dict,
)

__all__ = [
    "LOGICAL_SUBTYPES",
    "PRODUCTS",
    "STRUCTURAL_SUBTYPES",
    "Scene",
    "SynthSummary",
    "apply_anomaly",
    "make_line",
    "make_scene",
    "render",
    "render_components",
    "render_masks",
    "sample_good",
    "scene_rng",
    "summary_dict",
]
