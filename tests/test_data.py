"""Datasets: real-file loading (on small idx files written here), the shapes generator, batch augmentation."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import pytest
import torch

from robustcnn.data import (DATASETS, IDX_FILES, SHAPES, ImageData, augment, channel_stats, load_dataset, make_shapes,
                            to_float)
from robustcnn.errors import DataNotFoundError, UsageError
from train_fixtures import isolated, offline, write_idx  # noqa: F401  (fixtures)


def _fake_idx(n: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("layout", ["flat-gz", "flat-plain", "torchvision"])
def test_idx_files_are_read_from_data_dir(isolated, layout):
    images, labels = _fake_idx()
    root = isolated / "data"
    folder = root / "FashionMNIST" / "raw" if layout == "torchvision" else root
    write_idx(folder, images, labels, train=False, gz=layout == "flat-gz")
    data = load_dataset("fashion-mnist", train=False, data_dir=root, download=False)
    assert data.images.dtype == torch.uint8 and data.images.shape == (20, 1, 28, 28)
    assert torch.equal(data.images[:, 0], images) and torch.equal(data.labels, labels)
    assert data.labels.dtype == torch.int64 and data.classes[0] == "T-shirt/top" and len(data.classes) == 10


def test_gz_files_are_decompressed_once_into_the_cache(isolated, monkeypatch):
    images, labels = _fake_idx()
    write_idx(isolated / "data", images, labels, train=True, gz=True)
    load_dataset("fashion-mnist", train=True, data_dir=isolated / "data", download=False)
    cached = list((isolated / "cache" / "robustcnn").rglob("train-images-idx3-ubyte"))
    assert len(cached) == 1 and cached[0].stat().st_size == 16 + 20 * 28 * 28
    monkeypatch.setattr(gzip, "open", lambda *a, **k: pytest.fail("decompressed a second time"))
    again = load_dataset("fashion-mnist", train=True, data_dir=isolated / "data", download=False)
    assert torch.equal(again.images[:, 0], images)


def _gz_folder(root, images, labels, *, train=True):
    write_idx(root, images, labels, train=train, gz=True)
    return root


def test_a_bad_source_never_poisons_a_good_one(isolated):
    """With the cache keyed by file name, the bad folder's decompressed images stood in for the good folder's."""
    images, labels = _fake_idx(seed=1)
    bad = _gz_folder(isolated / "bad", *_fake_idx(seed=2))
    with gzip.open(bad / "train-images-idx3-ubyte.gz", "wb") as f:  # a header announcing more images than it has
        f.write(struct.pack(">IIII", 0x0803, 60_000, 28, 28) + bytes(100))
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("fashion-mnist", train=True, data_dir=bad, download=False)
    assert str(info.value).startswith(f"{bad / 'train-images-idx3-ubyte.gz'} is unreadable: size mismatch")
    good = _gz_folder(isolated / "good", images, labels)
    data = load_dataset("fashion-mnist", train=True, data_dir=good, download=False)
    assert torch.equal(data.images[:, 0], images) and torch.equal(data.labels, labels)
    # a self-consistent but different source with the same names does not reuse the good one's cache either
    other_images, other_labels = _fake_idx(seed=3)
    other = _gz_folder(isolated / "other", other_images, other_labels)
    assert torch.equal(load_dataset("fashion-mnist", train=True, data_dir=other, download=False).labels,
                       other_labels)


def test_a_truncated_source_is_reported_even_with_a_good_copy_cached(isolated):
    """With the cache keyed by file name, the good folder's cached copy was read in place of the truncated file."""
    good = _gz_folder(isolated / "good", *_fake_idx(seed=1))
    load_dataset("fashion-mnist", train=True, data_dir=good, download=False)
    cut = _gz_folder(isolated / "cut", *_fake_idx(seed=1))
    blob = (cut / "train-images-idx3-ubyte.gz").read_bytes()
    (cut / "train-images-idx3-ubyte.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataNotFoundError, match=r"train-images-idx3-ubyte.gz is unreadable: not a complete gzip"):
        load_dataset("fashion-mnist", train=True, data_dir=cut, download=False)


@pytest.mark.parametrize("gz", [False, True])
def test_a_truncated_plain_or_gz_file_names_the_file_and_the_size(isolated, gz):
    folder = isolated / "data"
    images, labels = _fake_idx()
    write_idx(folder, images[:19], labels, train=False, gz=False)  # 20 labels, 19 images: header says 20
    blob = (folder / "t10k-images-idx3-ubyte").read_bytes()
    (folder / "t10k-images-idx3-ubyte").write_bytes(blob[:4] + struct.pack(">I", 20) + blob[8:])
    if gz:
        (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress((folder / "t10k-images-idx3-ubyte")
                                                                         .read_bytes()))
        (folder / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("mnist", train=False, data_dir=folder, download=False)
    name = "t10k-images-idx3-ubyte" + (".gz" if gz else "")
    assert str(info.value) == (f"{folder / name} is unreadable: size mismatch ({16 + 19 * 784:,} bytes, its header "
                               f"announces {16 + 20 * 784:,}: truncated?); replace or delete it")
    assert not list((isolated / "cache").rglob("t10k-images-idx3-ubyte")), "a corrupt copy was cached"


def test_a_full_size_file_with_other_bytes_fails_the_checksum(isolated):
    folder = isolated / "data"
    write_idx(folder, *_fake_idx(), train=False, gz=False)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x0801, 10_000) + bytes(10_000))
    with pytest.raises(DataNotFoundError, match=r"t10k-labels-idx1-ubyte is unreadable: checksum mismatch"):
        load_dataset("fashion-mnist", train=False, data_dir=folder, download=False)


