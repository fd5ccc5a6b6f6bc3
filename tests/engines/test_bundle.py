"""Bundles: round trip, and every way a bundle can be wrong gives one clear line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lineguard.engines.bundle import Bundle, load_bundle, save_bundle
from lineguard.engines.errors import BundleError
from lineguard.engines.fusion import Calibration
from tests.conftest import random_images, tiny_model


@pytest.fixture()
def bundle_dir(tiny_bundle: Bundle, tmp_path: Path) -> Path:
    """A private copy of the session bundle that a test may damage."""
    return Path(shutil.copytree(tiny_bundle.path, tmp_path / "b"))


def test_round_trip_gives_the_same_scores(tmp_path: Path) -> None:
    model = tiny_model(seed=5)
    calibration = Calibration(model.config.branches, (1.0, 2.0), (0.5, 0.25), 3.0, target_frr=0.01)
    bundle = save_bundle(model, tmp_path / "b", calibration, export_onnx=False)
    again = load_bundle(tmp_path / "b")
    assert again.calibration == calibration and again.config == model.config
    assert again.version == bundle.version and again.version.startswith("efficientnet_lite0-")
    images = torch.from_numpy(random_images(2))
    with torch.inference_mode():
        for a, b in zip(model(images), again.build_model()(images), strict=True):
            torch.testing.assert_close(a, b)


def test_same_content_same_version_and_refuses_overwrite(tmp_path: Path) -> None:
    model = tiny_model(seed=2)
    cal = Calibration.neutral(model.config.branches)
    v1 = save_bundle(model, tmp_path / "a", cal, export_onnx=False).version
    v2 = save_bundle(model, tmp_path / "b", cal, export_onnx=False).version
    assert v1 == v2
    with pytest.raises(BundleError, match="already exists"):
        save_bundle(model, tmp_path / "a", cal, export_onnx=False)
    other = Calibration.neutral(model.config.branches, threshold=5.0)
    assert (
        save_bundle(model, tmp_path / "a", other, export_onnx=False, overwrite=True).version != v1
    )


def test_tampered_file_is_refused(bundle_dir: Path) -> None:
    weights = bundle_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.safetensors does not match its sha256"):
        load_bundle(bundle_dir)


def _edit_manifest(bundle_dir: Path, **changes: object) -> None:
    path = bundle_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def test_unknown_schema_is_refused(bundle_dir: Path) -> None:
    _edit_manifest(bundle_dir, schema_version=99)
    with pytest.raises(BundleError, match=r"schema 99 .* upgrade lineguard"):
        load_bundle(bundle_dir)


def test_missing_file_and_missing_manifest(bundle_dir: Path, tmp_path: Path) -> None:
    (bundle_dir / "calibration.json").unlink()
    with pytest.raises(BundleError, match=r"calibration\.json is missing"):
        load_bundle(bundle_dir)
    with pytest.raises(BundleError, match="manifest"):
        load_bundle(tmp_path)


def test_manifest_cannot_point_outside_the_bundle(bundle_dir: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"x")
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    for name in ("../secret.safetensors", str(secret), "sub/../../secret.safetensors"):
        files = dict(manifest["files"], **{name: "0" * 64})
        _edit_manifest(bundle_dir, files=files)
        with pytest.raises(BundleError, match="outside the bundle"):
            load_bundle(bundle_dir)


def test_symlink_out_of_the_bundle_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    shutil.copy(bundle_dir / "calibration.json", target)
    (bundle_dir / "calibration.json").unlink()
    (bundle_dir / "calibration.json").symlink_to(target)
    with pytest.raises(BundleError, match="link"):
        load_bundle(bundle_dir)


def test_a_pickle_dropped_into_the_bundle_is_never_loaded(bundle_dir: Path) -> None:
    # A pickle that would create a file if anything unpickled it.
    marker = bundle_dir / "pwned"
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    for name in ("model.pt", "model.pth", "model.pkl", "weights.bin"):
        (bundle_dir / name).write_bytes(payload)
    bundle = load_bundle(bundle_dir)
    bundle.build_model()
    assert not marker.exists()


def test_calibration_with_wrong_branches_is_refused(bundle_dir: Path) -> None:
    cal = json.loads((bundle_dir / "calibration.json").read_text())
    cal["branches"] = {"only_one": {"mu": 0, "sigma": 1}}
    (bundle_dir / "calibration.json").write_text(json.dumps(cal))
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(bundle_dir)  # the hash catches it first
    with pytest.raises(BundleError, match="branches"):
        load_bundle(bundle_dir, verify=False)


def test_fused_scores_follow_calibration() -> None:
    cal = Calibration(("a", "b"), (1.0, 0.0), (2.0, 0.5), threshold=1.0, combine="sum")
    contrib = cal.contributions(np.array([[3.0, 1.0]]))
    np.testing.assert_allclose(contrib, [[1.0, 2.0]])
    assert cal.fuse(np.array([[3.0, 1.0]]))[0] == pytest.approx(3.0)  # CSAD: the sum
    strongest = Calibration(("a", "b"), (1.0, 0.0), (2.0, 0.5), threshold=1.0, combine="max")
    assert strongest.fuse(np.array([[3.0, 1.0]]))[0] == pytest.approx(2.0)
    with pytest.raises(BundleError, match="combine"):
        Calibration(("a",), (0.0,), (1.0,), 1.0, combine="mean")
    with pytest.raises(BundleError, match="expects"):
        cal.fuse(np.zeros((2, 3)))


def test_bundle_from_before_a_config_field_existed_still_loads(bundle_dir: Path) -> None:
    import hashlib

    # an older lineguard wrote no position_scale and hashed the config it did write
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    old_config = {k: v for k, v in manifest["model"].items() if k != "position_scale"}
    canonical = json.dumps({"config": old_config, "files": manifest["files"]}, sort_keys=True)
    version = f"{old_config['backbone']}-{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"
    _edit_manifest(bundle_dir, model=old_config, model_version=version)
    bundle = load_bundle(bundle_dir)
    assert bundle.version == version and bundle.config.position_scale is False
    # a config changed after the version was taken is still refused
    _edit_manifest(bundle_dir, model=dict(old_config, position_prior=True))
    with pytest.raises(BundleError, match="tampered"):
        load_bundle(bundle_dir)
