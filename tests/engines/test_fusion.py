"""Calibration: trimmed-z and leave-one-out normalisation, threshold at a target FRR."""

from __future__ import annotations

import numpy as np
import pytest

from lineguard.engines.errors import BundleError
from lineguard.engines.fusion import Calibration, fit_calibration, recipe_exclusions
from lineguard.engines.histogram import trimmed_stats


def test_trimmed_z_calibration_and_threshold() -> None:
    rng = np.random.default_rng(0)
    scores = np.stack([rng.normal(10, 2, 400), rng.normal(0.1, 0.01, 400)], axis=1)
    cal = fit_calibration(("a", "b"), scores, target_frr=0.05)
    assert (cal.mu[0], cal.sigma[0]) == pytest.approx(trimmed_stats(scores[:, 0]))
    rejected = np.mean(cal.fuse(scores) > cal.threshold)
    assert rejected <= 0.05 and rejected >= 0.03
    assert cal.n_images == 400 and cal.target_frr == 0.05
    assert Calibration.from_json(cal.to_json()) == cal


def test_loo_max_calibration() -> None:
    scores = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    cal = fit_calibration(("a", "b"), scores, method="loo_max", loo_max=np.array([4.0, 40.0]))
    assert cal.mu == (0.0, 0.0) and cal.sigma == (4.0, 40.0)
    np.testing.assert_allclose(cal.contributions(scores)[:, 0], [0.25, 0.5, 0.75])
    with pytest.raises(ValueError, match="leave-one-out"):
        fit_calibration(("a", "b"), scores, method="loo_max")


def test_bad_calibration_values_are_refused() -> None:
    with pytest.raises(BundleError, match="σ > 0"):
        Calibration(("a",), (0.0,), (0.0,), 1.0)
    with pytest.raises(BundleError, match="malformed"):
        Calibration.from_json({"branches": {"a": {}}})
    with pytest.raises(ValueError, match="N≥2"):
        fit_calibration(("a",), np.zeros((1, 1)))


def test_a_threshold_on_too_few_goods_says_so() -> None:
    rng = np.random.default_rng(0)
    few = fit_calibration(("a",), rng.normal(0, 1, (100, 1)), target_frr=0.01)
    warning = few.thin_evidence()
    assert warning is not None and "100 validation goods" in warning and "300" in warning
    assert (
        fit_calibration(("a",), rng.normal(0, 1, (300, 1)), target_frr=0.01).thin_evidence() is None
    )
    assert (
        fit_calibration(("a",), rng.normal(0, 1, (100, 1)), target_frr=0.05).thin_evidence() is None
    )
    assert Calibration.neutral(("a",)).thin_evidence() is None  # no target: nothing claimed


def test_a_branch_constant_on_good_parts_is_left_out_of_the_fusion() -> None:
    """A Patch Histogram on a plain surface scores every part the same: under max its
    constant z floored every fused score (tile AUROC 0.886 → 0.876 for patch_knn with it)."""
    rng = np.random.default_rng(0)
    val = np.c_[np.full(50, 0.25), rng.normal(1.0, 0.1, 50), rng.normal(2.0, 0.3, 50)]
    branches = ("patch_hist", "lgst", "patch_knn")
    cal = fit_calibration(branches, val, target_frr=0.02)
    assert cal.inert == ("patch_hist",) and cal.active == ("lgst", "patch_knn")
    test = np.array([[0.25, 0.5, 1.0], [0.25, 1.6, 2.0]])
    z = cal.contributions(test)
    np.testing.assert_allclose(cal.fuse(test), z[:, 1:].max(axis=1))  # not floored at z[:, 0]
    again = Calibration.from_json(cal.to_json())
    assert again.inert == cal.inert and np.allclose(again.fuse(test), cal.fuse(test))
    assert Calibration.from_json({**cal.to_json(), "inert": []}).inert == ()  # old bundles
    # never all of them: a fully constant validation set fuses everything as before
    flat = fit_calibration(branches, np.ones((10, 3)), target_frr=0.1)
    assert flat.inert == ()
    with pytest.raises(BundleError, match="inert"):
        Calibration(branches, (0.0,) * 3, (1.0,) * 3, 0.0, inert=("nope",))


def test_fusion_recipes_choose_the_branches_from_what_the_product_is() -> None:
    branches = ("patch_hist", "lgst", "patch_knn", "hist_knn")
    # an assembly fuses every branch; a surface the patch bank alone (PatchCore's recipe)
    assert recipe_exclusions("auto", branches, has_components=True) == ("assembly", ())
    assert recipe_exclusions("auto", branches, has_components=False) == (
        "surface",
        ("patch_hist", "lgst", "hist_knn"),
    )
    assert recipe_exclusions("all", branches, has_components=False) == ("all", ())
    # without a patch bank a surface has nothing better than all of its branches
    assert recipe_exclusions("surface", ("patch_hist", "lgst"), False) == ("assembly", ())
    assert recipe_exclusions("lgst, patch_knn", branches, True) == (
        "lgst,patch_knn",
        ("patch_hist", "hist_knn"),
    )
    with pytest.raises(BundleError, match="unknown"):
        recipe_exclusions("lgst,nope", branches, True)


def test_branches_left_out_by_the_recipe_do_not_move_the_verdict() -> None:
    rng = np.random.default_rng(1)
    branches = ("patch_hist", "lgst", "patch_knn")
    val = rng.normal(1.0, 0.2, (200, 3))
    cal = fit_calibration(
        branches, val, target_frr=0.05, recipe="surface", excluded=("patch_hist", "lgst")
    )
    assert cal.active == ("patch_knn",)
    test = np.array([[50.0, 50.0, 1.0], [1.0, 1.0, 3.0]])
    z = cal.contributions(test)
    np.testing.assert_allclose(cal.fuse(test), z[:, 2])
    # the threshold is the target quantile of the fused branch alone
    assert cal.threshold == pytest.approx(
        np.quantile(cal.contributions(val)[:, 2], 0.95, method="higher")
    )
    assert cal.left_out() == {
        "patch_hist": "not in the 'surface' fusion recipe",
        "lgst": "not in the 'surface' fusion recipe",
    }
    again = Calibration.from_json(cal.to_json())
    assert again.recipe == "surface" and again.active == cal.active
    # a calibration written before recipes fuses all of its branches, as it did
    old = {k: v for k, v in cal.to_json().items() if k not in ("recipe", "excluded")}
    assert Calibration.from_json(old).active == branches
    with pytest.raises(BundleError, match="at least one branch"):
        Calibration(branches, (0.0,) * 3, (1.0,) * 3, 0.0, excluded=branches)