def test_the_checksum_table_matches_the_installed_fashion_mnist():
    folder = Path("/usr/share/datasets/fashion-mnist")
    if not folder.is_dir():
        pytest.skip("dataset-fashion-mnist is not installed")
    for name, (size, sha) in IDX_FILES["FashionMNIST"].items():
        with gzip.open(folder / f"{name}.gz", "rb") as f:
            blob = f.read()
        assert len(blob) == size and hashlib.sha256(blob).hexdigest() == sha, name


def test_environment_variable_names_the_data_folder(isolated, monkeypatch):
    images, labels = _fake_idx(seed=3)
    write_idx(isolated / "env", images, labels, train=True, gz=False)
    monkeypatch.setenv("ROBUSTCNN_DATA", str(isolated / "env"))
    assert torch.equal(load_dataset("mnist", train=True, download=False).labels, labels)


def test_missing_files_without_download_say_how_to_get_them(isolated):
    with pytest.raises(DataNotFoundError, match=r"--data-dir DIR .*\$ROBUSTCNN_DATA") as info:
        load_dataset("cifar10", train=True, data_dir=isolated / "nothing", download=False)
    assert "\n" not in str(info.value)


def test_missing_files_and_no_network_raise_data_not_found(isolated, offline):
    with pytest.raises(DataNotFoundError, match="download failed") as info:
        load_dataset("mnist", train=False, data_dir=isolated / "empty", download=True)
    assert "\n" not in str(info.value)


def test_corrupt_idx_file_is_reported_not_crashed_on(isolated):
    folder = isolated / "bad"
    write_idx(folder, *_fake_idx(), train=True, gz=False)
    (folder / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(DataNotFoundError, match="unreadable"):
        load_dataset("mnist", train=True, data_dir=folder, download=False)


def test_unknown_dataset_suggests_the_closest_name():
    with pytest.raises(UsageError, match="did you mean 'fashion-mnist'"):
        load_dataset("fashion-mnsit", train=True)
    assert "shapes" in DATASETS


def test_shapes_is_deterministic_balanced_and_varied():
    a, b, c = make_shapes(600, seed=5), make_shapes(600, seed=5), make_shapes(600, seed=6)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (600, 3, 32, 32) and a.images.dtype == torch.uint8 and a.classes == SHAPES
    counts = torch.bincount(a.labels, minlength=len(SHAPES))
    assert counts.min() > 60  # every class present, roughly balanced
    assert a.images.float().std(dim=(2, 3)).mean() > 20  # a shape on a background, not flat colour


def test_channel_stats_match_a_float_computation():
    data = make_shapes(200, seed=1)
    mean, std = channel_stats(data.images)
    x = data.images.double() / 255
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), x.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(torch.tensor(std, dtype=torch.float64), x.std(dim=(0, 2, 3), unbiased=False), atol=1e-5)


def test_to_float_maps_uint8_to_unit_interval():
    x = to_float(torch.tensor([[[[0, 128, 255]]]], dtype=torch.uint8), "cpu")
    assert x.dtype == torch.float32 and x.min() == 0 and x.max() == 1 and abs(float(x[0, 0, 0, 1]) - 128 / 255) < 1e-7


def test_augment_crops_are_shifted_windows_of_the_padded_image():
    images = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).view(2, 1, 6, 6) + 1
    out = augment(images, generator=torch.Generator().manual_seed(0), pad=2, flip=False)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, r:r + 6, c:c + 6] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_augment_flips_about_half_and_is_reproducible():
    images = make_shapes(64, seed=2).images
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    out = augment(images, generator=gen(), pad=0, flip=True)
    flipped = [torch.equal(o, i.flip(2)) and not torch.equal(o, i) for o, i in zip(out, images)]
    kept = [torch.equal(o, i) for o, i in zip(out, images)]
    assert all(f or k for f, k in zip(flipped, kept)) and 16 < sum(flipped) < 48
    assert torch.equal(out, augment(images, generator=gen(), pad=0, flip=True))


def test_image_data_checks_its_tensors():
    with pytest.raises(ValueError, match="uint8"):
        ImageData(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64), ("a", "b"), "x")
    data = ImageData(torch.zeros(5, 1, 4, 4, dtype=torch.uint8), torch.zeros(5, dtype=torch.int64), ("a", "b"), "x")
    assert len(data) == 5 and len(data.subset(3)) == 3 and data.subset(None) is data
