"""Fashion-MNIST segmentation scenes: composition, labels, determinism, split separation, the data source."""

import math

import pytest
import torch
from torch.testing import assert_close

from mabn.apps import data, scenes, sources


@pytest.fixture(scope="module")
def fashion(fashion_mnist_dir):
    return {split: data.load_fashion_mnist(split) for split in ("train", "test")}


@pytest.fixture(scope="module")
def source(fashion_mnist_dir):
    return scenes.SceneSource(canvas=64, num_train=48, num_test=16)


def _resize(image, side):
    """Independent reference of the item resize: bilinear, anti-aliased only when shrinking."""
    x = torch.nn.functional.interpolate(
        image[None, None].float(), size=(side, side), mode="bilinear", align_corners=False, antialias=side < 28
    )
    return x[0, 0].round().clamp(0, 255).to(torch.uint8)


def _reference(pool, made, canvas):
    """Compose every scene item by item with plain slicing, from the pool and the drawn parameters."""
    cut = math.floor(scenes.FOREGROUND_THRESHOLD)
    images = torch.zeros(len(made.sources), canvas, canvas, dtype=torch.uint8)
    masks = torch.zeros_like(images)
    pool_images, pool_labels = pool
    for s in range(len(made.sources)):
        for k in range(made.sources.shape[1]):
            index = int(made.sources[s, k])
            if index < 0:
                continue
            side = int(made.sides[s, k])
            x0, y0 = made.positions[s, k].tolist()
            patch = _resize(pool_images[index], side)
            fg = patch > cut
            images[s, y0 : y0 + side, x0 : x0 + side][fg] = patch[fg]
            masks[s, y0 : y0 + side, x0 : x0 + side][fg] = int(pool_labels[index]) + 1
    return images, masks


@pytest.mark.parametrize("side", [17, 28, 41, 56])
def test_resize_items_matches_interpolate(side):
    items = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(side))
    out = scenes.resize_items(items, side)
    assert out.shape == (3, side, side) and out.dtype == torch.uint8
    for i in range(3):
        assert torch.equal(out[i], _resize(items[i], side))
    if side == 28:
        assert torch.equal(out, items)


def _hand_items():
    """Two 28x28 items: A a 10x12 block of 200 with a faint pixel, B an 8x8 block of 90."""
    a = torch.zeros(28, 28, dtype=torch.uint8)
    a[4:14, 2:14] = 200  # rows 4..13, columns 2..13
    a[20, 20] = 25  # below the threshold (25.5): neither pasted nor part of the box
    b = torch.zeros(28, 28, dtype=torch.uint8)
    b[0:8, 0:8] = 90
    return torch.stack([a, b])[None]  # (1 scene, 2 slots, 28, 28)


def test_compose_hand_made_scene_labels_occlusion_and_boxes():
    images = _hand_items()
    labels = torch.tensor([[3, 7]])  # Dress, then Sneaker on top
    positions = torch.tensor([[[5, 1], [15, 10]]])  # (x0, y0): A covers x 7..18, y 5..14; B x 15..22, y 10..17
    sides = torch.tensor([[28, 28]])
    out, masks, boxes = scenes.compose_scenes(images, labels, positions, sides, canvas=48)
    assert out.shape == masks.shape == (1, 48, 48) and out.dtype == masks.dtype == torch.uint8
    expected_masks = torch.zeros(48, 48, dtype=torch.uint8)
    expected_masks[5:15, 7:19] = 4
    expected_masks[10:18, 15:23] = 8  # the later item wins in the overlap y 10..14, x 15..18
    assert torch.equal(masks[0], expected_masks)
    expected = torch.zeros(48, 48, dtype=torch.uint8)
    expected[5:15, 7:19] = 200
    expected[10:18, 15:23] = 90
    assert torch.equal(out[0], expected)
    assert int(masks[0, 21, 25]) == 0 and int(out[0, 21, 25]) == 0  # the faint pixel stays background
    assert int(masks[0, 12, 16]) == 8 and int(masks[0, 6, 8]) == 4 and int(masks[0, 30, 30]) == 0
    # Boxes: full extents before occlusion, exclusive ends.
    assert boxes[0].tolist() == [[3, 7, 5, 19, 15], [7, 15, 10, 23, 18]]


