"""Data sets, registered by name, read into memory as uint8 image tensors.

Every builder returns an :class:`ImageData`: the training and test pools as
(N, C, H, W) uint8 tensors with integer labels, plus what the rest of the
library needs to know (classes, normalization, augmentation). Torchvision's
own classes read the files; nothing is downloaded unless ``download=True``.

Keeping the images in memory as uint8 is what makes the loader cheap: a
batch is one indexing operation, augmented and normalized as a tensor.
CIFAR-10 takes 180 MB this way, SVHN 230 MB, MNIST 55 MB.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from metateach.errors import DataError
from metateach.registry import DATASETS

__all__ = ["ImageData", "ImagePool", "DatasetInfo", "resolve_root", "load_dataset"]


@dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the library needs to know about a data set."""

    num_classes: int
    #: Per-channel mean and std of the [0, 1] pixels; None: measure on the training split.
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    #: Standard training augmentation: padding of the random crop (0 = none) and mirror flips.
    crop_padding: int = 0
    flip: bool = False
    #: The usual clean validation split taken from the training pool.
    default_val_size: int = 5000
    classes: tuple[str, ...] = ()


@dataclass
class ImagePool:
    """Labels of a pool of images, and how to fetch the images themselves.

    ``load(indices)`` returns the (n, C, H, W) uint8 images at ``indices``.
    Pools held in memory just index; an image folder decodes only the
    files a run uses, so a small subset of a large tree starts fast.
    """

    targets: Tensor
    load: Callable[[Tensor], Tensor]

    @staticmethod
    def from_tensor(images: Tensor, targets: Tensor) -> ImagePool:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        return ImagePool(targets.long(), lambda idx: images[idx])

    def __len__(self) -> int:
        return len(self.targets)


@dataclass
class ImageData:
    """A data set's training and test pools."""

    train: ImagePool
    test: ImagePool
    info: DatasetInfo
    #: Where the data were read from, for messages.
    source: str = ""


def resolve_root(root: str | None) -> Path:
    """The data root: the config's value, else $METATEACH_DATA, else ./data."""
    return Path(root or os.environ.get("METATEACH_DATA") or "data").expanduser()


def load_dataset(
    name: str, root: str | None, download: bool = False, image_size: int | None = None
) -> ImageData:
    """Build the data set registered as ``name`` (see :data:`metateach.registry.DATASETS`)."""
    options = {} if image_size is None else {"image_size": image_size}
    return DATASETS.build(
        name, options, "data.image_size", root=resolve_root(root), download=download
    )


# --------------------------------------------------------------------------- #
# torchvision data sets
# --------------------------------------------------------------------------- #


def _torchvision(
    cls_name: str, root: Path, download: bool, how_to_get: str, **kwargs: object
) -> object:
    """Instantiate a torchvision data set, turning 'not found' into a DataError."""
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    try:
        return cls(root=str(root), download=download, **kwargs)
    except RuntimeError as e:
        if "not found" not in str(e).lower() and "corrupted" not in str(e).lower():
            raise
        raise DataError(
            f"{cls_name} not found under data root {str(root)!r}: {how_to_get}, "
            "point data.root (or $METATEACH_DATA) at the folder that holds it, "
            "or set data.download=true to fetch it"
        ) from None


def _mnist_like(
    cls_name: str, mean: float, std: float, classes: tuple[str, ...]
) -> Callable[[Path, bool], ImageData]:
    def build(root: Path, download: bool) -> ImageData:
        raw = root / cls_name / "raw"
        how = f"expected {raw}/train-images-idx3-ubyte and its three siblings"
        for split in ("train", "t10k"):
            _check_idx_pair(raw / f"{split}-images-idx3-ubyte", raw / f"{split}-labels-idx1-ubyte")
        train = _torchvision(cls_name, root, download, how, train=True)
        test = _torchvision(cls_name, root, download, how, train=False)
        return ImageData(
            train=ImagePool.from_tensor(train.data.unsqueeze(1), train.targets),
            test=ImagePool.from_tensor(test.data.unsqueeze(1), test.targets),
            info=DatasetInfo(10, (mean,), (std,), classes=classes),
            source=str(root / cls_name),
        )

    return build


