"""Bring your own model and data to the commands: --model / --data and their options, end to end."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import attacks
from conftest import make_blobs
from train_fixtures import assert_one_line_error, isolated, run_cli  # noqa: F401  (fixtures)


class Outside(nn.Module):
    """A classifier built outside robustcnn, trained on normalized inputs (so it needs --mean/--std)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(),
                                 nn.Linear(6 * 7 * 7, 4))

    def forward(self, x):
        return self.net(x)


MEAN, STD = 0.3, 0.2


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """(folder, exported program path, .npz path, uint8 images, labels) of a quickly trained outside model."""
    root = tmp_path_factory.mktemp("byo")
    torch.manual_seed(0)
    x, y = make_blobs(256, seed=1, size=28)
    model = Outside()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(model((x - MEAN) / STD), y).backward()
        opt.step()
    model.eval()
    program = torch.export.export(model, (torch.rand(2, 1, 28, 28),), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(program, str(root / "outside.pt2"))
    xt, yt = make_blobs(40, seed=2, size=28)
    images = (xt * 255).round().to(torch.uint8)
    np.savez(root / "test.npz", x=images[:, 0].numpy(), y=yt.numpy())
    torch.save(model.state_dict(), root / "weights.pt")
    (root / "outside_pkg.py").write_text(textwrap.dedent("""
        from torch import nn

        def build():
            model = nn.Module()
            model.net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(),
                                      nn.Linear(6 * 7 * 7, 4))
            model.forward = model.net.forward
            return model
    """))
    return root, images, yt


def test_report_on_an_outside_model_equals_evaluate(outside, isolated):
    root, images, labels = outside
    out = isolated / "rep"
    result = run_cli("report", "--model", str(root / "outside.pt2"), "--mean", str(MEAN), "--std", str(STD),
                     "--data", str(root / "test.npz"), "--attacks", "fgsm,pgd", "--eps", "0.05,0.15", "-n", "32",
                     "--out", str(out), "--device", "cpu", "--seed", "3", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    for f in ("report.json", "report.md", "report.html", "accuracy_vs_eps.png"):
        assert (out / f).stat().st_size > 0, f
    assert doc["model"]["source"]["kind"] == "export"
    assert doc["model"]["source"]["wrapper"]["normalize"]["mean"] == pytest.approx([MEAN])
    import robustcnn

    model, _ = robustcnn.load_model(root / "outside.pt2", mean=[MEAN], std=[STD])
    x, y = images[:32].float() / 255, labels[:32]
    assert doc["clean_accuracy"] > 0.8
    for r in doc["results"]:
        rep = attacks.evaluate(model, (x, y), [attacks.FGSM(eps=r["eps"]), attacks.PGD(eps=r["eps"])], seed=3,
                               device="cpu")
        assert r["per_sample"]["robust"] == rep.robust.tolist()
        assert r["robust_accuracy"] == pytest.approx(rep.robust_accuracy)


def test_attack_and_eval_take_a_factory_and_an_image_folder(outside, isolated, monkeypatch):
    from PIL import Image

    root, images, labels = outside
    monkeypatch.syspath_prepend(str(root))
    folder = isolated / "imgs"
    for i, (img, label) in enumerate(zip(images[:12], labels[:12])):
        (folder / f"c{int(label)}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy(), "L").save(folder / f"c{int(label)}" / f"{i}.png")
    model_args = ("--model", "outside_pkg:build", "--weights", str(root / "weights.pt"), "--mean", str(MEAN),
                  "--std", str(STD))
    result = run_cli("eval", *model_args, "--data", str(folder), "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["accuracy"] > 0.8
    result = run_cli("attack", *model_args, "--data", str(folder), "--method", "fgsm", "--eps", "0.1",
                     "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr


def test_bad_model_and_data_options_exit_with_one_line(outside, isolated):
    root, _, _ = outside
    (isolated / "junk.pt").write_bytes(b"junk" * 10)
    npz = str(root / "test.npz")
    model = str(root / "outside.pt2")
    cases = [
        (("--model", str(isolated / "junk.pt"), "--data", npz), 1, "neither a TorchScript file"),
        (("--model", model, "--data", str(isolated / "nothing.npz")), 1, "data not found"),
        (("--model", model, "--data", npz, "--image-size", "16"), 1, "takes 1x28x28 images"),
        (("--model", model, "--mean", "0.1,0.2", "--std", "0.1", "--data", npz), 2, "one value per channel"),
        (("--model", model, "--mean", "x", "--std", "0.1", "--data", npz), 2, "--mean must be comma-separated"),
        (("--model", model), 2, "--data is needed"),
        (("--model", model, "--checkpoint", model, "--data", npz), 2, "not both"),
    ]
    for args, code, message in cases:
        out = isolated / f"rep{code}{len(args)}"
        result = run_cli("report", *args, "--attacks", "fgsm", "--eps", "0.1", "-n", "8", "--out", str(out),
                         "--device", "cpu")
        assert message in assert_one_line_error(result, code), (args, result.stderr)
        assert not out.exists(), args  # nothing written


def test_eval_takes_the_first_n_images(outside, isolated):
    root, images, labels = outside
    model_args = ("--model", str(root / "outside.pt2"), "--mean", str(MEAN), "--std", str(STD),
                  "--data", str(root / "test.npz"), "--device", "cpu")
    import robustcnn

    model, _ = robustcnn.load_model(root / "outside.pt2", mean=[MEAN], std=[STD])
    with torch.no_grad():
        right = (model(images.float() / 255).argmax(1) == labels).tolist()
    for flag, n in (("-n", 7), ("--limit", 13), ("--n", 40)):
        result = run_cli("eval", *model_args, flag, str(n), "--json")
        assert result.exit_code == 0, result.stderr
        doc = json.loads(result.stdout)
        assert doc["count"] == n
        assert doc["accuracy"] == pytest.approx(sum(right[:n]) / n)
    result = run_cli("eval", *model_args, "-n", "9")
    assert result.exit_code == 0 and "(9 images)" in result.stdout
    for bad in ("0", "-3", "x"):
        line = assert_one_line_error(run_cli("eval", *model_args, "-n", bad), 2)
        assert "-n" in line, line


def test_report_names_every_file_it_wrote(outside, isolated):
    root, _, _ = outside
    out = isolated / "rep"
    result = run_cli("report", "--model", str(root / "outside.pt2"), "--mean", str(MEAN), "--std", str(STD),
                     "--data", str(root / "test.npz"), "--attacks", "fgsm", "--eps", "0.1", "-n", "8",
                     "--out", str(out), "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("report written to"))
    named = set(line.split("(", 1)[1].rstrip(")").split(", "))
    assert named == {p.name for p in out.iterdir()}
