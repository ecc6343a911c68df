"""Improved ResNet (IResNet) backbones of insightface's ``arcface_torch``.

The module tree mirrors ``recognition/arcface_torch/backbones/iresnet.py`` name for name, so a
user's Glint360K ``backbone.pth`` loads with ``strict=True``::

    conv1, bn1, prelu,
    layer{1..4}.{i}.{bn1, conv1, bn2, prelu, conv2, bn3}, layer{1..4}.0.downsample.{0, 1},
    bn2, fc (25088 -> 512), features (BatchNorm1d(512))

Input: (B, 3, 112, 112) aligned face crops in [-1, 1], RGB. Output: (B, 512) embedding, not
normalised (``ArcFaceEncoder`` normalises it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# Blocks per stage. arcface_torch: r18 [2,2,2,2], r34 [3,4,6,3], r50 [3,4,14,3], r100 [3,13,30,3].
ARCHS: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
}
STAGE_WIDTHS = (64, 128, 256, 512)
_BN_EPS = 1e-5


class IBasicBlock(nn.Module):
    """Pre-activation-style residual block: BN-conv3x3-BN-PReLU-conv3x3(stride)-BN (+ shortcut).

    The stride sits on the second convolution, as in arcface_torch.
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=_BN_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels, eps=_BN_EPS)
        self.prelu = nn.PReLU(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels, eps=_BN_EPS)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels, eps=_BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H / stride, W / stride)."""
        out = self.conv1(self.bn1(x))
        out = self.prelu(self.bn2(out))
        out = self.bn3(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """arcface_torch IResNet for 112x112 inputs (7x7 final feature map)."""

    fc_scale = 7 * 7

    def __init__(self, layers: Sequence[int], *, num_features: int = 512, dropout: float = 0.0) -> None:
        super().__init__()
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"IResNet needs 4 positive block counts, got {list(layers)}")
        self.conv1 = nn.Conv2d(3, STAGE_WIDTHS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0], eps=_BN_EPS)
        self.prelu = nn.PReLU(STAGE_WIDTHS[0])
        in_ch = STAGE_WIDTHS[0]
        for stage, (width, blocks) in enumerate(zip(STAGE_WIDTHS, layers), start=1):
            stage_blocks = [IBasicBlock(in_ch, width, stride=2)]
            stage_blocks += [IBasicBlock(width, width) for _ in range(int(blocks) - 1)]
            self.add_module(f"layer{stage}", nn.Sequential(*stage_blocks))
            in_ch = width
        self.bn2 = nn.BatchNorm2d(in_ch, eps=_BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_ch * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=_BN_EPS)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """arcface_torch's initialisation (only matters for ``weights="random"``).

        Convolutions N(0, 0.1); BatchNorm2d weight 1, bias 0; the final BatchNorm1d ``features``
        has its scale fixed at 1 and excluded from training, as in arcface_torch, so the
        embedding scale is set by ``fc`` alone.
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, 112, 112) in [-1, 1] RGB -> (B, num_features), not normalised."""
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 512, 7, 7)
        x = torch.flatten(self.bn2(x), 1)  # (B, 25088)
        x = self.fc(self.dropout(x))
        return self.features(x)


def iresnet(arch: str, **kwargs: float | int) -> IResNet:
    """Build an IResNet by name (``"r18"``, ``"r34"``, ``"r50"``, ``"r100"``)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown IResNet arch {arch!r}; allowed: {sorted(ARCHS)}")
    return IResNet(ARCHS[arch], **kwargs)


def iresnet50(**kwargs: float | int) -> IResNet:
    """IResNet-50 (blocks [3, 4, 14, 3])."""
    return iresnet("r50", **kwargs)


def iresnet100(**kwargs: float | int) -> IResNet:
    """IResNet-100 (blocks [3, 13, 30, 3]); the Glint360K ``backbone.pth`` of OFER/MICA."""
    return iresnet("r100", **kwargs)
