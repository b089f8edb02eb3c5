"""Models: logits of the right shape for every architecture and input shape, normalization inside the model."""

from __future__ import annotations

import pytest
import torch

from robustcnn.errors import UsageError
from robustcnn.models import MODELS, Normalize, arch_defaults, build_model

SHAPES = [(1, 28, 10), (3, 32, 6)]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("channels,size,classes", SHAPES, ids=["1x28x28-10", "3x32x32-6"])
def test_models_map_unit_images_to_logits(name, channels, size, classes):
    torch.manual_seed(0)
    model = build_model(name, in_channels=channels, image_size=size, num_classes=classes,
                        mean=[0.5] * channels, std=[0.25] * channels).eval()
    x = torch.rand(5, channels, size, size)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (5, classes) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert not torch.allclose(logits.softmax(1).sum(1), logits.sum(1))  # raw logits, not probabilities
    assert isinstance(next(iter(model.children())), Normalize)


@pytest.mark.parametrize("name", MODELS)
def test_normalization_is_the_first_layer(name):
    """A model with mean m, std s on x equals the same weights with mean 0, std 1 on (x - m) / s."""
    torch.manual_seed(1)
    model = build_model(name, in_channels=3, image_size=32, num_classes=4, mean=[0.2, 0.4, 0.6], std=[0.5, 0.25, 0.2])
    plain = build_model(name, in_channels=3, image_size=32, num_classes=4, mean=[0, 0, 0], std=[1, 1, 1])
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("normalize.")}
    plain.load_state_dict(state, strict=False)
    model.eval(), plain.eval()
    x = torch.rand(3, 3, 32, 32)
    mean = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1)
    std = torch.tensor([0.5, 0.25, 0.2]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), plain((x - mean) / std), atol=1e-5)
        assert not torch.allclose(model(x), plain(x), atol=1e-3)
    assert torch.equal(model.state_dict()["normalize.mean"].flatten(), mean.flatten())


def test_unknown_model_and_arguments_are_usage_errors():
    with pytest.raises(UsageError, match="did you mean 'resnet'"):
        build_model("resnt", in_channels=1, image_size=28, num_classes=10, mean=[0], std=[1])
    with pytest.raises(UsageError, match="invalid arguments"):
        build_model("vgg", in_channels=1, image_size=28, num_classes=10, mean=[0], std=[1], depth=50)
    with pytest.raises(UsageError, match="std"):
        build_model("simple", in_channels=1, image_size=28, num_classes=10, mean=[0], std=[0])


def test_architecture_arguments_change_the_model():
    small = build_model("vgg", in_channels=1, image_size=28, num_classes=10, mean=[0], std=[1], width=8)
    big = build_model("vgg", in_channels=1, image_size=28, num_classes=10, mean=[0], std=[1], width=16)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(big) > 2 * count(small)
    assert "width" in arch_defaults("resnet") and arch_defaults("lenet5") == {}
