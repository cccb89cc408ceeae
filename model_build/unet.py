"""The UNet family: one class whose size is set by a width scale, with a segmentation and a classification head.

    image ─ in ─ down1 ─ down2 ─ down3 ─ down4 (bottleneck) ─ max-pool ─ linear ─▶ class logits
             │      │       │       │           │
             └──────┴───────┴───────┴─ up1..up4 ┘ ─ 1x1 conv ─▶ mask logits

Parameters grow in proportion to the width scale (channels with its square root): about 2.5 M at
width 2 and 9 M at width 7, the sizes of the published latency-vs-accuracy family.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

BASE_CHANNELS_PER_SQRT_WIDTH = 12.8
DEPTH = 4


def base_channels(width_scale: int) -> int:
    """Channels of the first stage; each further stage doubles them."""
    return round(BASE_CHANNELS_PER_SQRT_WIDTH * math.sqrt(width_scale))


class DoubleConv(nn.Sequential):
    """(conv 3x3 ─ BN ─ ReLU) x 2"""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """max-pool 2x2 ─ DoubleConv"""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))


class Up(nn.Module):
    """transposed conv 2x2 (up-sample, halve channels) ─ concat skip ─ DoubleConv"""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, 2, stride=2)
        self.conv = DoubleConv(in_channels // 2 + out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """UNet of depth 4 with a multi-label classification head on the bottleneck.

    Returns (class_logits [N, labels], mask_logits [N, labels + 1, H, W]); H and W must be
    multiples of 16.
    """

    def __init__(self, width_scale: int, num_labels: int, in_channels: int = 3) -> None:
        super().__init__()
        if not 1 <= width_scale <= 16:
            raise ValueError(f"width_scale must be in 1..16, got {width_scale}")
        channels = [base_channels(width_scale) * 2**i for i in range(DEPTH + 1)]
        self.inc = DoubleConv(in_channels, channels[0])
        self.downs = nn.ModuleList(Down(a, b) for a, b in itertools.pairwise(channels))
        self.ups = nn.ModuleList(Up(b, a) for a, b in reversed(list(itertools.pairwise(channels))))
        self.mask_head = nn.Conv2d(channels[0], num_labels + 1, 1)
        # Global max pooling: a shape anywhere lights its features up, where an average dilutes a small one.
        self.class_head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(channels[-1], num_labels))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skips = [self.inc(image)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        bottleneck = x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.class_head(bottleneck), self.mask_head(x)


class Probabilities(nn.Module):
    """What is exported: the UNet with its logits turned into probabilities (without the mask's when the UNet
    was trained without masks: its mask head learnt nothing)."""

    def __init__(self, unet: UNet, with_mask: bool = True) -> None:
        super().__init__()
        self.unet = unet
        self.with_mask = with_mask

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        class_logits, mask_logits = self.unet(image)
        if not self.with_mask:
            return (torch.sigmoid(class_logits),)
        return torch.sigmoid(class_logits), torch.softmax(mask_logits, dim=1)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
