"""Interval bound propagation (Gowal et al., "On the Effectiveness of Interval Bound Propagation for Training
Verifiably Robust Models", 2018).

An input box ``[lower, upper]`` (every pixel within ``eps`` in Linf, clipped to [0, 1]) is pushed through the network
layer by layer, each layer mapping a box to a box that contains all its outputs: affine layers (convolution, linear,
batch norm in eval mode, average pooling) in centre-radius form, ``centre -> layer(centre)``,
``radius -> |layer|(radius)``; monotone ones (ReLU, max pooling, the input normalization) on both ends. A residual
block adds its two branches' boxes. The last linear layer is folded into the margins ``logit_y - logit_j`` (the
paper's elision), which bounds them far tighter than subtracting two logit intervals.

A sample is *verified* when every margin's lower bound is positive: no input in the box can change its class. The
bounds are sound in exact arithmetic; float rounding is far below the margins that count. Supported modules are
those of :mod:`robustcnn.models` (and any ``nn.Sequential`` of them); any other raises a one-line ``ValueError``
naming it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from robustcnn.models import BasicBlock, Classifier, Normalize

Box = tuple[torch.Tensor, torch.Tensor]

#: Layers that are non-decreasing in every input (elementwise activations, max pooling, the input normalization,
#: reshaping, and averaging with non-negative weights): the box's ends map to the output box's ends.
_MONOTONE = (nn.Sigmoid, nn.Tanh, nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
             nn.Flatten, nn.Identity, Normalize)


def _affine(layer: Callable[[torch.Tensor], torch.Tensor], magnitude: Callable[[torch.Tensor], torch.Tensor],
            box: Box) -> Box:
    """An affine layer in centre-radius form: ``layer`` applied to the centre, ``magnitude`` (the layer with
    absolute weights, no bias) to the radius."""
    lower, upper = box
    centre, spread = layer((upper + lower) / 2), magnitude((upper - lower) / 2)
    return centre - spread, centre + spread


def _conv(m: nn.Conv2d, box: Box) -> Box:
    if m.padding_mode != "zeros":
        raise ValueError(f"interval bounds support zero-padded convolutions only, not padding_mode={m.padding_mode!r}")
    return _affine(m, lambda r: F.conv2d(r, m.weight.abs(), None, m.stride, m.padding, m.dilation, m.groups), box)


def _linear(m: nn.Linear, box: Box) -> Box:
    return _affine(m, lambda r: F.linear(r, m.weight.abs()), box)


def _batch_norm(m: nn.BatchNorm2d, box: Box) -> Box:
    """Batch norm as the per-channel affine map it is: running statistics in eval mode; in training mode the
    statistics of the box centres of the batch (running statistics untouched)."""
    lower, upper = box
    centre = (upper + lower) / 2
    if m.training or not m.track_running_stats:
        mean, var = centre.mean(dim=(0, 2, 3)), centre.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = m.running_mean, m.running_var
    scale = torch.rsqrt(var + m.eps)
    shift = -mean * scale
    if m.affine:
        scale, shift = scale * m.weight, shift * m.weight + m.bias
    view = (1, -1, 1, 1)
    return _affine(lambda c: c * scale.view(view) + shift.view(view), lambda r: r * scale.abs().view(view), box)


def _relu(m: nn.ReLU, box: Box) -> Box:
    return torch.relu(box[0]), torch.relu(box[1])  # never in place: the box may be shared


def _dropout(m: nn.Dropout, box: Box) -> Box:
    if m.training and m.p > 0:
        raise ValueError("interval bounds cannot pass a Dropout layer in training mode (p > 0)")
    return box


def _block(m: BasicBlock, box: Box) -> Box:
    body, shortcut = bounds(m.body, box), bounds(m.shortcut, box)
    return bounds(m.act, (body[0] + shortcut[0], body[1] + shortcut[1]))


def _children(m: nn.Module, box: Box) -> Box:
    for stage in stages(m):
        box = bounds(stage, box)
    return box


_RULES: dict[type, Callable[[nn.Module, Box], Box]] = {
    nn.Conv2d: _conv,
    nn.Linear: _linear,
    nn.BatchNorm2d: _batch_norm,
    nn.Dropout: _dropout,
    nn.ReLU: _relu,
    BasicBlock: _block,
}


def stages(model: nn.Module) -> list[nn.Module]:
    """``model`` as the flat list of layers (and residual blocks) its ``forward`` runs in order."""
    if isinstance(model, Classifier):
        return [*stages(model.normalize), *stages(model.features), *stages(model.head)]
    if type(model) is nn.Sequential:
        return [stage for child in model for stage in stages(child)]
    return [model]


def _rule(m: nn.Module) -> Callable[[nn.Module, Box], Box]:
    if isinstance(m, Classifier) or type(m) is nn.Sequential:
        return _children
    if type(m) in _MONOTONE:
        return lambda m, box: (m(box[0]), m(box[1]))
    for kind, rule in _RULES.items():
        if type(m) is kind:
            return rule
    raise ValueError(f"interval bounds do not support the layer {type(m).__name__} (supported: the layers of the "
                     "built-in models, in nn.Sequential or their own Classifier and BasicBlock)")


def check_supported(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the first layer of ``model`` that :func:`bounds` cannot pass (before any work)."""
    for m in stages(model):
        _rule(m)
        if isinstance(m, BasicBlock):
            for part in (m.body, m.shortcut, m.act):
                check_supported(part)


