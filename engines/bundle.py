"""Model bundles: one directory with everything a line needs to score and decide.

```
bundle/
  manifest.json        schema version, model config, branches, preprocessing, software
                       versions, sha256 of every file below, model version
  model.safetensors    every weight and statistic buffer of the fused model
  calibration.json     fusion normalisation and threshold
  model.onnx           the fused graph with a dynamic batch axis
  engines/             TensorRT engine cache (built on the target GPU; not hashed)
```

Loading verifies before it trusts: the schema version must be one we read, every listed file
must exist under the bundle directory (no absolute paths, no ``..``) with the listed sha256,
and only safetensors and JSON are ever parsed — a pickle dropped into the directory is ignored.

A bundle may be replaced while a worker loads it (``save_bundle(overwrite=True)`` swaps
directories by rename; a deploy flips a ``current`` symlink). The manifest is read through one
open file, the calibration is parsed from the very bytes that were hashed, and the loaded
``Bundle`` remembers which manifest it came from, so ``is_current()`` tells a caller that opens
more files later (the weights, the ONNX graph) whether they still belong to the same bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lineguard.engines.errors import BundleError, ConfigError
from lineguard.engines.fusion import Calibration
from lineguard.engines.model import CSADModel, ModelConfig

SCHEMA_VERSION = 1
READS_SCHEMAS = (1,)
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
CALIBRATION = "calibration.json"
ONNX = "model.onnx"
REPORT = "report"  # for people: what training found (contact sheet of component classes)
ENGINE_CACHE = "engines"
REQUIRED = (WEIGHTS, CALIBRATION)
MAX_JSON_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk. ``version`` identifies the model in every event it scores."""

    path: Path
    manifest: dict[str, Any]
    config: ModelConfig
    calibration: Calibration
    identity: tuple[int, int, int, int] | None = field(default=None, compare=False)
    """(device, inode, size, mtime) of the manifest this bundle was read from."""

    def is_current(self) -> bool:
        """True while ``path`` still holds the manifest this bundle was loaded from.

        False once the directory was swapped (or a symlink flipped) since: files opened from
        ``path`` after that moment belong to another bundle.
        """
        if self.identity is None:
            return True
        try:
            return _identity(os.stat(self.path / MANIFEST)) == self.identity
        except OSError:
            return False

    @property
    def version(self) -> str:
        return str(self.manifest["model_version"])

    @property
    def branches(self) -> tuple[str, ...]:
        return self.config.branches

    @property
    def onnx_path(self) -> Path | None:
        return self.path / ONNX if ONNX in self.manifest["files"] else None

    @property
    def engine_cache(self) -> Path:
        return self.path / ENGINE_CACHE

    def state_dict(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / WEIGHTS))

    def build_model(self) -> CSADModel:
        """The fused model with every tensor from the bundle (no backbone download)."""
        model = CSADModel(self.config, backbone_weights=None)
        state = self.state_dict()
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise BundleError(
                f"bundle {self.path} does not match its model config: missing "
                f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}"
            )
        return model.eval()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _model_version(config: dict[str, Any], files: dict[str, str]) -> str:
    """Content address of the model: same weights, statistics and config → same version.

    Hashed over the config *as written in the manifest*, not as this lineguard would write it,
    so that a bundle saved before ``ModelConfig`` gained a field (which then takes its "off"
    default) still verifies.
    """
    canonical = json.dumps({"config": config, "files": files}, sort_keys=True)
    return f"{config.get('backbone')}-{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"