def _check_idx_pair(images: Path, labels: Path) -> None:
    """Raise :class:`DataError` unless the two IDX files (where present) are whole and agree.

    Torchvision reads a damaged file with a bare assertion or a reshape error;
    this names the file and what is wrong with it.
    """
    if not (images.is_file() and labels.is_file()):
        return  # torchvision says what is missing (or downloads it)
    n_images, n_labels = _idx_length(images, 3), _idx_length(labels, 1)
    if n_images != n_labels:
        raise DataError(
            f"{labels} holds {n_labels} labels for the {n_images} images of {images.name}: the two "
            "files do not belong together; replace them with the originals"
        )


def _idx_length(path: Path, dims: int) -> int:
    """How many items an IDX file of unsigned bytes with ``dims`` dimensions holds, once checked."""
    with open(path, "rb") as f:
        header = f.read(4 + 4 * dims)
    if len(header) < 4 + 4 * dims or header[:4] != bytes((0, 0, 0x08, dims)):
        raise DataError(
            f"{path} is not an IDX file of {dims}-dimensional unsigned bytes: it begins "
            f"{header[:4].hex()}, not 000008{dims:02x}; replace it with the original"
        )
    shape = struct.unpack(f">{dims}I", header[4:])
    expected, size = len(header) + math.prod(shape), path.stat().st_size
    if size != expected:
        raise DataError(
            f"{path} is {size} bytes, but its header describes {' x '.join(map(str, shape))} "
            f"values ({expected} bytes): the file is truncated or damaged; replace it with the original"
        )
    return shape[0]


DATASETS.register("mnist")(_mnist_like("MNIST", 0.1307, 0.3081, tuple(str(i) for i in range(10))))
DATASETS.register("fashion_mnist")(
    _mnist_like(
        "FashionMNIST",
        0.2860,
        0.3530,
        (
            "t-shirt",
            "trouser",
            "pullover",
            "dress",
            "coat",
            "sandal",
            "shirt",
            "sneaker",
            "bag",
            "boot",
        ),
    )
)