def test_compose_resized_item_box_and_empty_slots():
    images = torch.zeros(2, 3, 28, 28, dtype=torch.uint8)
    images[0, 0] = 255  # a full square: its box is the whole resized square
    labels = torch.tensor([[9, -1, -1], [0, 5, -1]])  # scene 1 slot 1 is blank (no foreground)
    positions = torch.tensor([[[3, 4], [0, 0], [0, 0]], [[0, 0], [10, 10], [0, 0]]])
    sides = torch.tensor([[56, 0, 0], [28, 28, 0]])
    out, masks, boxes = scenes.compose_scenes(images, labels, positions, sides, canvas=64)
    assert int((masks[0] == 10).sum()) == 56 * 56 and int(masks[0, 4:60, 3:59].min()) == 10
    assert boxes[0].tolist() == [[9, 3, 4, 59, 60], [-1] * 5, [-1] * 5]
    assert int(masks[1].max()) == 0 and int(out[1].max()) == 0
    assert boxes[1].tolist() == [[0, -1, -1, -1, -1], [5, -1, -1, -1, -1], [-1] * 5]


def test_make_scenes_is_deterministic_and_prefix_stable(fashion):
    pool = fashion["train"]
    a = scenes.make_scenes(*pool, num_scenes=20, canvas=64, seed=5)
    b = scenes.make_scenes(*pool, num_scenes=20, canvas=64, seed=5)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    c = scenes.make_scenes(*pool, num_scenes=20, canvas=64, seed=6)
    assert not torch.equal(a.images, c.images) and not torch.equal(a.sources, c.sources)
    # More scenes (past the first block of draws) start with the same scenes.
    longer = scenes.make_scenes(*pool, num_scenes=1030, canvas=64, seed=5)
    for x, y in zip(a, longer):
        assert torch.equal(x, y[:20])


@pytest.mark.parametrize("items, scale", [((3, 5), (1.0, 2.0)), ((1, 1), (0.5, 0.5)), ((2, 6), (0.8, 1.3))])
def test_make_scenes_draws_within_ranges(fashion, items, scale):
    made = scenes.make_scenes(*fashion["test"], num_scenes=200, canvas=64, items=items, scale=scale, seed=1)
    assert made.images.shape == (200, 1, 64, 64) and made.masks.shape == (200, 64, 64)
    assert made.boxes.shape == (200, items[1], 5) and made.sources.shape == (200, items[1])
    present = made.sources >= 0
    counts = present.sum(1)
    assert int(counts.min()) >= items[0] and int(counts.max()) <= items[1]
    assert torch.equal(present, torch.arange(items[1]) < counts[:, None])  # items fill the first slots
    sides, x0, y0 = made.sides[present], made.positions[..., 0][present], made.positions[..., 1][present]
    assert int(sides.min()) >= round(scale[0] * 28) and int(sides.max()) <= round(scale[1] * 28)
    assert int(x0.min()) >= 0 and int(y0.min()) >= 0 and int((x0 + sides).max()) <= 64 and int((y0 + sides).max()) <= 64
    assert int(made.masks.max()) <= 10 and made.masks.dtype == torch.uint8
    # Empty slots are all -1; boxes lie inside their item's square and carry the source's class.
    assert bool((made.boxes[~present] == -1).all() and (made.positions[~present] == -1).all())
    boxes = made.boxes[present]
    assert torch.equal(boxes[:, 0], fashion["test"][1][made.sources[present]])
    assert bool((boxes[:, 1] >= x0).all() and (boxes[:, 3] <= x0 + sides).all() and (boxes[:, 1] < boxes[:, 3]).all())
    assert bool((boxes[:, 2] >= y0).all() and (boxes[:, 4] <= y0 + sides).all() and (boxes[:, 2] < boxes[:, 4]).all())


