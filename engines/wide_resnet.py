"""Wide ResNet-50-2 up to layer3, in torchvision's key layout.

CSAD feeds its segmentation decoder with layers 1 and 3 and its LGST teacher with layers 2 and 3,
so layer4 and the classifier are never built: they would be a quarter of the FLOPs for nothing.
Names match torchvision so its checkpoints load after dropping ``layer4.*`` and ``fc.*``.
"""

from __future__ import annotations

import torch
from torch import nn

WIDTH_FACTOR = 2
LAYERS = (3, 4, 6)  # blocks in layer1..layer3 (layer4 would be 3 more)
PLANES = (64, 128, 256)
EXPANSION = 4
STRIDE_OF_LAYER = {1: 4, 2: 8, 3: 16}


class Bottleneck(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        width = planes * WIDTH_FACTOR
        cout = planes * EXPANSION
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class WideResNet50Features(nn.Module):
    """WRN50-2 stem and layers 1–3, returning the maps at the requested output strides."""

    def __init__(self, strides: tuple[int, ...] = (4, 8, 16)):
        super().__init__()
        layer_of = {s: layer for layer, s in STRIDE_OF_LAYER.items()}
        unknown = [s for s in strides if s not in layer_of]
        if unknown:
            raise ValueError(
                f"wide_resnet50_2 has no tap at stride {unknown}; use {list(layer_of)}"
            )
        self.strides = tuple(strides)
        self._layers_of_taps = tuple(layer_of[s] for s in strides)
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = 64
        for index, (blocks, planes) in enumerate(zip(LAYERS, PLANES, strict=True), start=1):
            stride = 1 if index == 1 else 2
            layer = [Bottleneck(cin, planes, stride)]
            cin = planes * EXPANSION
            layer += [Bottleneck(cin, planes, 1) for _ in range(blocks - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*layer))

    @staticmethod
    def channels_at(stride: int) -> int:
        layer = {s: i for i, s in STRIDE_OF_LAYER.items()}[stride]
        return PLANES[layer - 1] * EXPANSION

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outputs: dict[int, torch.Tensor] = {}
        for index in range(1, max(self._layers_of_taps) + 1):
            x = getattr(self, f"layer{index}")(x)
            outputs[index] = x
        return tuple(outputs[layer] for layer in self._layers_of_taps)


def select_torchvision_keys(
    state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Keep the tensors of a torchvision WRN50-2 checkpoint that this truncated model has."""
    return {k: v for k, v in state.items() if k in target}
