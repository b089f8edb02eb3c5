"""Models from anywhere (robustcnn.loading): TorchScript, torch.export, package.module:factory + weights, wrappers,
and one clear error for each kind of bad input."""

from __future__ import annotations

import textwrap
import uuid
import warnings

import pytest
import torch
from torch import nn

from robustcnn.errors import UsageError
from robustcnn.loading import ModelLoadError, detect_format, load_model, probe


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(4),
                                 nn.Flatten(), nn.Linear(4 * 7 * 7, classes))

    def forward(self, x):
        return self.net(x)


def resnet18_gray() -> nn.Module:
    """torchvision's ResNet-18 for one-channel images and 10 classes (random weights)."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def export_dynamic(model: nn.Module, path, size: int = 28):
    program = torch.export.export(model.eval(), (torch.rand(2, 1, size, size),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    return path


def script(model: nn.Module, path):
    with warnings.catch_warnings():  # torch.jit announces its deprecation
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(model.eval()), str(path))
    return path


def factory_module(tmp_path, monkeypatch, body: str) -> str:
    """Write a module with ``body`` into tmp_path, put it on sys.path, return its (unique) name."""
    name = f"usermodel_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


FACTORY_BODY = """
    from torch import nn

    def build():
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 28 * 28, 10))

    def not_a_module():
        return 42