def _software() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("lineguard", "torch", "numpy", "onnx", "onnxruntime", "safetensors"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def save_bundle(
    model: CSADModel,
    path: str | Path,
    calibration: Calibration,
    *,
    export_onnx: bool = True,
    opset: int = 17,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
    report: dict[str, bytes] | None = None,
) -> Bundle:
    """Write ``model`` and ``calibration`` as a bundle at ``path``, atomically.

    The bundle is assembled in a sibling temporary directory and moved into place at the end,
    so a worker watching ``path`` never sees a half-written bundle. ``report`` files (what
    training found, for people) go under ``report/``: they are not part of the model, so they
    are neither hashed into its version nor needed to load it.
    """
    path = Path(path)
    if calibration.branches != model.config.branches:
        raise ConfigError(
            f"calibration branches {calibration.branches} differ from model branches "
            f"{model.config.branches}"
        )
    if path.exists() and not overwrite:
        raise BundleError(f"{path} already exists: pass overwrite=True or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(staging / WEIGHTS))
        (staging / CALIBRATION).write_text(json.dumps(calibration.to_json(), indent=2))
        for name, data in (report or {}).items():
            if Path(name).name != name or name.startswith("."):
                raise ConfigError(f"report file name {name!r} must be a plain file name")
            (staging / REPORT).mkdir(exist_ok=True)
            (staging / REPORT / name).write_bytes(data)
        if export_onnx:
            from lineguard.engines.export import export_onnx as _export

            _export(model, staging / ONNX, opset=opset)
        files = {
            name: sha256_file(staging / name)
            for name in (WEIGHTS, CALIBRATION, ONNX)
            if (staging / name).exists()
        }
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "model_version": _model_version(model.config.to_json(), files),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": model.config.to_json(),
            "branches": list(model.config.branches),
            "preprocessing": {
                "input": "uint8 [B, H, W, 3] RGB",
                "resize": "bilinear, full frame, not aspect-preserving",
                "input_size": list(model.config.input_size),  # [H, W]
                # the model's own buffers: a bundle keeps the normalisation it was fitted with
                "mean": (model.pixel_mean.flatten() / 255.0).tolist(),
                "std": (model.pixel_std.flatten() / 255.0).tolist(),
            },
            "outputs": {
                "scores": ["B", len(model.config.branches)],
                "anomaly_map": ["B", 1, *model.config.map_size],
                "segmentation": ["B", *model.config.input_size],
            },
            "software": _software(),
            "files": files,
            "extra": extra or {},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if path.exists():
            retired = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(retired)
            staging.rename(path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load_bundle(path)


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read_small(path: Path, what: str) -> tuple[bytes, tuple[int, int, int, int]]:
    """The bytes of a JSON file and the identity of the file they were read from (one open)."""
    try:
        with path.open("rb") as fh:
            st = os.fstat(fh.fileno())
            if st.st_size > MAX_JSON_BYTES:
                raise BundleError(f"{what} {path} is larger than {MAX_JSON_BYTES} bytes")
            return fh.read(MAX_JSON_BYTES + 1), _identity(st)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise BundleError(
            f"{what} {path} is missing: is this a lineguard bundle directory?"
        ) from None


def _parse_json(data: bytes, path: Path, what: str) -> dict[str, Any]:
    if len(data) > MAX_JSON_BYTES:
        raise BundleError(f"{what} {path} is larger than {MAX_JSON_BYTES} bytes")
    try:
        parsed = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{what} {path} is not valid JSON ({exc})") from exc
    if not isinstance(parsed, dict):
        raise BundleError(f"{what} {path} must hold a JSON object")
    return parsed


def _safe_member(root: Path, name: object) -> Path:
    """Resolve a file named in the manifest, refusing anything that leaves the bundle."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise BundleError(f"manifest names an invalid file {name!r}")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or len(pure.parts) != 1:
        raise BundleError(f"manifest file {name!r} points outside the bundle directory")
    member = root / name
    if member.is_symlink() or not member.resolve().is_relative_to(root.resolve()):
        raise BundleError(f"bundle file {name!r} is a link out of the bundle directory")
    return member


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Open and verify a bundle; every failure is one ``BundleError`` line saying what to do."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"bundle {root} does not exist or is not a directory")
    raw_manifest, identity = _read_small(root / MANIFEST, "manifest")
    manifest = _parse_json(raw_manifest, root / MANIFEST, "manifest")
    schema = manifest.get("schema_version")
    if not isinstance(schema, int) or isinstance(schema, bool):
        raise BundleError(f"bundle {root} has no integer schema_version: not a lineguard bundle")
    if schema not in READS_SCHEMAS:
        hint = (
            "upgrade lineguard" if schema > SCHEMA_VERSION else "re-export it with this lineguard"
        )
        raise BundleError(
            f"bundle schema {schema} is not one this lineguard reads "
            f"({list(READS_SCHEMAS)}): {hint}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or any(f not in files for f in REQUIRED):
        raise BundleError(f"bundle manifest must list {list(REQUIRED)} under 'files'")
    calibration_bytes = b""
    for name, expected in files.items():
        member = _safe_member(root, name)
        if not member.is_file():
            raise BundleError(f"bundle file {name} is missing from {root}")
        if name == CALIBRATION:
            # parsed below from these very bytes, so what was verified is what is used
            calibration_bytes = _read_small(member, "calibration")[0]
            digest = hashlib.sha256(calibration_bytes).hexdigest()
        else:
            digest = sha256_file(member) if verify else expected
        if verify and digest != expected:
            raise BundleError(
                f"bundle file {name} does not match its sha256 in the manifest: the file was "
                "changed or corrupted; restore the bundle from its source"
            )
    try:
        config = ModelConfig.from_json(manifest["model"])
    except (KeyError, TypeError) as exc:
        raise BundleError(f"bundle manifest has no valid 'model' section ({exc!r})") from exc
    if manifest.get("model_version") != _model_version(manifest["model"], files):
        raise BundleError("bundle model_version does not match its files and config: tampered?")
    calibration = Calibration.from_json(
        _parse_json(calibration_bytes, root / CALIBRATION, "calibration")
    )
    if calibration.branches != config.branches:
        raise BundleError(f"calibration branches {calibration.branches} ≠ model {config.branches}")
    return Bundle(root, manifest, config, calibration, identity)
