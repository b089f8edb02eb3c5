"""Data from anywhere (robustcnn.userdata): built-in names, image folders, .npz files, and check_fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from robustcnn.errors import UsageError
from robustcnn.loading import ModelLoadError
from robustcnn.userdata import DataLoadError, check_fit, load_data


def write_folder(root, classes: dict[str, int], size=(12, 10), mode="L"):
    """``root/<class>/<i>.png`` with pixel value 10 * label + i, so tests can tell images apart."""
    from PIL import Image

    for label, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            value = 10 * label + i
            pixels = np.full((size[0], size[1]) + ((3,) if mode == "RGB" else ()), value, dtype=np.uint8)
            Image.fromarray(pixels, mode).save(root / name / f"{i:03d}.png")
    return root


def test_image_folder_classes_order_split_and_limit(tmp_path):
    root = write_folder(tmp_path / "imgs", {"cat": 3, "dog": 1, "emu": 2})
    data = load_data(root)
    assert data.classes == ("cat", "dog", "emu") and data.shape == (1, 12, 10) and data.name == "imgs"
    # round-robin over the classes: the first images of any limit cover every class
    assert data.labels.tolist() == [0, 1, 2, 0, 2, 0]
    assert data.images[:, 0, 0, 0].tolist() == [0, 10, 20, 1, 21, 2]
    assert load_data(root, limit=3).labels.tolist() == [0, 1, 2]
    # classes choose the sub-folders and their label order
    picked = load_data(root, classes="emu,cat")
    assert picked.classes == ("emu", "cat") and picked.labels.tolist() == [0, 1, 0, 1, 1]
    # root/<split>/<class>/... when that sub-folder exists
    write_folder(tmp_path / "split" / "test", {"a": 1, "b": 1})
    write_folder(tmp_path / "split" / "train", {"a": 2, "b": 2})
    assert len(load_data(tmp_path / "split")) == 2 and len(load_data(tmp_path / "split", split="train")) == 4


def test_image_folder_rgb_grayscale_and_resize(tmp_path):
    root = write_folder(tmp_path / "rgb", {"x": 2, "y": 2}, size=(8, 8), mode="RGB")
    data = load_data(root)
    assert data.shape == (3, 8, 8)
    gray = load_data(root, grayscale=True, image_size=28)
    assert gray.shape == (1, 28, 28) and gray.images.dtype == torch.uint8
    assert gray.images[:, 0, 14, 14].tolist() == data.images[:, 0, 0, 0].tolist()  # flat colours keep their value


def test_mixed_sizes_need_image_size(tmp_path):
    root = write_folder(tmp_path / "a", {"x": 1}, size=(8, 8))
    write_folder(tmp_path / "b", {"y": 1}, size=(6, 6))
    (tmp_path / "b" / "y").rename(root / "y")
    with pytest.raises(DataLoadError, match="different sizes.*image_size"):
        load_data(root)
    assert load_data(root, image_size=7).shape == (1, 7, 7)


def test_npz_files(tmp_path):
    g = np.random.default_rng(0)
    x = g.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    y = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "u8.npz", x=x, y=y)
    data = load_data(tmp_path / "u8.npz")
    assert data.shape == (1, 28, 28) and data.classes == ("0", "1", "2") and data.name == "u8"
    assert torch.equal(data.images[:, 0], torch.from_numpy(x)) and data.labels.dtype == torch.int64
    np.savez(tmp_path / "f.npz", x=(x[..., None].repeat(3, -1) / 255.0).astype(np.float32), y=y)
    rgb = load_data(tmp_path / "f.npz", classes="red,green,blue", limit=4)
    assert rgb.shape == (3, 28, 28) and rgb.classes == ("red", "green", "blue") and len(rgb) == 4
    assert torch.equal(rgb.images[:, 1], torch.from_numpy(x[:4]))  # float -> uint8 exactly
    np.savez(tmp_path / "s.npz", x_train=x[:2], y_train=y[:2], x=x, y=y)
    assert len(load_data(tmp_path / "s.npz", split="train")) == 2


def test_bad_data_each_give_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "cls").mkdir()
    np.savez(tmp_path / "nox.npz", images=np.zeros((2, 4, 4), np.uint8), y=np.zeros(2, int))
    np.savez(tmp_path / "big.npz", x=np.full((2, 4, 4), 2.0), y=np.zeros(2, int))
    np.savez(tmp_path / "short.npz", x=np.zeros((2, 4, 4), np.uint8), y=np.zeros(3, int))
    np.savez(tmp_path / "names.npz", x=np.zeros((2, 4, 4), np.uint8), y=np.array([0, 2]))
    (tmp_path / "text.txt").write_text("hello")
    write_folder(tmp_path / "imgs", {"a": 1})
    cases = [
        (dict(spec=tmp_path / "empty"), "holds no images in class sub-folders"),
        (dict(spec=tmp_path / "nox.npz"), "needs arrays 'x' \\(images\\) and 'y' \\(labels\\); it has images, y"),
        (dict(spec=tmp_path / "big.npz"), r"must lie in \[0, 1\]"),
        (dict(spec=tmp_path / "short.npz"), "must be 2 integer labels"),
        (dict(spec=tmp_path / "names.npz", classes="a,b"), "label 2 .* has no name among the 2 classes"),
        (dict(spec=tmp_path / "text.txt"), "neither an image folder nor an .npz file"),
        (dict(spec="fashoin-mnist"), "data not found.*not a built-in dataset"),
        (dict(spec=tmp_path / "imgs", classes="a,zebra"), "no class folder 'zebra'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(DataLoadError, match=message) as info:
            load_data(**kwargs)
        assert "\n" not in str(info.value)
    for kwargs, message in [(dict(spec="shapes", split="val"), "splits train and test"),
                            (dict(spec="shapes", classes="a,b"), "built-in datasets name their own"),
                            (dict(spec="shapes", limit=0), "limit must be > 0"),
                            (dict(spec=tmp_path / "imgs", classes="a,a"), "distinct")]:
        with pytest.raises(UsageError, match=message):
            load_data(**kwargs)


def test_builtin_name(tmp_path):
    data = load_data("shapes", limit=5, image_size=16, grayscale=True)
    assert data.shape == (1, 16, 16) and len(data) == 5 and data.name == "shapes"


def test_check_fit_names_what_does_not_fit(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).eval()
    meta = {"input_shape": (1, 28, 28)}
    rgb = load_data("shapes", limit=4)  # 3x32x32, 6 classes
    with pytest.raises(ModelLoadError, match=r"takes 1x28x28 images, the data has 3x32x32: try grayscale "
                                             r"\(--grayscale\) and image_size=28"):
        check_fit(model, meta, rgb)
    six = load_data("shapes", limit=4, grayscale=True, image_size=28)
    with pytest.raises(ModelLoadError, match="the model has 10 outputs, the data 6 classes"):
        check_fit(model, meta, six)
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 28, 28), np.uint8), y=np.array([0, 1, 12]))
    with pytest.raises(ModelLoadError, match="label 12 is out of range for 10 outputs"):
        check_fit(model, {"input_shape": None}, load_data(tmp_path / "d.npz"))
    np.savez(tmp_path / "ok.npz", x=np.zeros((3, 28, 28), np.uint8), y=np.array([0, 1, 9]))
    assert check_fit(model, {"input_shape": None}, load_data(tmp_path / "ok.npz")) == 10