@pytest.mark.parametrize("split", ["train", "test"])
def test_scenes_are_made_of_their_split_only(source, fashion, split):
    made = source.train_scenes if split == "train" else source.test_scenes
    other = "test" if split == "train" else "train"
    assert int(made.sources.max()) < len(fashion[split][0]) and int(made.sources.min()) >= -1
    images, masks = _reference(fashion[split], made, canvas=64)
    assert torch.equal(made.images[:, 0], images)
    assert torch.equal(made.masks, masks)
    # The same indices (wrapped to the smaller test split) into the other split give other scenes.
    wrapped = torch.where(made.sources >= 0, made.sources % len(fashion["test"][0]), -1)
    others, _ = _reference(fashion[other], made._replace(sources=wrapped), canvas=64)
    assert not torch.equal(made.images[:, 0], others)


def test_scene_source_splits_use_different_seeds_and_fixed_data(source):
    assert not torch.equal(source.train_scenes.sources[:16], source.test_scenes.sources)
    again = scenes.SceneSource(canvas=64, num_train=8, num_test=4)
    assert torch.equal(again.train_images, source.train_images[:8])
    assert torch.equal(again.test_masks, source.test_masks[:4])
    other = scenes.SceneSource(canvas=64, num_train=8, num_test=4, seed=1)
    assert not torch.equal(other.train_images, again.train_images)


def test_scene_source_batches(source):
    assert (source.name, source.task, source.num_classes, source.in_channels) == (
        "fashion-scenes",
        "segmentation",
        11,
        1,
    )
    assert (source.canvas, source.num_train, source.num_test) == (64, 48, 16)
    batches = torch.arange(48).view(6, 8)
    out = list(source.train_batches(batches, seed=3, workers=0))
    assert len(out) == 6
    for rows, (x, y) in zip(batches, out):
        assert x.shape == (8, 1, 64, 64) and x.dtype == torch.float32
        assert y.shape == (8, 64, 64) and y.dtype == torch.int64
        assert int(y.min()) >= 0 and int(y.max()) <= 10
        # Normalized with the Fashion-MNIST statistics, perhaps mirrored.
        raw = data.normalize(source.train_images[rows], data.FASHION_MNIST_MEAN, data.FASHION_MNIST_STD)
        for i in range(len(rows)):
            assert torch.equal(x[i], raw[i]) or torch.equal(x[i], raw[i].flip(-1))
        assert_close(x.min(), torch.tensor(-data.FASHION_MNIST_MEAN[0] / data.FASHION_MNIST_STD[0]))  # zeros
    again = list(source.train_batches(batches, seed=3))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(out, again))
    other = list(source.train_batches(batches, seed=4))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(out, other))
    tests = list(source.test_batches(6))
    assert [len(y) for _, y in tests] == [6, 6, 4]
    assert torch.equal(torch.cat([y for _, y in tests]), source.test_masks.long())
    assert_close(
        torch.cat([x for x, _ in tests]),
        data.normalize(source.test_images, data.FASHION_MNIST_MEAN, data.FASHION_MNIST_STD),
    )