def _cifar(
    cls_name: str, folder: str, num_classes: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> Callable[[Path, bool], ImageData]:
    def build(root: Path, download: bool) -> ImageData:
        how = f"expected the python version in {root / folder}"
        train = _torchvision(cls_name, root, download, how, train=True)
        test = _torchvision(cls_name, root, download, how, train=False)

        def pool(ds: object) -> ImagePool:
            images = (
                torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
            )
            return ImagePool.from_tensor(images, torch.as_tensor(ds.targets))

        return ImageData(
            train=pool(train),
            test=pool(test),
            info=DatasetInfo(
                num_classes, mean, std, crop_padding=4, flip=True, classes=tuple(train.classes)
            ),
            source=str(root / folder),
        )

    return build


DATASETS.register("cifar10")(
    _cifar("CIFAR10", "cifar-10-batches-py", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
)
DATASETS.register("cifar100")(
    _cifar("CIFAR100", "cifar-100-python", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
)


@DATASETS.register("svhn")
def svhn(root: Path, download: bool) -> ImageData:
    """SVHN's ``train`` and ``test`` splits (not ``extra``). No flips: digits have a handedness."""
    how = f"expected {root / 'svhn'}/train_32x32.mat and test_32x32.mat"

    def pool(split: str) -> ImagePool:
        ds = _torchvision("SVHN", root / "svhn", download, how, split=split)
        return ImagePool.from_tensor(
            torch.from_numpy(np.ascontiguousarray(ds.data)), torch.as_tensor(ds.labels)
        )

    return ImageData(
        train=pool("train"),
        test=pool("test"),
        info=DatasetInfo(
            10,
            (0.4377, 0.4438, 0.4728),
            (0.1980, 0.2010, 0.1970),
            crop_padding=4,
            classes=tuple(str(i) for i in range(10)),
        ),
        source=str(root / "svhn"),
    )


@DATASETS.register("digits")
def digits(root: Path, download: bool) -> ImageData:
    """scikit-learn's 8x8 handwritten digits (1,797 images), shipped inside the package.

    The quickstart's data set: no network and no data folder needed. There is
    no official test split, so a fixed stratified fifth (360 images, seed 0,
    independent of the run's seeds) is held out as the test set.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixels are 0..16; scale to the 0..255 range every other data set uses.
    images = torch.from_numpy((bunch.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    targets = torch.from_numpy(bunch.target).long()
    from metateach.data.splits import stratified_split

    test_idx, train_idx = stratified_split(targets, 360, torch.Generator().manual_seed(0))
    return ImageData(
        train=ImagePool.from_tensor(images[train_idx], targets[train_idx]),
        test=ImagePool.from_tensor(images[test_idx], targets[test_idx]),
        info=DatasetInfo(
            10, None, None, default_val_size=180, classes=tuple(str(i) for i in range(10))
        ),
        source="sklearn.datasets.load_digits",
    )


@DATASETS.register("imagefolder")
def imagefolder(root: Path, download: bool, image_size: int | None = None) -> ImageData:
    """Any ``train/<class>/*`` + ``test/<class>/*`` tree, e.g. ``../shared/data/cifar10-jpeg``.

    Classes are the sorted folder names (torchvision's ``ImageFolder``). Images
    are decoded on demand, only those a run uses; they must share one size
    unless ``data.image_size`` resizes them. Grey images stay single-channel.
    Normalization statistics are measured on the training split.
    """
    import torchvision

    if download:
        raise DataError("data.download does not apply to imagefolder: the tree must already exist")
    pools = {}
    for split in ("train", "test"):
        folder = root / split
        if not folder.is_dir():
            raise DataError(
                f"imagefolder needs {folder}/<class>/<image> files; set data.root to the tree holding train/ and test/"
            )
        try:
            ds = torchvision.datasets.ImageFolder(str(folder))
        except FileNotFoundError as e:
            raise DataError(f"imagefolder {folder}: {e}") from None
        pools[split] = ds
    if pools["train"].classes != pools["test"].classes:
        raise DataError(
            f"imagefolder {root}: train/ and test/ have different class folders "
            f"({len(pools['train'].classes)} vs {len(pools['test'].classes)})"
        )
    classes = tuple(pools["train"].classes)
    return ImageData(
        train=_folder_pool(pools["train"].samples, image_size),
        test=_folder_pool(pools["test"].samples, image_size),
        info=DatasetInfo(
            len(classes),
            None,
            None,
            crop_padding=4 if image_size is None else max(1, image_size // 8),
            flip=True,
            default_val_size=min(5000, len(pools["train"]) // 10),
            classes=classes,
        ),
        source=str(root),
    )


def _folder_pool(samples: list[tuple[str, int]], image_size: int | None) -> ImagePool:
    paths = [path for path, _ in samples]
    targets = torch.tensor([label for _, label in samples], dtype=torch.long)

    def load(indices: Tensor) -> Tensor:
        from tqdm.auto import tqdm

        images = [
            _read_image(paths[i], image_size)
            for i in tqdm(
                indices.tolist(),
                desc="decoding images",
                unit="img",
                leave=False,
                mininterval=1.0,
                disable=None if len(indices) >= 5000 else True,
            )
        ]
        if not images:
            return torch.empty(0, 3, image_size or 1, image_size or 1, dtype=torch.uint8)
        if {im.shape[0] for im in images} == {1, 3}:  # a few grey images among colour ones
            images = [im.expand(3, -1, -1) for im in images]
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) > 1:
            raise DataError(
                f"images in {Path(paths[0]).parent.parent} differ in size ({sorted(shapes)[:3]}...); "
                "set data.image_size to resize them"
            )
        return torch.stack(images)

    return ImagePool(targets, load)


def _read_image(path: str, image_size: int | None) -> Tensor:
    """One image file as a (C, H, W) uint8 tensor: grey stays one channel, anything else becomes RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image if image.mode in ("L", "RGB") else image.convert("RGB")
            if image_size is not None:
                image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
            array = np.array(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    tensor = torch.from_numpy(array)
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1).contiguous()
