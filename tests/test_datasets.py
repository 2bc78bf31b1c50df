"""Every registered data set reads its real on-disk format, here written small by the tests.

CIFAR-10/100, SVHN and Fashion-MNIST cannot be fetched on this machine, so
each test writes a few images in the exact format torchvision reads
(pickled batches, a MATLAB file, IDX files) and checks what comes out.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metateach.config import DataConfig, NoiseConfig
from metateach.data import build_data, load_dataset
from metateach.errors import ConfigError, DataError

from .conftest import CIFAR10_CLASSES, cifar_batch, write_cifar100, write_svhn

RNG = np.random.default_rng(0)


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 2051, n, h, w) + images.tobytes()
    )
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(
        struct.pack(">II", 2049, n) + labels.tobytes()
    )


def fake_mnist_like(
    root: Path, name: str, n_train: int = 60, n_test: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    images = RNG.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    labels = (np.arange(n_train) % 10).astype(np.uint8)
    write_idx(root / name / "raw", "train", images, labels)
    write_idx(
        root / name / "raw",
        "t10k",
        RNG.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        (np.arange(n_test) % 10).astype(np.uint8),
    )
    return images, labels


def test_fashion_mnist_reads_idx_files(tmp_path: Path) -> None:
    images, labels = fake_mnist_like(tmp_path, "FashionMNIST")
    data = load_dataset("fashion_mnist", str(tmp_path))
    assert data.info.num_classes == 10 and data.info.classes[0] == "t-shirt"
    assert torch.equal(data.train.load(torch.arange(60)), torch.from_numpy(images).unsqueeze(1))
    assert data.train.targets.tolist() == labels.tolist()
    assert len(data.test) == 20


def test_mnist_root_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_mnist_like(tmp_path, "MNIST")
    monkeypatch.setenv("METATEACH_DATA", str(tmp_path))
    bundle = build_data(DataConfig(name="mnist", val_size=10), NoiseConfig())
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (50, 10, 20)
    assert bundle.input_shape == (1, 28, 28)


def test_cifar10_reads_pickled_batches(tmp_path: Path, skip_cifar_checksums: None) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = [cifar_batch(20, "labels", 10) for _ in range(5)]
    for i, batch in enumerate(batches, 1):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    (folder / "test_batch").write_bytes(pickle.dumps(cifar_batch(30, "labels", 10)))
    names = list(CIFAR10_CLASSES)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    data = load_dataset("cifar10", str(tmp_path))
    first = torch.from_numpy(batches[0]["data"][0].reshape(3, 32, 32))
    assert torch.equal(data.train.load(torch.tensor([0]))[0], first)
    assert len(data.train) == 100 and len(data.test) == 30
    assert data.info.classes == tuple(names) and data.info.crop_padding == 4 and data.info.flip


def test_cifar100_reads_fine_labels(tmp_path: Path, skip_cifar_checksums: None) -> None:
    write_cifar100(tmp_path, train=200, test=100)
    bundle = build_data(
        DataConfig(name="cifar100", root=str(tmp_path), val_size=100),
        NoiseConfig(type="symmetric", rate=0.5),
    )
    assert bundle.num_classes == 100 and len(bundle.train) == 100 and len(bundle.val) == 100
    assert torch.bincount(bundle.val.targets, minlength=100).tolist() == [1] * 100
    assert bundle.input_shape == (3, 32, 32)


def test_svhn_reads_matlab_files_and_maps_label_10_to_0(
    tmp_path: Path, skip_svhn_checksums: None
) -> None:
    train_x, train_y = write_svhn(tmp_path, train=40, test=10)["train"]
    data = load_dataset("svhn", str(tmp_path))
    assert data.train.targets.tolist() == [int(v) % 10 for v in train_y.flatten()]
    assert torch.equal(
        data.train.load(torch.tensor([3]))[0], torch.from_numpy(train_x[..., 3]).permute(2, 0, 1)
    )
    assert not data.info.flip  # digits have a handedness


def make_image_tree(
    root: Path, per_class: dict[str, int], size: int = 12, test_per_class: int = 2
) -> None:
    gen = torch.Generator().manual_seed(0)
    for split, count in (("train", None), ("test", test_per_class)):
        for name, n in per_class.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count or n):
                pixels = torch.randint(
                    0, 256, (size, size, 3), generator=gen, dtype=torch.uint8
                ).numpy()
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")


def test_imagefolder_reads_any_class_tree(tmp_path: Path) -> None:
    make_image_tree(tmp_path, {"cat": 12, "dog": 12, "emu": 12})
    bundle = build_data(
        DataConfig(name="imagefolder", root=str(tmp_path), val_size=6), NoiseConfig()
    )
    assert bundle.info.classes == ("cat", "dog", "emu")
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (30, 6, 6)
    assert bundle.input_shape == (3, 12, 12)
    # Statistics are measured on the training split.
    assert torch.allclose(
        bundle.normalize.mean.flatten(),
        bundle.train.images.double().div(255).mean(dim=(0, 2, 3)).float(),
        atol=1e-5,
    )


def test_imagefolder_resizes_on_request(tmp_path: Path) -> None:
    make_image_tree(tmp_path, {"a": 4, "b": 4})
    bundle = build_data(
        DataConfig(name="imagefolder", root=str(tmp_path), val_size=2, image_size=8), NoiseConfig()
    )
    assert bundle.input_shape == (3, 8, 8)


def test_imagefolder_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"imagefolder needs .*train/<class>/<image> files"):
        load_dataset("imagefolder", str(tmp_path))
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "test" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=r"imagefolder .*train.*: Found no valid file"):
        load_dataset("imagefolder", str(tmp_path))


def test_imagefolder_reports_unreadable_and_mismatched_images(tmp_path: Path) -> None:
    make_image_tree(tmp_path, {"a": 3, "b": 3})
    Image.fromarray(np.zeros((5, 7, 3), dtype=np.uint8)).save(tmp_path / "train" / "a" / "odd.png")
    data = load_dataset("imagefolder", str(tmp_path))
    with pytest.raises(DataError, match=r"differ in size .*set data.image_size to resize them"):
        data.train.load(torch.arange(len(data.train)))
    (tmp_path / "train" / "b" / "broken.png").write_bytes(b"not a png")
    data = load_dataset("imagefolder", str(tmp_path))
    last = torch.tensor(
        [len(data.train) - 1]
    )  # files sort by class, then name: b/broken.png is last
    with pytest.raises(DataError, match=r"cannot read image .*broken.png"):
        data.train.load(last)


def test_grey_images_keep_one_channel(tmp_path: Path) -> None:
    for split in ("train", "test"):
        for name in ("x", "y"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((9, 9), 40 * i, dtype=np.uint8)).save(
                    tmp_path / split / name / f"{i}.png"
                )
    data = load_dataset("imagefolder", str(tmp_path))
    images = data.train.load(torch.arange(6))
    assert images.shape == (6, 1, 9, 9) and int(images[2].max()) == 80


def test_image_size_is_only_for_imagefolder() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown option 'image_size' for dataset 'digits' \(data.image_size\)"
    ):
        load_dataset("digits", None, image_size=16)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "mnist",
            r"MNIST not found under data root '.*empty': expected .*MNIST/raw/train-images-idx3-ubyte",
        ),
        ("fashion_mnist", r"FashionMNIST not found under data root"),
        (
            "cifar10",
            r"CIFAR10 not found under data root '.*empty': expected the python version in .*cifar-10-batches-py",
        ),
        ("cifar100", r"CIFAR100 not found under data root"),
        ("svhn", r"SVHN not found under data root '.*svhn'"),
    ],
)
def test_missing_data_names_the_path_and_how_to_get_it(
    tmp_path: Path, name: str, expected: str
) -> None:
    with pytest.raises(DataError, match=expected) as info:
        load_dataset(name, str(tmp_path / "empty"))
    assert "data.download=true" in str(info.value) and "METATEACH_DATA" in str(info.value)
    assert "\n" not in str(info.value)