"""

X = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {"small": SmallCNN().eval(), "resnet18": resnet18_gray().eval()}


@pytest.mark.parametrize("arch", ["small", "resnet18"])
def test_torchscript_and_export_give_the_original_outputs(models, arch, tmp_path):
    model = models[arch]
    with torch.no_grad():
        want = model(X)
    for path, kind in ((script(model, tmp_path / "m.pt"), "torchscript"),
                       (export_dynamic(model, tmp_path / "m.bin"), "export")):  # by content, not extension
        assert detect_format(path) == kind
        loaded, meta = load_model(path)
        assert not loaded.training and meta["source"]["kind"] == kind
        with torch.no_grad():
            assert torch.allclose(loaded(X), want, atol=1e-5)
        if kind == "export":
            assert meta["input_shape"] == (1, 28, 28) and meta["num_classes"] == 10
        loaded.train()  # an exported program cannot switch modes; the wrapper must still accept the calls
        loaded.eval()
        x = X.clone().requires_grad_(True)
        loaded(x).sum().backward()
        assert x.grad.abs().sum() > 0  # gradients reach the input pixels


def test_export_with_a_fixed_batch_is_refused(models, tmp_path):
    program = torch.export.export(models["small"], (torch.rand(2, 1, 28, 28),))
    torch.export.save(program, str(tmp_path / "fixed.pt2"))
    with pytest.raises(ModelLoadError, match="batches of exactly 2.*dynamic_shapes"):
        load_model(tmp_path / "fixed.pt2")


def test_factory_with_a_state_dict(tmp_path, monkeypatch):
    name = factory_module(tmp_path, monkeypatch, FACTORY_BODY)
    import importlib

    reference = importlib.import_module(name).build()
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    model, meta = load_model(f"{name}:build", weights=tmp_path / "w.pt")
    with torch.no_grad():
        assert torch.equal(model(X), reference(X))
    assert meta["source"]["factory"] == f"{name}:build" and meta["source"]["weights_sha256"]
    assert meta["input_shape"] is None and meta["classes"] is None
    # a different wrapper is a different model for reports (resume, folder names)
    _, other = load_model(f"{name}:build", weights=tmp_path / "w.pt", mean=[0.5], std=[0.25])
    assert other["sha256"] != meta["sha256"]


def test_mean_std_wrapper_equals_the_normalized_model(models, tmp_path):
    mean, std = [0.2860], [0.3530]
    path = script(models["small"], tmp_path / "m.pt")
    wrapped, meta = load_model(path, mean=mean, std=std)
    with torch.no_grad():
        assert torch.allclose(wrapped(X), models["small"]((X - mean[0]) / std[0]), atol=1e-6)
    assert meta["source"]["wrapper"]["normalize"]["mean"] == pytest.approx(mean)


class TupleOut(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        logits = self.inner(x)
        return logits, logits.softmax(1)


class DictOut(TupleOut):
    def forward(self, x):
        return {"logits": self.inner(x), "features": x.flatten(1)}


class ProbsOut(TupleOut):
    def forward(self, x):
        return self.inner(x).softmax(1)


def test_outputs_that_are_not_logits(models, tmp_path):
    small = models["small"]
    with torch.no_grad():
        want = small(X)
    tup = script(TupleOut(small), tmp_path / "tuple.pt")
    with pytest.raises(ModelLoadError, match="returns a tuple of 2 items, not a logits tensor"):
        probe(load_model(tup)[0], X)
    with torch.no_grad():
        assert torch.allclose(load_model(tup, output=0)[0](X), want, atol=1e-6)
    dic = script(DictOut(small), tmp_path / "dict.pt")
    with pytest.raises(ModelLoadError, match=r"dict with keys \['features', 'logits'\]"):
        probe(load_model(dic)[0], X)
    with pytest.raises(ModelLoadError, match="'scores' is not among"):
        probe(load_model(dic, output="scores")[0], X)
    assert probe(load_model(dic, output="logits")[0], X) == 10
    probs = script(ProbsOut(small), tmp_path / "probs.pt")
    with pytest.raises(ModelLoadError, match="probabilities.*logits_from_probs"):
        probe(load_model(probs)[0], X)
    model = load_model(probs, logits_from_probs=True)[0]
    with torch.no_grad():
        got = model(X)
    assert torch.allclose(got, want.log_softmax(1), atol=1e-4) and torch.equal(got.argmax(1), want.argmax(1))


def test_bad_model_inputs_each_give_one_clear_error(tmp_path, monkeypatch):
    name = factory_module(tmp_path, monkeypatch, FACTORY_BODY)
    (tmp_path / "noise.pt").write_bytes(b"\x00not a model" * 10)
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "sd.pt")
    torch.save({"0.weight": torch.zeros(4, 1, 5, 5)}, tmp_path / "wrong.pt")
    cases = [
        (dict(spec=tmp_path / "noise.pt"), "neither a TorchScript file, a torch.export program"),
        (dict(spec=tmp_path / "missing.pt"), "model file not found"),
        (dict(spec=tmp_path), "is a folder"),
        (dict(spec=tmp_path / "sd.pt"), "not a robustcnn checkpoint: for a state dict, name its model as"),
        (dict(spec="no_such_pkg_xyz.models:build"), "cannot import 'no_such_pkg_xyz.models'"),
        (dict(spec=f"{name}:nope"), "has no function 'nope'"),
        (dict(spec=f"{name}:not_a_module"), "returned a int, not a torch.nn.Module"),
        (dict(spec=f"{name}:build", weights=tmp_path / "wrong.pt"),
         r"does not fit .*missing 0.bias.*wrong shape 0.weight \(4, 1, 5, 5\) vs \(4, 1, 3, 3\)"),
        (dict(spec=f"{name}:build", weights=tmp_path / "nothing.pt"), "weights file not found"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ModelLoadError, match=message) as info:
            load_model(**kwargs)
        assert "\n" not in str(info.value)
    for kwargs, message in [
        (dict(spec=f"{name}:build", mean=[0.1, 0.2], std=[0.3]), "one value per channel"),
        (dict(spec=f"{name}:build", mean=[0.1]), "mean and std go together"),
        (dict(spec=f"{name}:build", std=[0.1, 0.2], mean=[0.1, 0.2, 0.3]), "one value per channel"),
    ]:
        with pytest.raises(UsageError, match=message):
            load_model(**kwargs)
    # mean/std of the wrong length for the data: one line when the model first sees images
    model, _ = load_model(f"{name}:build", mean=[0.1, 0.2, 0.3], std=[0.3, 0.3, 0.3])
    with pytest.raises(ModelLoadError, match="mean/std give 3 channels but the images have 1"):
        probe(model, X)
    with pytest.raises(ModelLoadError, match=r"fails on images of shape \(3, 28, 28\) \(RuntimeError"):
        probe(model, X.expand(-1, 3, -1, -1))  # a model that fails on the images it is given: one line


class Marker:
    """Unpickling this object would create the marker file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_is_refused_never_executed(tmp_path, monkeypatch):
    name = factory_module(tmp_path, monkeypatch, FACTORY_BODY)
    marker = tmp_path / "executed"
    torch.save({"0.weight": Marker(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ModelLoadError, match="not a plain state dict.*refused"):
        load_model(f"{name}:build", weights=tmp_path / "evil.pt")
    with pytest.raises(Exception, match="not a readable checkpoint"):
        load_model(tmp_path / "evil.pt")
    assert not marker.exists()
    # the same file, unpickled without the guard, does create it: the test's marker works
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_robustcnn_checkpoint_keeps_its_metadata(tmp_path):
    from robustcnn.checkpoint import save_checkpoint
    from robustcnn.models import build_model
    from robustcnn.report import file_sha256

    model = build_model("simple", in_channels=1, image_size=28, num_classes=10, mean=[0.5], std=[0.5])
    meta = {"architecture": "simple", "arch_args": {}, "dataset": "mnist", "input_shape": [1, 28, 28],
            "classes": [str(i) for i in range(10)], "normalization": {"mean": [0.5], "std": [0.5]}}
    path = save_checkpoint(tmp_path / "m.pt", model, meta)
    assert detect_format(path) == "torch-save"
    loaded, got = load_model(path)
    assert got["dataset"] == "mnist" and got["num_classes"] == 10 and got["sha256"] == file_sha256(path)
    with torch.no_grad():
        assert torch.allclose(loaded(X), model.eval()(X), atol=1e-5)
    with pytest.raises(UsageError, match="normalizes its inputs"):
        load_model(path, mean=[0.5], std=[0.5])
    with pytest.raises(UsageError, match="weights apply to a package.module:factory"):
        load_model(path, weights=path)
