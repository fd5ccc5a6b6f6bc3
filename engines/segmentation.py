"""Component segmentation head: a DeepLabV3+-style decoder over frozen backbone features.

CSAD's Patch Histogram branch counts pixels per component class, so the head has to get
component boundaries right at input resolution while staying cheap. DeepLabV3+ does that with
ASPP context on the coarse (stride-16) map and a skip from the fine (stride-4) map. Widths come
from the model profile, so the ``lite`` profile is a fraction of the paper's 256-channel head.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: parallel dilated convs plus an image-level branch."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, ...] = (6, 12, 18)):
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(cin, cout, 1)] + [conv_bn_relu(cin, cout, 3, r) for r in rates]
        )
        self.pool = conv_bn_relu(cin, cout, 1)
        self.project = conv_bn_relu(cout * (len(rates) + 2), cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        # The image-level branch is a 1×1 map broadcast back: expand instead of interpolating so
        # the exported graph has no resize of a dynamic-size tensor.
        pooled = self.pool(x.mean(dim=(2, 3), keepdim=True))
        outs.append(pooled.expand(-1, -1, x.shape[2], x.shape[3]))
        return self.project(torch.cat(outs, dim=1))


class SegmentationHead(nn.Module):
    """Class logits at input resolution from the stride-4 and stride-16 backbone maps."""

    def __init__(self, fine_channels: int, coarse_channels: int, num_classes: int, width: int):
        super().__init__()
        self.num_classes = num_classes
        self.aspp = ASPP(coarse_channels, width)
        self.reduce = conv_bn_relu(fine_channels, max(width // 4, 16), 1)
        self.fuse = nn.Sequential(
            conv_bn_relu(width + max(width // 4, 16), width, 3),
            conv_bn_relu(width, width, 3),
            nn.Conv2d(width, num_classes, 1),
        )

    @torch.no_grad()
    def predict_background_only(self) -> None:
        """Make every pixel background: for products without components (the histogram branch
        then scores a constant instead of the noise of an untrained head)."""
        last = self.fuse[-1]
        assert isinstance(last, nn.Conv2d) and last.bias is not None
        last.weight.zero_()
        last.bias.zero_()
        last.bias[0] = 1.0

    def forward(
        self, fine: torch.Tensor, coarse: torch.Tensor, out_size: tuple[int, int]
    ) -> torch.Tensor:
        context = F.interpolate(
            self.aspp(coarse), size=fine.shape[2:], mode="bilinear", align_corners=False
        )
        logits = self.fuse(torch.cat([context, self.reduce(fine)], dim=1))
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
