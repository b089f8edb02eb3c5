"""Classifier architectures. Every model maps images in [0, 1] of shape (N, C, H, W) to logits (N, K).

The dataset's normalization is the model's first layer (:class:`Normalize`), so attack budgets are always in
pixel units of [0, 1]. Models are built from the dataset's input shape and class count by :func:`build_model`.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch
from torch import nn

from robustcnn.errors import UsageError, check_choice


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean and std are buffers, so they travel with the state_dict."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or not all(s > 0 for s in std):
            raise UsageError(f"normalization needs one mean and one positive std per channel, got {mean} / {std}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """``Normalize -> features -> head``: the common shape of every robustcnn model."""

    def __init__(self, normalize: Normalize, features: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.normalize = normalize
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.head(self.features(self.normalize(x)))


def _conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    """3x3 convolution (no bias) + batch norm + ReLU."""
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _flat_size(features: nn.Module, in_channels: int, image_size: int) -> int:
    """Number of features ``features`` produces for one image (a dry run on zeros)."""
    with torch.no_grad():
        return int(features(torch.zeros(1, in_channels, image_size, image_size)).numel())


def _mlp_head(in_features: int, hidden: Sequence[int], num_classes: int) -> nn.Sequential:
    """Flatten, then fully connected layers with ReLU between them, ending in ``num_classes`` logits."""
    layers: list[nn.Module] = [nn.Flatten()]
    for width in hidden:
        layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True)]
        in_features = width
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


def _simple(in_channels: int, image_size: int, num_classes: int, *, width: int = 32, hidden: int = 128):
    """The classic first CNN: (conv-ReLU-maxpool) x 2, then a fully connected layer."""
    features = nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
    )
    return features, _mlp_head(_flat_size(features, in_channels, image_size), [hidden], num_classes)


def _lenet5(in_channels: int, image_size: int, num_classes: int):
    """LeNet-5 (LeCun et al. 1998) in its common modern form: ReLU and max-pooling, 6-16 filters, 120-84 units."""
    pad = max(0, (32 - image_size) // 2)  # the original works on 32x32; pad smaller images up to it
    features = nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=pad), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
    )
    return features, _mlp_head(_flat_size(features, in_channels, image_size), [120, 84], num_classes)


def _vgg(in_channels: int, image_size: int, num_classes: int, *, width: int = 24, convs: int = 1, dropout: float = 0.0):
    """A small VGG: three stages of ``convs`` 3x3 conv-BN-ReLU layers (width, 2x, 4x channels), each max-pooled."""
    layers: list[nn.Module] = []
    cin = in_channels
    for stage in range(3):
        cout = width * 2**stage
        for _ in range(convs):
            layers += _conv_bn(cin, cout)
            cin = cout
        layers.append(nn.MaxPool2d(2))
    features = nn.Sequential(*layers)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes))
    return features, head


class BasicBlock(nn.Module):
    """Residual block of two 3x3 conv-BN layers; a 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, cout, stride)[:3], nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.act(self.body(x) + self.shortcut(x))


def _resnet(in_channels: int, image_size: int, num_classes: int, *, width: int = 16, blocks: int = 1):
    """A small ResNet: a conv stem, three stages of ``blocks`` residual blocks (width, 2x, 4x; strides 1, 2, 2)."""
    layers: list[nn.Module] = [*_conv_bn(in_channels, width)]
    cin = width
    for stage in range(3):
        cout = width * 2**stage
        for i in range(blocks):
            layers.append(BasicBlock(cin, cout, stride=2 if stage and i == 0 else 1))
            cin = cout
    features = nn.Sequential(*layers)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
    return features, head


_BUILDERS: dict[str, Callable[..., tuple[nn.Module, nn.Module]]] = {
    "simple": _simple,
    "lenet5": _lenet5,
    "vgg": _vgg,
    "resnet": _resnet,
}
MODELS: tuple[str, ...] = tuple(_BUILDERS)


def arch_defaults(name: str) -> dict[str, Any]:
    """The architecture's own keyword arguments and their defaults (stored in checkpoints, so they can change)."""
    params = inspect.signature(_BUILDERS[check_choice("model", name, MODELS)]).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def build_model(
    name: str,
    *,
    in_channels: int,
    image_size: int,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    **arch_args: Any,
) -> nn.Module:
    """Build architecture ``name`` for ``in_channels`` x ``image_size`` x ``image_size`` inputs in [0, 1].

    ``arch_args`` are the architecture's own keyword arguments (e.g. ``width``); unknown ones are refused.
    Parameters are initialised from the global RNG: callers that need reproducibility seed it (see ``train``).
    """
    builder = _BUILDERS[check_choice("model", name, MODELS)]
    if in_channels < 1 or image_size < 8 or num_classes < 2:
        raise UsageError(f"cannot build {name} for {in_channels}x{image_size}x{image_size} images and {num_classes} classes")
    try:
        features, head = builder(in_channels, image_size, num_classes, **{**arch_defaults(name), **arch_args})
    except TypeError as exc:
        raise UsageError(f"invalid arguments {arch_args} for model {name}: {exc}") from None
    return Classifier(Normalize(mean, std), features, head)
