"""Data sources: augmentation ops, synthetic data, ImageFolder trees, Fashion-MNIST."""

import pytest
import torch
from torch.testing import assert_close

from mabn.apps import data, sources


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_random_crop_flip_identity_without_padding_or_flip():
    x = torch.randint(0, 256, (5, 2, 7, 6), dtype=torch.uint8)
    assert torch.equal(data.random_crop_flip(x, _gen(), padding=0, flip=False), x)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("padding", [1, 2, 3])
def test_random_crop_flip_is_a_window_of_the_padded_image(padding, flip):
    x = torch.randint(1, 256, (16, 2, 6, 5), dtype=torch.uint8)
    out = data.random_crop_flip(x, _gen(3), padding=padding, flip=flip)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    for i in range(x.shape[0]):
        # The output must be one of the (2p+1)^2 (x2 with flips) windows of the padded image.
        candidates = []
        for oy in range(2 * padding + 1):
            for ox in range(2 * padding + 1):
                window = padded[i, :, oy : oy + 6, ox : ox + 5]
                candidates += [window, window.flip(-1)] if flip else [window]
        assert any(torch.equal(out[i], c) for c in candidates), i


def test_random_crop_flip_is_seeded_and_varies():
    x = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    a = data.random_crop_flip(x, _gen(1))
    assert torch.equal(a, data.random_crop_flip(x, _gen(1)))
    assert not torch.equal(a, data.random_crop_flip(x, _gen(2)))
    flipped = data.random_crop_flip(x, _gen(0), padding=0, flip=True)
    mirrored = sum(torch.equal(flipped[i], x[i].flip(-1)) for i in range(64))
    assert 10 < mirrored < 54  # about half of the images are mirrored


def test_normalize():
    x = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)
    out = data.normalize(x, (0.5, 0.2), (0.5, 0.1))
    assert_close(out, torch.tensor([[[[-1.0, 1.0]], [[0.0, 2.0]]]]))


def test_synthetic_source_is_seeded_and_batches():
    a, b = data.synthetic_source(num_train=40, num_test=20, seed=1), data.synthetic_source(40, 20, seed=1)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert a.num_train == 40 and a.num_test == 20 and a.in_channels == 1 and a.num_classes == 4
    batches = torch.arange(40).view(5, 8)
    xs = list(a.train_batches(batches, seed=7))
    assert len(xs) == 5 and xs[0][0].shape == (8, 1, 12, 12) and xs[0][0].dtype == torch.float32
    assert torch.equal(xs[2][1], a.train_labels[16:24])
    again = list(a.train_batches(batches, seed=7))
    assert all(torch.equal(x0, x1) for (x0, _), (x1, _) in zip(xs, again))
    test = list(a.test_batches(6))
    assert [t[0].shape[0] for t in test] == [6, 6, 6, 2]


def test_make_source_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown data source 'mnist'"):
        sources.make_source("mnist")
    with pytest.raises(ValueError, match="needs --data-dir"):
        sources.make_source("imagefolder")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.make_source("imagefolder", tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        sources.make_source("fashion-mnist", tmp_path / "nope")
    with pytest.raises(ValueError, match="limit_train must be >= 1"):
        sources.make_source("synthetic", limit_train=0)


def _image_tree(root, sizes=((40, 30), (25, 50), (33, 33))):
    from PIL import Image

    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, (w, h) in enumerate(sizes):
                color = (40 * c + 10 * i, 100, 200)
                img = Image.new("RGB", (w, h), color)
                if i == 2:
                    img = img.convert("L")  # grayscale images are read as RGB
                img.save(folder / f"{i}.{'jpg' if i == 1 else 'png'}")  # one JPEG: the draft path
    (root / "train" / "cat" / "notes.txt").write_text("not an image")


def test_imagefolder_source(tmp_path):
    _image_tree(tmp_path)
    source = sources.make_source("imagefolder", tmp_path, image_size=16)
    assert source.classes == ["cat", "dog"] and source.num_classes == 2 and source.in_channels == 3
    assert source.num_train == 6 and source.num_test == 6
    batches = torch.tensor([[0, 3, 5], [1, 2, 4]])
    first = list(source.train_batches(batches, seed=3))
    assert [x.shape for x, _ in first] == [(3, 3, 16, 16)] * 2
    assert first[0][1].tolist() == [0, 1, 1]
    second = list(source.train_batches(batches, seed=3, workers=0))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, second))
    (x, y), *rest = list(source.test_batches(4))
    assert x.shape == (4, 3, 16, 16) and y.tolist() == [0, 0, 0, 1] and rest[0][0].shape[0] == 2
    # A single-colour image stays that colour through resize and crop, then is normalized.
    mean, std = torch.tensor(data.IMAGENET_MEAN), torch.tensor(data.IMAGENET_STD)
    expected = (torch.tensor([0.0, 100.0, 200.0]) / 255.0 - mean) / std
    assert_close(x[0], expected.view(3, 1, 1).expand(3, 16, 16), atol=1e-4, rtol=0)


def test_imagefolder_errors(tmp_path):
    from PIL import Image

    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        data.ImageFolderSource(tmp_path)
    Image.new("RGB", (9, 9)).save(tmp_path / "train" / "a" / "0.png")
    with pytest.raises(FileNotFoundError, match="no val/ directory"):
        data.ImageFolderSource(tmp_path)
    (tmp_path / "val" / "b").mkdir(parents=True)
    with pytest.raises(ValueError, match="not among the training classes"):
        data.ImageFolderSource(tmp_path)


@pytest.mark.parametrize("size", [(10, 10), (100, 20), (20, 100), (7, 300)])
def test_random_resized_crop_box_inside_image(size):
    g = _gen(5)
    h, w = size
    for _ in range(50):
        top, left, ch, cw = data.random_resized_crop_box(h, w, g)
        assert 0 <= top and 0 <= left and 1 <= ch and 1 <= cw
        assert top + ch <= h and left + cw <= w


def test_fashion_mnist_source(fashion_mnist_dir):
    source = data.fashion_mnist_source(limit_train=256, limit_test=100)
    assert (source.num_train, source.num_test, source.in_channels, source.num_classes) == (256, 100, 1, 10)
    x, y = next(source.test_batches(100))
    assert x.shape == (100, 1, 28, 28) and y.dtype == torch.int64
    # Normalized with the training statistics: roughly zero mean, unit spread.
    assert abs(float(x.mean())) < 0.2 and 0.8 < float(x.std()) < 1.2


def test_data_modules_import_in_one_direction():
    import subprocess
    import sys

    # data <- scenes <- detection <- sources: no module imports one that imports it back.
    code = (
        "import sys; import mabn.apps.data; assert 'mabn.apps.scenes' not in sys.modules; "
        "import mabn.apps.scenes; assert 'mabn.apps.sources' not in sys.modules and 'mabn.apps.detection' not in sys.modules; "
        "import mabn.apps.detection; assert 'mabn.apps.sources' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