def test_flip_keeps_image_and_mask_aligned(source):
    batches = torch.arange(48).view(2, 24)
    mirrored = 0
    for rows, (x, y) in zip(batches, source.train_batches(batches, seed=11)):
        raw = data.normalize(source.train_images[rows], data.FASHION_MNIST_MEAN, data.FASHION_MNIST_STD)
        masks = source.train_masks[rows].long()
        for i in range(len(rows)):
            flipped = not torch.equal(x[i], raw[i])
            mirrored += flipped
            assert torch.equal(x[i], raw[i].flip(-1) if flipped else raw[i])
            assert torch.equal(y[i], masks[i].flip(-1) if flipped else masks[i])
    assert 8 < mirrored < 40  # about half


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"canvas": 50}, "canvas 50 is smaller than the largest item side 56"),
        ({"canvas": 30, "scale": (1.0, 1.1)}, "canvas 30 is smaller than the largest item side 31"),
        ({"items": (0, 3)}, r"items must be \(min, max\) with 1 <= min <= max, got \(0, 3\)"),
        ({"items": (4, 3)}, r"got \(4, 3\)"),
        ({"items": 3}, "items must be a pair"),
        ({"num_scenes": 0}, "num_scenes must be >= 1, got 0"),
        ({"scale": (2.0, 1.0)}, r"scale must be \(lo, hi\) with 0 < lo <= hi, got \(2.0, 1.0\)"),
        ({"scale": (0.0, 1.0)}, r"got \(0.0, 1.0\)"),
        ({"scale": (-1.0, 1.0)}, r"got \(-1.0, 1.0\)"),
        ({"labels": torch.zeros(9, dtype=torch.long)}, r"same length, got images \(10, 28, 28\) and labels \(9,\)"),
        ({"images": torch.zeros(10, 28, 27, dtype=torch.uint8)}, r"square uint8 images \(N, h, h\)"),
        ({"images": torch.zeros(10, 28, 28)}, "torch.float32"),
    ],
)
def test_make_scenes_errors(kwargs, message):
    args = {"images": torch.zeros(10, 28, 28, dtype=torch.uint8), "labels": torch.zeros(10, dtype=torch.long)}
    args.update({"num_scenes": 4, "canvas": 96}, **kwargs)
    with pytest.raises(ValueError, match=message):
        scenes.make_scenes(**args)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"positions": torch.tensor([[[20, 0]]])},
            r"\(x0, y0\) = \(20, 0\) with side 28 does not lie inside the 40 x 40",
        ),
        ({"positions": torch.tensor([[[-1, 0]]])}, r"\(-1, 0\)"),
        ({"sides": torch.tensor([[0]])}, "item sides must be >= 1, got 0"),
        ({"labels": torch.tensor([[255]])}, "item classes must be in"),
        ({"sides": torch.tensor([28])}, r"sides must have shape \(1, 1\)"),
        ({"canvas": 0}, "canvas must be >= 1, got 0"),
        ({"threshold": 255.0}, r"threshold must be in \[0, 255\), got 255.0"),
        ({"images": torch.zeros(1, 28, 28, dtype=torch.uint8)}, r"item images \(S, K, h, w\)"),
    ],
)
def test_compose_scenes_errors(change, message):
    args = {
        "images": torch.zeros(1, 1, 28, 28, dtype=torch.uint8),
        "labels": torch.tensor([[1]]),
        "positions": torch.tensor([[[0, 0]]]),
        "sides": torch.tensor([[28]]),
        "canvas": 40,
    }
    args.update(change)
    with pytest.raises(ValueError, match=message):
        scenes.compose_scenes(**args)


def _split(n=4, c=1, h=8, w=8, mask_hw=None, dtype=torch.long, value=0):
    images = torch.zeros(n, c, h, w, dtype=torch.uint8)
    masks = torch.full((n, *(mask_hw or (h, w))), value, dtype=dtype)
    return images, masks


@pytest.mark.parametrize(
    "train, error, message",
    [
        (_split(mask_hw=(8, 9)), ValueError, r"images \(4, 1, 8, 8\) and label maps \(4, 8, 9\) differ"),
        ((_split()[0], _split(n=3)[1]), ValueError, r"images \(4, 1, 8, 8\) and label maps \(3, 8, 8\) differ"),
        ((_split()[0][:, 0], _split()[1]), ValueError, r"expected images \(N, C, H, W\) and label maps \(N, H, W\)"),
        ((_split()[0], _split()[1][:, None]), ValueError, r"got \(4, 1, 8, 8\) and \(4, 1, 8, 8\)"),
        (_split(dtype=torch.float32), TypeError, "label maps must be an integer tensor, got torch.float32"),
        (_split(value=3), ValueError, r"labels must lie in \[0, 3\), got \[3, 3\]"),
        (_split(value=-1), ValueError, r"got \[-1, -1\]"),
        (_split(c=3), ValueError, "train and test images have 3 and 1 channels"),
    ],
)
def test_segmentation_tensor_source_errors(train, error, message):
    with pytest.raises(error, match=message):
        scenes.SegmentationTensorSource("mine", train, _split(), num_classes=3, mean=(0.5,), std=(0.5,))


