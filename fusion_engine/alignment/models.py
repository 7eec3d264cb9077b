"""Small reference architectures with the names the spec builders expect (tests, benchmarks, examples).

* :func:`resnet20` — the CIFAR ResNet-20 of He et al. (3 stages × 3 basic blocks, 16·w/32·w/64·w
  channels, projection shortcuts where the shape changes), torchvision names, any width multiplier.
* :func:`vgg` — a VGG-style CNN (conv-BN-ReLU stacks with max pooling, a Linear classifier).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: ``conv1``/``bn1`` stem, ``layer1..3`` of basic blocks, global pooling, ``fc``."""

    def __init__(self, blocks_per_stage: int = 3, width: int = 1, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        c = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, c[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c[0])
        c_in = c[0]
        for s, (c_out, stride) in enumerate(zip(c, (1, 2, 2)), start=1):
            layers = []
            for b in range(blocks_per_stage):
                layers.append(BasicBlock(c_in, c_out, stride if b == 0 else 1))
                c_in = c_out
            setattr(self, f"layer{s}", nn.Sequential(*layers))
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet20(width: int = 1, num_classes: int = 10, *, seed: int | None = None) -> ResNet:
    """ResNet-20 (3 blocks per stage) at ``width`` × the standard 16/32/64 channels."""
    if seed is not None:
        torch.manual_seed(seed)
    return ResNet(3, width, num_classes)


class VGG(nn.Module):
    """``features`` (conv 3×3 – BN – ReLU, "M" = 2×2 max pool) then ``classifier`` (flatten, Linear – ReLU – Linear)."""

    def __init__(self, channels=(16, "M", 32, "M", 64, 64, "M"), *, in_channels: int = 3, image_size: int = 32,
                 hidden: int = 64, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        c, size = in_channels, image_size
        for v in channels:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c * size * size, hidden), nn.ReLU(),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def vgg(channels=(16, "M", 32, "M", 64, 64, "M"), *, seed: int | None = None, **kwargs) -> VGG:
    """A small VGG-style CNN (see :class:`VGG`), initialised from ``seed``."""
    if seed is not None:
        torch.manual_seed(seed)
    return VGG(channels, **kwargs)