def bounds(model: nn.Module, box: Box) -> Box:
    """Elementwise bounds ``(lower, upper)`` on ``model``'s output for every input in ``box`` (``lower <= upper``,
    both shaped like the input)."""
    return _rule(model)(model, box)


def input_box(x: torch.Tensor, eps: float) -> Box:
    """The Linf ball of radius ``eps`` around ``x``, clipped to the image range [0, 1]."""
    if not 0 <= eps <= 1:
        raise ValueError(f"eps must be in [0, 1] (pixel units), got {eps!r}")
    return (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)


def margin_lower_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Lower bounds on ``logit_y - logit_j`` over the Linf ball of radius ``eps`` around each ``x``: (N, K), 0 in
    column ``y``. The model must end in a linear layer, which is folded into the margins (elision); gradients flow
    (for training)."""
    layers = stages(model)
    last = layers[-1]
    if type(last) is not nn.Linear:
        raise ValueError(f"interval bounds need a model that ends in a linear layer, not {type(last).__name__}")
    box = input_box(x, eps)
    for stage in layers[:-1]:
        box = bounds(stage, box)
    lower, upper = box
    centre, spread = (upper + lower) / 2, (upper - lower) / 2
    weight = last.weight[y].unsqueeze(1) - last.weight.unsqueeze(0)  # (N, K, D): w_y - w_j
    bias = 0.0 if last.bias is None else last.bias[y].unsqueeze(1) - last.bias.unsqueeze(0)
    return torch.einsum("nkd,nd->nk", weight, centre) - torch.einsum("nkd,nd->nk", weight.abs(), spread) + bias


def verified(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, batch_size: int = 500) -> torch.Tensor:
    """Per sample: True when IBP proves that no input within Linf ``eps`` of ``x`` (in [0, 1]) changes the class
    from ``y`` (every margin's lower bound > 0). The model runs in eval mode; its modules' flags are restored."""
    check_supported(model)
    flags = [m.training for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            out = []
            for first in range(0, x.shape[0], batch_size):
                margins = margin_lower_bounds(model, x[first:first + batch_size], y[first:first + batch_size], eps)
                margins = margins.scatter(1, y[first:first + batch_size, None], float("inf"))
                out.append(margins.amin(dim=1) > 0)
    finally:
        for m, f in zip(model.modules(), flags):
            m.training = f
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=x.device)


def verified_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Gowal et al.'s robust loss: cross-entropy of the worst-case logits ``-margin`` (``0`` for class ``y``)."""
    return F.cross_entropy(-margin_lower_bounds(model, x, y, eps), y)