def test_segmentation_tensor_source_on_user_tensors():
    g = torch.Generator().manual_seed(0)
    train = (
        torch.randint(0, 256, (6, 3, 10, 12), dtype=torch.uint8, generator=g),
        torch.randint(0, 4, (6, 10, 12), generator=g),
    )
    test = (train[0][:2], train[1][:2].to(torch.uint8))
    source = scenes.SegmentationTensorSource(
        "mine", train, test, num_classes=4, mean=(0.5,) * 3, std=(0.25,) * 3, flip=False
    )
    assert (source.task, source.num_classes, source.in_channels, source.num_train, source.num_test) == (
        "segmentation",
        4,
        3,
        6,
        2,
    )
    x, y = next(source.train_batches(torch.tensor([[4, 1]]), seed=0))
    assert_close(x, data.normalize(train[0][[4, 1]], (0.5,) * 3, (0.25,) * 3))
    assert torch.equal(y, train[1][[4, 1]])
    ((x, y),) = source.test_batches(8)
    assert y.dtype == torch.int64 and torch.equal(y, train[1][:2])
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        next(source.test_batches(0))


def test_make_source_fashion_scenes(fashion_mnist_dir):
    assert "fashion-scenes" in sources.DATA_SOURCES
    assert data.DataSource.task == "classification" and data.synthetic_source(8, 8).task == "classification"
    made = sources.make_source("fashion-scenes", limit_train=8, limit_test=4, image_size=64)
    assert isinstance(made, scenes.SceneSource) and made.task == "segmentation"
    assert (made.num_train, made.num_test, made.canvas) == (8, 4, 64)
    assert made.train_images.shape == (8, 1, 64, 64)
    with pytest.raises(ValueError, match="canvas 40 is smaller"):
        sources.make_source("fashion-scenes", limit_train=8, limit_test=4, image_size=40)
    with pytest.raises(ValueError, match="num_train must be >= 1, got 0"):
        scenes.SceneSource(num_train=0)


def test_plot_scenes(tmp_path, source):
    n = 3
    predictions = {"BN(2)": torch.zeros(n, 64, 64, dtype=torch.long), "MABN(2)": source.test_masks[:n].long()}
    path = scenes.plot_scenes(source, tmp_path / "out" / "scenes.png", n=n, predictions=predictions)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["scenes.png"]  # no temporary file left
    tensors = (source.test_images[:2], source.test_masks[:2])
    scenes.plot_scenes(tensors, tmp_path / "t.png", n=2)
    with pytest.raises(ValueError, match=r"prediction 'BN\(2\)' must have shape \(3, 64, 64\), got \(2, 64, 64\)"):
        scenes.plot_scenes(source, tmp_path / "bad.png", n=3, predictions={"BN(2)": torch.zeros(2, 64, 64)})
    with pytest.raises(ValueError, match=r"n must be in \[1, 2\]"):
        scenes.plot_scenes(tensors, tmp_path / "bad.png", n=5)
    assert len(scenes.PALETTE) == len(scenes.SCENE_CLASSES) == 11 and scenes.SCENE_CLASSES[1] == "T-shirt/top"


def test_command_line_plot(tmp_path, capsys, fashion_mnist_dir):
    assert scenes.main(["--plot", str(tmp_path / "f.png"), "--n", "2", "--canvas", "64"]) == 0
    assert (tmp_path / "f.png").exists() and "f.png" in capsys.readouterr().out
