"""Normalised-score fusion and the pass/fail threshold.

Branch scores live on unrelated scales (a Mahalanobis distance, a max of a normalised map), so
each is normalised with statistics of good validation images: CSAD's ``z_k = (s_k − μ_k) / σ_k``
with μ, σ the 20–80 % trimmed mean and std, or PSAD's adaptive scaling
``s_k / max(leave-one-out scores)`` (``method="loo_max"``: μ_k = 0, σ_k = that maximum; for
the memory banks the leave-one-out scores are PSAD's, from the training images, see
``lineguard.offline.calibrate``).

The normalised scores are then combined: CSAD sums them (``combine="sum"``); lineguard's default
takes the largest (``combine="max"``), i.e. a part fails when any one detector is sure. With a
branch that is blind to a defect type (the histograms to a dent, the patch bank to a missing
part) the sum adds that branch's noise to the evidence; the max does not. On the seed-1
synthetic tray line (never used for the reported numbers) the max raised image AUROC from
0.946 to 0.952 (logical) and 0.913 to 0.927 (structural) with the same bundle. The threshold is
chosen on good images at a target false-reject rate and stored with the statistics, so a
verdict is reproducible from the bundle.

Which branches are fused is a **recipe**, decided from good images only and stored with the
calibration. ``assembly`` fuses every branch (CSAD: parts with components, where logical
anomalies live). ``surface`` fuses the patch bank alone: a product without components (a tile,
a sheet, a cell) has no layout to break, so the histogram and LGST branches, built for logical
evidence, add only their noise to the bank's — on the magnetic tiles the fused score of all
branches (0.850 image AUROC) was below the patch bank alone (0.886), which is PatchCore's
recipe and what a user would otherwise pick for a surface. ``all`` fuses every branch whatever
the product; a list of branch names fuses those. Branches left out stay in the outputs (and in
``evaluate``'s per-branch table); only the verdict ignores them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from lineguard.engines.errors import BundleError
from lineguard.engines.histogram import trimmed_stats

METHODS = ("trimmed_z", "loo_max")
COMBINES = ("max", "sum")
RECIPES = ("auto", "assembly", "surface", "all")
SURFACE_BRANCHES = ("patch_knn",)


def recipe_exclusions(
    recipe: str, branches: tuple[str, ...], has_components: bool
) -> tuple[str, tuple[str, ...]]:
    """(the recipe applied, the branches it leaves out of the fusion).

    ``recipe`` is ``auto`` (``surface`` where the pseudo-labels found no component, else
    ``assembly``), a named recipe, or a comma-separated list of the branches to fuse. A surface
    without a patch bank keeps every branch: there is nothing better to fall back on.
    """
    if recipe == "auto":
        recipe = "assembly" if has_components else "surface"
    if recipe in ("assembly", "all"):
        return recipe, ()
    if recipe == "surface":
        kept = [b for b in branches if b in SURFACE_BRANCHES]
        if not kept:
            return "assembly", ()
        return recipe, tuple(b for b in branches if b not in kept)
    wanted = [b.strip() for b in recipe.split(",") if b.strip()]
    unknown = sorted(set(wanted) - set(branches))
    if unknown or not wanted:
        raise BundleError(
            f"fusion recipe {recipe!r}: use one of {RECIPES} or branch names from {branches}"
            + (f" (unknown: {unknown})" if unknown else "")
        )
    return ",".join(wanted), tuple(b for b in branches if b not in wanted)


@dataclass(frozen=True)
class Calibration:
    """Per-branch normalisation and the decision threshold on the fused score."""

    branches: tuple[str, ...]
    mu: tuple[float, ...]
    sigma: tuple[float, ...]
    threshold: float
    method: str = "trimmed_z"
    target_frr: float | None = None
    n_images: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    combine: str = "max"
    # Branches whose validation scores were all the same (a Patch Histogram on a surface
    # without components): their normalised score is a constant that carries no evidence but,
    # under max, floors every fused score at it. They stay in the outputs, out of the fusion.
    inert: tuple[str, ...] = ()
    # The fusion recipe (module docstring) and the branches it leaves out of the fusion.
    recipe: str = "all"
    excluded: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        k = len(self.branches)
        unknown = set(self.inert) - set(self.branches)
        if unknown or len(set(self.inert)) >= max(k, 1):
            raise BundleError(
                f"inert branches {self.inert} must be some, not all, of {self.branches}"
            )
        out = set(self.inert) | set(self.excluded)
        if set(self.excluded) - set(self.branches) or len(out) >= max(k, 1):
            raise BundleError(
                f"the fusion leaves out {sorted(out)} of {self.branches}: at least one branch "
                "must be fused"
            )
        if len(self.mu) != k or len(self.sigma) != k:
            raise BundleError(
                f"calibration has {k} branches but {len(self.mu)} μ and {len(self.sigma)} σ"
            )
        if self.method not in METHODS:
            raise BundleError(f"unknown fusion method {self.method!r}; known: {METHODS}")
        if self.combine not in COMBINES:
            raise BundleError(f"unknown combine rule {self.combine!r}; known: {COMBINES}")
        values = (*self.mu, *self.sigma, self.threshold)
        if not all(np.isfinite(values)) or min(self.sigma) <= 0:
            raise BundleError(
                f"calibration values must be finite with σ > 0: μ={self.mu} σ={self.sigma}"
            )

    def thin_evidence(self, enough_above: int = 3) -> str | None:
        """Why the threshold may not hold the target on the line, or None when it should.

        The threshold is the (1 − target) quantile of ``n_images`` good scores; with fewer than
        ``enough_above`` of them above it (e.g. under 300 goods for a 1 % target), the line's
        false-reject rate can land well off the target, and an operator should hear it at
        calibration time, not from the line.
        """
        if not self.target_frr or not self.n_images:
            return None
        above = self.n_images * self.target_frr
        if above >= enough_above:
            return None
        return (
            f"the threshold rests on {self.n_images} validation goods: at a "
            f"{self.target_frr:.1%} target only {above:.1f} of them score above it, so the "
            f"false-reject rate on the line is known only roughly; about "
            f"{math.ceil(enough_above / self.target_frr)} validation goods would pin it down"
        )

    @classmethod
    def neutral(
        cls, branches: tuple[str, ...], threshold: float = 0.0, combine: str = "max"
    ) -> Calibration:
        """Identity normalisation: for untrained bundles in tests and benchmarks."""
        k = len(branches)
        return cls(tuple(branches), (0.0,) * k, (1.0,) * k, threshold, combine=combine)

    def contributions(self, scores: np.ndarray) -> np.ndarray:
        """Normalised per-branch scores ``[B, K]``; the fused score is their row sum."""
        s = np.asarray(scores, dtype=np.float64)
        if s.ndim != 2 or s.shape[1] != len(self.branches):
            raise BundleError(
                f"scores have shape {s.shape}, calibration expects [B, {len(self.branches)}] "
                f"for branches {self.branches}"
            )
        return (s - np.asarray(self.mu)) / np.asarray(self.sigma)

    def combined(self, contributions: np.ndarray) -> np.ndarray:
        """The fused score ``[B]`` from normalised per-branch scores ``[B, K]``."""
        c = np.asarray(contributions, dtype=np.float64)
        active = self.active
        if len(active) < len(self.branches):
            c = c[:, [k for k, b in enumerate(self.branches) if b in active]]
        return c.max(axis=1) if self.combine == "max" else c.sum(axis=1)

    @property
    def active(self) -> tuple[str, ...]:
        """The branches the fused score is made of."""
        return tuple(b for b in self.branches if b not in self.inert and b not in self.excluded)

    def left_out(self) -> dict[str, str]:
        """Each branch outside the fusion, with why."""
        why = {b: "constant on good parts (inert)" for b in self.inert}
        for b in self.excluded:
            why.setdefault(b, f"not in the {self.recipe!r} fusion recipe")
        return why

    def fuse(self, scores: np.ndarray) -> np.ndarray:
        """Raw branch scores ``[B, K]`` → fused scores ``[B]``; a part fails above threshold."""
        return self.combined(self.contributions(scores))

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "combine": self.combine,
            "branches": {
                name: {"mu": mu, "sigma": sigma}
                for name, mu, sigma in zip(self.branches, self.mu, self.sigma, strict=True)
            },
            "threshold": self.threshold,
            "target_frr": self.target_frr,
            "n_images": self.n_images,
            "inert": list(self.inert),
            "recipe": self.recipe,
            "excluded": list(self.excluded),
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibration:
        try:
            branches = tuple(data["branches"])
            return cls(
                branches=branches,
                mu=tuple(float(data["branches"][b]["mu"]) for b in branches),
                sigma=tuple(float(data["branches"][b]["sigma"]) for b in branches),
                threshold=float(data["threshold"]),
                method=str(data.get("method", "trimmed_z")),
                target_frr=None if data.get("target_frr") is None else float(data["target_frr"]),
                n_images=int(data.get("n_images", 0)),
                extra=dict(data.get("extra", {})),
                combine=str(data.get("combine", "max")),
                inert=tuple(str(b) for b in data.get("inert", ())),
                recipe=str(data.get("recipe", "all")),
                excluded=tuple(str(b) for b in data.get("excluded", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(
                f"calibration.json is malformed ({exc!r}): re-run calibration"
            ) from exc


def fit_calibration(
    branches: tuple[str, ...],
    val_scores: np.ndarray,
    target_frr: float = 0.01,
    method: str = "trimmed_z",
    loo_max: np.ndarray | None = None,
    combine: str = "max",
    loo_offset: np.ndarray | None = None,
    recipe: str = "all",
    excluded: tuple[str, ...] = (),
) -> Calibration:
    """Normalisation from good validation scores ``[N, K]`` and the threshold at ``target_frr``.

    The threshold is the (1 − target_frr) quantile of the fused validation scores, so about
    ``target_frr`` of good parts are rejected. With few validation images the quantile is coarse:
    ``n_images`` is stored so a user can see how much evidence stands behind it.
    """
    s = np.asarray(val_scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != len(branches) or s.shape[0] < 2:
        raise ValueError(f"need validation scores [N≥2, {len(branches)}], got {s.shape}")
    if not 0.0 <= target_frr < 1.0:
        raise ValueError(f"target_frr must be in [0, 1), got {target_frr}")
    if method == "trimmed_z":
        stats = [trimmed_stats(s[:, k]) for k in range(s.shape[1])]
        mu, sigma = tuple(m for m, _ in stats), tuple(sd for _, sd in stats)
    elif method == "loo_max":
        if loo_max is None:
            raise ValueError("method 'loo_max' needs the leave-one-out maxima per branch")
        # A branch that publishes an affine map of its raw distance (s = a·d + b) gets μ = b and
        # σ = a·max(LOO), so that (s − μ) / σ is exactly PSAD's d / max(LOO).
        offset = np.zeros(len(branches)) if loo_offset is None else np.asarray(loo_offset)
        mu = tuple(float(v) for v in offset)
        sigma = tuple(max(float(v), 1e-12) for v in np.asarray(loo_max, dtype=np.float64))
    else:
        raise ValueError(f"unknown method {method!r}; known: {METHODS}")
    inert = inert_branches(tuple(branches), s)
    if set(branches) <= set(inert) | set(excluded):
        inert = tuple(b for b in inert if b in excluded)  # the recipe's own branches stay in
    provisional = Calibration(
        tuple(branches), mu, sigma, 0.0, method,
        combine=combine, inert=inert, recipe=recipe, excluded=tuple(excluded),
    )  # fmt: skip
    fused = provisional.fuse(s)
    threshold = float(np.quantile(fused, 1.0 - target_frr, method="higher"))
    return replace(
        provisional, threshold=threshold, target_frr=target_frr, n_images=int(s.shape[0])
    )


def inert_branches(branches: tuple[str, ...], val_scores: np.ndarray) -> tuple[str, ...]:
    """Branches whose good validation scores are all equal (to float precision): they tell
    good parts apart from nothing, so they cannot tell defects from good parts either.
    Decided from good images only; never all of them."""
    s = np.asarray(val_scores, dtype=np.float64)
    spread = s.max(axis=0) - s.min(axis=0)
    scale = np.maximum(np.abs(s).max(axis=0), 1.0)
    flat = tuple(b for b, d, m in zip(branches, spread, scale, strict=True) if d <= 1e-9 * m)
    return flat if len(flat) < len(branches) else ()
