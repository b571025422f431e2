"""Data sources: Fashion-MNIST (Debian's ``dataset-fashion-mnist`` idx files), ImageFolder trees, synthetic data.

A :class:`DataSource` has a training split read as augmented batches for given sample indices and
a test split read in order. The scene data sets built on these (:mod:`mabn.apps.scenes`,
:mod:`mabn.apps.detection`) import this module; :func:`mabn.apps.sources.make_source` opens any
source by name.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _open(path: Path):
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.exists():
            return gzip.open(candidate, "rb") if candidate.suffix == ".gz" else open(candidate, "rb")
    raise FileNotFoundError(
        f"Fashion-MNIST file {path.name}(.gz) not found in {path.parent}; install it with "
        "'apt-get install dataset-fashion-mnist' or pass --data-dir"
    )


def read_idx(path: Path) -> Tensor:
    """Read an idx file (optionally gzipped) into a uint8 tensor of its stored shape."""
    with _open(path) as f:
        header = f.read(4)
        if len(header) != 4 or header[0] != 0 or header[1] != 0 or header[2] != 0x08:
            raise ValueError(f"{path} is not an idx file of unsigned bytes")
        ndim = header[3]
        shape = struct.unpack(f">{ndim}I", f.read(4 * ndim))
        data = f.read()
    expected = 1
    for s in shape:
        expected *= s
    if len(data) != expected:
        raise ValueError(f"{path}: expected {expected} bytes of data for shape {shape}, got {len(data)}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(*shape)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of the ``"train"`` or ``"test"`` split."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    if not root.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST directory {root} does not exist; install Debian's package with "
            "'apt-get install dataset-fashion-mnist' or pass --data-dir"
        )
    images_name, labels_name = _FILES[split]
    images = read_idx(root / images_name)
    labels = read_idx(root / labels_name).long()
    if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{root}: inconsistent Fashion-MNIST files: images {tuple(images.shape)}, labels {tuple(labels.shape)}"
        )
    return images, labels


# --------------------------------------------------------------------------------------------------
# Training data sources: in-memory image tensors (Fashion-MNIST, synthetic) and ImageFolder trees.
# --------------------------------------------------------------------------------------------------

#: Mean and standard deviation of the Fashion-MNIST training pixels (scaled to [0, 1]).
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
#: Per-channel RGB statistics of ImageNet, the usual normalization of ImageFolder data.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (or [0, 255] float) images (N, C, H, W) -> float32 ``(x / 255 - mean) / std`` per channel."""
    x = images.float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def random_crop_flip(images: Tensor, generator: torch.Generator, padding: int = 2, flip: bool = True) -> Tensor:
    """Pad each image by ``padding`` zeros, crop it back to its size at a random offset, maybe mirror it.

    The standard augmentation of small-image classification (CIFAR, MNIST-like data), applied to a
    whole batch at once with one gather, so it costs little next to the training step.

    Args:
        images: (N, C, H, W) tensor of any dtype.
        generator: source of the random offsets and flips (a seeded generator makes it reproducible).
        padding: pixels of zero padding on every side; the crop offset is uniform in [0, 2 * padding].
        flip: mirror each image horizontally with probability 1/2.

    Returns:
        A new tensor of the same shape and dtype.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> random_crop_flip(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), g).shape
        torch.Size([4, 1, 28, 28])
    """
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    if padding > 0:
        images = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = oy[:, None] + torch.arange(h)  # (n, h)
    cols = ox[:, None] + torch.arange(w)  # (n, w)
    if flip:
        mirrored = torch.rand(n, generator=generator) < 0.5
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    batch = torch.arange(n)[:, None, None, None]
    channel = torch.arange(c)[None, :, None, None]
    return images[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


class DataSource:
    """A labelled image classification data set with a training and a test (validation) split.

    Subclasses provide the number of samples, the shape of the model input and two ways to read
    batches: augmented training batches for given sample indices, and plain test batches in order.
    """

    name: str = ""
    task: str = "classification"
    num_classes: int = 0
    in_channels: int = 0

    @property
    def num_train(self) -> int:
        raise NotImplementedError

    @property
    def num_test(self) -> int:
        raise NotImplementedError

    def train_batches(self, batches: Tensor, seed: int, workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield the augmented (images, labels) of each row of ``batches`` (index tensor (S, batch)).

        The augmentation is a function of ``seed`` and the indices only, so a run is reproducible.
        """
        raise NotImplementedError

    def test_batches(self, batch_size: int, workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield the whole test split in order, without augmentation, ``batch_size`` samples at a time."""
        raise NotImplementedError


class InMemorySource(DataSource):
    """A source whose splits are tensors in memory: ``train_images``/``test_images`` (N, C, H, W)
    uint8 and the targets ``train_targets``/``test_targets``, normalized with ``mean`` and ``std``.

    Subclasses check their splits, hand the images to this constructor and keep their targets.
    """

    def __init__(
        self,
        name: str,
        train_images: Tensor,
        test_images: Tensor,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.name = name
        self.train_images, self.test_images = train_images, test_images
        self.num_classes = num_classes
        self.in_channels = train_images.shape[1]
        self.mean, self.std = tuple(mean), tuple(std)

    @property
    def num_train(self) -> int:
        return self.train_images.shape[0]

    @property
    def num_test(self) -> int:
        return self.test_images.shape[0]

    def test_targets(self, start: int, stop: int) -> Tensor:
        """The targets of test samples ``start:stop``."""
        raise NotImplementedError

    def test_batches(self, batch_size: int, workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield the test split in order, without augmentation, ``batch_size`` samples at a time."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, self.num_test, batch_size):
            images = self.test_images[start : start + batch_size]
            yield normalize(images, self.mean, self.std), self.test_targets(start, start + batch_size)


class TensorImageSource(InMemorySource):
    """Images held in memory as uint8 tensors, augmented by :func:`random_crop_flip` then normalized.

    Args:
        name: the source's name (for messages).
        train: (images (N, C, H, W) uint8, labels (N,) int64) of the training split.
        test: the same for the test split.
        num_classes: number of classes.
        mean, std: per-channel normalization of the pixels scaled to [0, 1].
        padding: the padding of the random crop (0 disables it).
        flip: random horizontal flips.
    """

    def __init__(
        self,
        name: str,
        train: tuple[Tensor, Tensor],
        test: tuple[Tensor, Tensor],
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        padding: int = 2,
        flip: bool = True,
    ) -> None:
        for split, (images, labels) in (("train", train), ("test", test)):
            if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"{name} {split}: expected images (N, C, H, W) and labels (N,), got "
                    f"{tuple(images.shape)} and {tuple(labels.shape)}"
                )
        super().__init__(name, train[0], test[0], num_classes, mean, std)
        self.train_labels, self.test_labels = train[1], test[1]
        self.padding, self.flip = padding, flip

    def train_batches(self, batches: Tensor, seed: int, workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        generator = torch.Generator().manual_seed(seed)
        for rows in batches:
            images = random_crop_flip(self.train_images[rows], generator, self.padding, self.flip)
            yield normalize(images, self.mean, self.std), self.train_labels[rows]

    def test_targets(self, start: int, stop: int) -> Tensor:
        return self.test_labels[start:stop]


def _limit(split: tuple[Tensor, Tensor], limit: int | None) -> tuple[Tensor, Tensor]:
    if limit is None:
        return split
    return split[0][:limit], split[1][:limit]


def fashion_mnist_source(
    root: str | os.PathLike | None = None, limit_train: int | None = None, limit_test: int | None = None
) -> TensorImageSource:
    """Fashion-MNIST (1 x 28 x 28, 10 classes) with random 2-pixel-padded crops and horizontal flips.

    Args:
        root: directory of the idx files; default the Debian package's /usr/share/datasets/fashion-mnist.
        limit_train, limit_test: keep only the first samples of a split (for quick checks).

    Example::

        >>> source = fashion_mnist_source(limit_train=64, limit_test=64)  # doctest: +SKIP
        >>> source.num_train, source.in_channels, source.num_classes  # doctest: +SKIP
        (64, 1, 10)
    """
    train_x, train_y = load_fashion_mnist("train", root)
    test_x, test_y = load_fashion_mnist("test", root)
    return TensorImageSource(
        "fashion-mnist",
        _limit((train_x.unsqueeze(1), train_y), limit_train),
        _limit((test_x.unsqueeze(1), test_y), limit_test),
        num_classes=10,
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
    )


def synthetic_source(
    num_train: int = 512,
    num_test: int = 256,
    num_classes: int = 4,
    channels: int = 1,
    size: int = 12,
    seed: int = 0,
) -> TensorImageSource:
    """Small random images whose class is a fixed noisy pattern: learnable in a few steps, for tests.

    Each class has a random uint8 prototype; a sample is its prototype plus noise, so a model
    trained for a few steps beats chance clearly while staying far from a trivial 0 % error.

    Example::

        >>> source = synthetic_source(num_train=32, num_test=16)
        >>> source.train_images.shape, source.num_classes
        (torch.Size([32, 1, 12, 12]), 4)
    """
    for name, value in (("num_train", num_train), ("num_test", num_test), ("num_classes", num_classes)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    g = torch.Generator().manual_seed(seed)
    # Smooth prototypes (upsampled 3x3 grids) survive the random crops and flips of the augmentation.
    coarse = torch.rand(num_classes, channels, 3, 3, generator=g) * 255.0
    prototypes = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    def make(n: int) -> tuple[Tensor, Tensor]:
        labels = torch.randint(0, num_classes, (n,), generator=g)
        noise = torch.randn(n, channels, size, size, generator=g) * 60.0
        images = (prototypes[labels] + noise).clamp_(0, 255).round_().to(torch.uint8)
        return images, labels

    return TensorImageSource(
        "synthetic", make(num_train), make(num_test), num_classes, mean=(0.5,) * channels, std=(0.3,) * channels
    )


# ---- ImageFolder --------------------------------------------------------------------------------


def _scan_split(root: Path, split: str, classes: list[str] | None) -> tuple[list[str], list[tuple[Path, int]]]:
    directory = root / split
    if not directory.is_dir():
        raise FileNotFoundError(f"image folder {root} has no {split}/ directory (expected {split}/<class>/<image>)")
    found = sorted(p.name for p in directory.iterdir() if p.is_dir())
    if classes is None:
        if not found:
            raise ValueError(f"{directory} holds no class folders")
        classes = found
    index = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in found if name not in index]
    if unknown:
        raise ValueError(f"{directory}: class folders {unknown[:5]} are not among the training classes")
    samples = []
    for name in found:
        for path in sorted((directory / name).rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                samples.append((path, index[name]))
    if not samples:
        raise ValueError(f"{directory} holds no images (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return classes, samples


def random_resized_crop_box(
    height: int,
    width: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering ``scale`` of the area with aspect ratio in ``ratio``.

    Ten tries at a random area and log-uniform aspect ratio; when none fits, the largest central
    crop whose aspect ratio lies in ``ratio`` (the usual Inception-style crop).
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    current = width / height
    if current < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif current > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear, anti-aliased resize of a float (C, H, W) image."""
    return torch.nn.functional.interpolate(
        image.unsqueeze(0), size=size, mode="bilinear", align_corners=False, antialias=True
    ).squeeze(0)


class ImageFolderSource(DataSource):
    """A directory with ``train/`` and ``val/`` folders of class folders of images, read with Pillow.

    Training images get the ImageNet augmentation: a random crop of 8-100 % of the area with aspect
    ratio in [3/4, 4/3] resized to ``image_size``, and a horizontal flip with probability 1/2.
    Validation images are resized so that their shorter side is ``image_size / 0.875`` and
    center-cropped to ``image_size``. Both are normalized with the ImageNet mean and std. Everything
    after decoding is plain torch; ``workers`` > 0 decodes in a ``torch.utils.data.DataLoader``.

    Args:
        root: the directory holding train/ and val/.
        image_size: side of the square model input. Default: 224.
        limit_train, limit_test: keep only a seeded random subset of each split (for quick checks).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int = 224,
        limit_train: int | None = None,
        limit_test: int | None = None,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        self.name = "imagefolder"
        self.root = root
        self.image_size = image_size
        self.classes, self.train_samples = _scan_split(root, "train", None)
        _, self.test_samples = _scan_split(root, "val", self.classes)
        self.train_samples = self._subset(self.train_samples, limit_train)
        self.test_samples = self._subset(self.test_samples, limit_test)
        self.num_classes = len(self.classes)
        self.in_channels = 3

    @staticmethod
    def _subset(samples: list[tuple[Path, int]], limit: int | None) -> list[tuple[Path, int]]:
        if limit is None or limit >= len(samples):
            return samples
        keep = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0))[:limit]
        return [samples[i] for i in sorted(keep.tolist())]

    @property
    def num_train(self) -> int:
        return len(self.train_samples)

    @property
    def num_test(self) -> int:
        return len(self.test_samples)

    @staticmethod
    def _decode(path: Path, draft: int | None = None) -> Tensor:
        from PIL import Image  # Pillow is only needed for this source

        with Image.open(path) as img:
            if draft is not None:
                img.draft("RGB", (draft, draft))  # JPEG: decode at a reduced scale still >= draft
            rgb = img.convert("RGB")
            data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
            return data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).float()

    def load_train(self, index: int, seed: int) -> tuple[Tensor, int]:
        """One augmented training sample; its randomness comes from ``seed`` alone."""
        path, label = self.train_samples[index]
        g = torch.Generator().manual_seed(seed)
        image = self._decode(path)
        top, left, h, w = random_resized_crop_box(image.shape[1], image.shape[2], g)
        image = _resize(image[:, top : top + h, left : left + w], (self.image_size, self.image_size))
        if bool(torch.rand(1, generator=g) < 0.5):
            image = image.flip(2)
        return normalize(image.clamp_(0, 255).unsqueeze(0), IMAGENET_MEAN, IMAGENET_STD).squeeze(0), label

    def load_test(self, index: int) -> tuple[Tensor, int]:
        """One validation sample: shorter side resized to size / 0.875, center crop of ``image_size``."""
        path, label = self.test_samples[index]
        resize_to = int(round(self.image_size / 0.875))
        image = self._decode(path, draft=resize_to)
        h, w = image.shape[1:]
        scale = resize_to / min(h, w)
        nh, nw = max(self.image_size, int(round(h * scale))), max(self.image_size, int(round(w * scale)))
        image = _resize(image, (nh, nw))
        top, left = (nh - self.image_size) // 2, (nw - self.image_size) // 2
        image = image[:, top : top + self.image_size, left : left + self.image_size]
        return normalize(image.clamp_(0, 255).unsqueeze(0), IMAGENET_MEAN, IMAGENET_STD).squeeze(0), label

    def _loader(self, dataset: torch.utils.data.Dataset, batches: list, workers: int):
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers)

    def train_batches(self, batches: Tensor, seed: int, workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        # Each sample's seed mixes the epoch seed and its index: the same whatever the worker count.
        rows = [[(int(i), seed * 1_000_003 + int(i)) for i in row] for row in batches]
        yield from self._loader(_TrainItems(self), rows, workers)

    def test_batches(self, batch_size: int, workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        indices = list(range(self.num_test))
        rows = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
        yield from self._loader(_TestItems(self), rows, workers)


class _TrainItems(torch.utils.data.Dataset):
    def __init__(self, source: ImageFolderSource) -> None:
        self.source = source

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, int]:
        return self.source.load_train(*item)


class _TestItems(torch.utils.data.Dataset):
    def __init__(self, source: ImageFolderSource) -> None:
        self.source = source

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.source.load_test(index)
