"""Detection: scene targets and the occlusion rule, the data source, COCO AP, torchvision's detectors
with every norm from the factory, and ``mabn train --task detection`` (resume, fold, export)."""

import json

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import mabn
from mabn import models
from mabn.apps import cli, detection, scenes
from mabn.apps import train as trainer
from mabn.models.detection import LevelTower

ARCHS = models.DETECTION_ARCHS


def _pool(n=10, seed=0):
    """Square items with a blob of foreground each (about 60 % of their pixels)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 7, 7, generator=g)
    blobs = nn.functional.interpolate(coarse, size=(28, 28), mode="bilinear", align_corners=False)[:, 0]
    return (blobs > 0.4).to(torch.uint8) * 200, torch.arange(n) % 10


def _toy_source(num_train=32, num_test=8, canvas=64, masks=False):
    pool, labels = _pool()
    train = scenes.make_scenes(pool, labels, num_train, canvas, items=(1, 3), scale=(0.8, 1.5), seed=0)
    test = scenes.make_scenes(pool, labels, num_test, canvas, items=(1, 3), scale=(0.8, 1.5), seed=1)
    return detection.DetectionTensorSource(
        "toy",
        (train.images, train.instances, detection.detection_targets(train)),
        (test.images, test.instances, detection.detection_targets(test)),
        num_classes=11,
        mean=(0.3,),
        std=(0.4,),
        masks=masks,
    )


def _hand_scene():
    """Slot 0 mostly covered by slot 1 (14 % visible), slot 2 hidden by slot 3, slots 1 and 3 whole."""
    items = torch.full((1, 4, 28, 28), 200, dtype=torch.uint8)
    labels = torch.tensor([[2, 5, 1, 7]])
    positions = torch.tensor([[[0, 0], [4, 0], [40, 40], [36, 36]]])
    sides = torch.tensor([[28, 28, 8, 20]])
    images, masks, boxes = scenes.compose_scenes(items, labels, positions, sides, canvas=64)
    instances = scenes.compose_scenes(items, torch.arange(4)[None], positions, sides, canvas=64)[1]
    areas = scenes.foreground_areas(items, labels >= 0, sides)
    return scenes.Scenes(images[:, None], masks, boxes, torch.zeros(1, 4, dtype=torch.long), positions, sides,
                         instances, areas)  # fmt: skip


def test_targets_follow_the_occlusion_rule():
    made = _hand_scene()
    assert made.areas.tolist() == [[784, 784, 64, 400]]
    t = detection.detection_targets(made)
    assert t.labels.tolist() == [[3, 6, 0, 8]]
    assert t.targets.tolist() == [[False, True, False, True]]
    assert t.ignored.tolist() == [[True, False, False, False]]
    assert t.boxes[0, 0].tolist() == [0, 0, 4, 28] and t.boxes[0, 1].tolist() == [4, 0, 32, 28]
    assert t.boxes[0, 3].tolist() == [36, 36, 56, 56] and t.areas[0].tolist() == [112, 784, 0, 400]
    # A lower threshold makes the 14 %-visible item a target.
    assert detection.detection_targets(made, min_visible=0.1).targets[0].tolist() == [True, True, False, True]
    with pytest.raises(ValueError, match="min_visible must be in"):
        detection.detection_targets(made, min_visible=1.5)


def test_make_scenes_instance_maps_match_the_label_maps():
    pool, labels = _pool()
    made = scenes.make_scenes(pool, labels, 6, 64, items=(2, 4), seed=3)
    slots = made.instances.long() - 1
    cls = torch.where(slots >= 0, made.boxes[..., 0].gather(1, slots.clamp(min=0).flatten(1)).view_as(slots) + 1, 0)
    assert torch.equal(cls, made.masks.long())
    visible = torch.stack([(made.instances == k + 1).flatten(1).sum(1) for k in range(4)], 1)
    assert bool((visible <= made.areas).all()) and bool((made.areas[made.sides < 0] == 0).all())


def test_detection_source_flips_boxes_with_images_and_masks():
    source = _toy_source(masks=True)
    rows = torch.arange(16).view(2, 8)
    batches = list(source.train_batches(rows, seed=5))
    assert batches[0][0].shape == (8, 1, 64, 64) and len(batches[0][1]) == 8
    flipped = 0
    for (x, targets), index in zip(batches, rows):
        for image, target, i in zip(x, targets, index.tolist()):
            keep = source.train_objects.targets[i]
            assert torch.equal(target["labels"], source.train_objects.labels[i, keep])
            assert target["boxes"].dtype == torch.float32 and target["masks"].shape == (int(keep.sum()), 64, 64)
            for box, mask in zip(target["boxes"], target["masks"]):  # each box is its mask's extent
                ys, xs = mask.nonzero(as_tuple=True)
                assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            plain = mabn.apps.data.normalize(source.train_images[i][None], source.mean, source.std)[0]
            mirrored = not torch.equal(image, plain)
            flipped += mirrored
            boxes = source.train_objects.boxes[i, keep]
            if mirrored:
                assert torch.equal(image, plain.flip(-1))
                boxes = torch.stack([64 - boxes[:, 2], boxes[:, 1], 64 - boxes[:, 0], boxes[:, 3]], 1)
            assert torch.equal(target["boxes"], boxes)
    assert 0 < flipped < 16
    again = list(source.train_batches(rows, seed=5))
    assert all(torch.equal(a["boxes"], b["boxes"]) for (_, ta), (_, tb) in zip(batches, again) for a, b in zip(ta, tb))


def _perfect(source):
    return [
        {"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"]}
        for t in source.test_targets(0, source.num_test)
    ]


def test_coco_metrics_of_perfect_shifted_and_missing_detections():
    source = _toy_source()
    truth = source.coco_ground_truth()
    perfect = _perfect(source)
    assert detection.coco_metrics(truth, perfect) == {"box_ap": 100.0, "box_ap50": 100.0, "box_ap75": 100.0}
    shifted = [{**d, "boxes": d["boxes"] + 4.0} for d in perfect]
    moved = detection.coco_metrics(truth, shifted)
    assert moved["box_ap"] < moved["box_ap50"] <= 100.0 and moved["box_ap"] < 100.0
    relabelled = [{**d, "labels": d["labels"] % 10 + 1} for d in perfect]
    assert detection.coco_metrics(truth, relabelled)["box_ap"] == 0.0
    empty = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}] * 8
    assert detection.coco_metrics(truth, empty) == {"box_ap": 0.0, "box_ap50": 0.0, "box_ap75": 0.0}
    with pytest.raises(ValueError, match="7 detection lists for 8 ground-truth images"):
        detection.coco_metrics(truth, perfect[:7])


def test_detections_on_ignored_regions_count_neither_way():
    made = _hand_scene()
    targets = detection.detection_targets(made)
    truth = detection.coco_ground_truth(made.instances, targets)
    hits = {"boxes": targets.boxes[0, [1, 3]], "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([6, 8])}
    assert detection.coco_metrics(truth, [hits])["box_ap"] == 100.0
    on_ignored = {k: torch.cat([v, extra]) for (k, v), extra in zip(
        hits.items(), (targets.boxes[0, [0]], torch.tensor([0.95]), torch.tensor([3])))}  # fmt: skip
    assert detection.coco_metrics(truth, [on_ignored])["box_ap"] == 100.0
    # The same detection with the class of a real target, away from everything: a false positive that costs.
    elsewhere = {**on_ignored, "boxes": torch.cat([hits["boxes"], torch.tensor([[40.0, 2.0, 60.0, 20.0]])]),
                 "labels": torch.tensor([6, 8, 6])}  # fmt: skip
    assert detection.coco_metrics(truth, [elsewhere])["box_ap"] < 100.0


def test_mask_ap_of_the_true_masks():
    source = _toy_source(masks=True)
    detections = [
        {**d, "masks": t["masks"][:, None].float()} for d, t in zip(_perfect(source), source.test_targets(0, 8))
    ]
    metrics = detection.coco_metrics(source.coco_ground_truth(), detections, masks=True)
    assert metrics["mask_ap"] == 100.0 and metrics["box_ap"] == 100.0


def _norm_layers(model):
    kinds = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, mabn.StreamNorm)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("norm", ["mabn", "gn"])
def test_every_norm_comes_from_the_factory(arch, norm):
    kwargs = {"norm_batch_size": 2} if norm == "mabn" and arch != "maskrcnn_resnet_small" else {}
    model = models.build_model({"arch": arch, "norm": norm, "conv": "centralized", "norm_kwargs": kwargs})
    layers = _norm_layers(model)
    expected = mabn.MABN2d if norm == "mabn" else nn.GroupNorm
    assert layers and all(type(m) is expected for m in layers.values()), {n: type(m) for n, m in layers.items()}
    heads = [n for n in layers if n.startswith(("head.", "roi_heads."))]
    assert heads, "the heads have norm layers"
    convs = [m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n.startswith("backbone.")]
    assert convs and all(isinstance(m, mabn.CenConv2d) for m in convs)
    assert model.task == "detection" and models.ARCH_TASKS[arch] == "detection"


def test_one_stage_heads_have_norms_per_level_called_once_per_step():
    model = models.build_model(
        {"arch": "retinanet_resnet_small", "norm": "mabn", "norm_kwargs": {"norm_batch_size": 2}}
    )
    tower = model.head.classification_tower
    assert isinstance(tower, LevelTower) and len(tower.norms) == 3 and len(tower.convs) == 2
    calls = {}
    for name, m in _norm_layers(model).items():
        m.register_forward_hook(lambda mod, inp, out, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    images = [torch.randn(1, 96, 96) for _ in range(4)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([2])}] * 4
    for _ in range(2):
        sum(model(images, targets).values()).backward()
    assert set(calls.values()) == {2}, calls  # twice in two steps: once per step, whatever the level
    head = [m for n, m in _norm_layers(model).items() if n.startswith("head.")]
    assert len(head) == 2 * 2 * 3 and all(int(m.num_batches_tracked) == 2 for m in head)
    assert all(int(m.backward_steps) == int(m.forward_steps) == 4 for m in head)  # 2 groups of 2, 2 steps


def test_head_warmup_applies_to_the_heads_only():
    cfg = {"arch": "fcos_resnet_small", "norm": "mabn", "norm_kwargs": {"norm_batch_size": 2}, "head_warmup_iters": 700}
    model = models.build_model(cfg)
    warmups = {n: m.warmup_iters for n, m in _norm_layers(model).items()}
    assert {w for n, w in warmups.items() if n.startswith("head.")} == {700}
    assert {w for n, w in warmups.items() if n.startswith("backbone.")} == {100}
    with pytest.raises(ValueError, match="norm_batch_size"):
        models.build_model({"arch": "maskrcnn_resnet_small", "norm": "mabn", "norm_kwargs": {"norm_batch_size": 2}})


def test_feature_pyramid_folds_and_checkpoints():
    encoder = models.ResNet(models.BasicBlock, [1, 1, 1], [8, 16, 32], 1, 1, "small_stride2", "mabn",
                            {"norm_batch_size": 2}, "centralized")  # fmt: skip
    pyramid = models.FeaturePyramid(encoder, 16, (1, 2), 2, "mabn", {"norm_batch_size": 2}, "centralized")
    assert pyramid.strides == [4, 8, 16, 32] and pyramid.names == ["p2", "p3", "p4", "p5"]
    x = torch.randn(4, 1, 50, 70)
    for _ in range(3):
        sum(v.sum() for v in pyramid(x).values()).backward()
    pyramid.eval()
    folded, report = mabn.fold(pyramid, return_report=True)
    assert report.unfolded == [] and len(report.folded) == len(_norm_layers(pyramid))
    with torch.no_grad():
        for a, b in zip(pyramid(x).values(), folded(x).values()):
            assert_close(a, b, atol=1e-5, rtol=1e-5)
    pyramid.checkpoint_stages = True
    assert encoder.checkpoint_stages
    with pytest.raises(ValueError, match="stages must be increasing"):
        models.FeaturePyramid(encoder, 16, (2, 1))


def _model_and_source(arch="fcos_resnet_small", norm="mabn", masks=False):
    kwargs = {"norm_batch_size": 2} if arch != "maskrcnn_resnet_small" else {}
    cfg = {"arch": arch, "norm": norm, "conv": "centralized", "norm_kwargs": kwargs, "width": 8}
    return models.build_model(cfg), _toy_source(masks=masks)


@pytest.mark.parametrize("arch", ARCHS)
def test_folded_detector_has_the_same_ap(arch):
    from mabn.apps.train.evaluate import evaluate, evaluate_folded, training_loss

    model, source = _model_and_source(arch, masks=arch == "maskrcnn_resnet_small")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for x, y in source.train_batches(torch.arange(32).view(4, 8), seed=0):
        optimizer.zero_grad()
        training_loss(model, x, y, "detection")[0].backward()
        optimizer.step()
    device = torch.device("cpu")
    plain = evaluate(model, source, 4, device)
    folded, note = evaluate_folded(model, source, 4, device)
    assert note is None and model.training and folded.keys() == plain.keys()
    # The folded model computes the same up to rounding: an AP may move by a detection that sits on a
    # score or IoU threshold (one in this toy set of 4 scenes moves it by 1e-4), never by more.
    for key, value in plain.items():
        assert abs(folded[key] - value) <= 1e-3, (key, folded[key], value)
    assert set(plain) >= {"box_ap", "box_ap50", "box_ap75"}
    assert ("mask_ap" in plain) == (arch == "maskrcnn_resnet_small")
    model.eval()
    fused, report = mabn.fold(model, return_report=True)
    assert not any(n.startswith("backbone.") for n, _, _ in report.unfolded)  # the backbone folds entirely
    with torch.no_grad():
        a, b = model(list(next(source.test_batches(2))[0])), fused(list(next(source.test_batches(2))[0]))
    for da, db in zip(a, b):
        assert_close(da["boxes"], db["boxes"], atol=1e-3, rtol=1e-4)


def test_library_does_not_import_torchvision():
    import subprocess
    import sys

    code = "import sys, mabn, mabn.models; mabn.models.build_model({'arch': 'fpn_resnet_small'}); " \
        "assert 'torchvision' not in sys.modules; mabn.models.build_model({'arch': 'fcos_resnet_small'}); " \
        "assert 'torchvision' in sys.modules"  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plot_detections(tmp_path):
    source = _toy_source()
    truth, ignored = detection.ground_truth_rows(source, 3)
    rows = {"ground truth": truth, "model": [{**d, "scores": torch.full((len(d["labels"]),), 0.5)} for d in truth]}
    path = detection.plot_detections(source.test_images[:3], rows, tmp_path / "d" / "boxes.png", ignored=ignored)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and sorted(p.name for p in path.parent.iterdir()) == [
        "boxes.png"
    ]
    with pytest.raises(ValueError, match="row 'model' has 2 scenes, the images 3"):
        detection.plot_detections(source.test_images[:3], {"model": truth[:2]}, tmp_path / "x.png")


# ---- mabn train --task detection ---------------------------------------------------------------

TRAIN = ["train", "--task", "detection", "--data", "fashion-scenes", "--limit-train", "64", "--limit-test", "16",
         "--width", "8", "--batch-size", "8", "--epochs", "2", "--threads", "1", "--no-progress",
         "--norm", "mabn", "--norm-batch-size", "2", "--conv", "centralized"]  # fmt: skip


def _run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_detection_options_are_checked(capsys, tmp_path):
    base = ["train", "--data", "fashion-scenes", "--out", str(tmp_path / "x")]
    cases = [
        (["--task", "detection", "--arch", "fpn_resnet_small"], "--arch fpn_resnet_small is not a detector"),
        (["--task", "segmentation", "--arch", "fcos_resnet_small"], "is not a segmentation head"),
        (["--data", "synthetic", "--task", "detection"], "that data source is for classification"),
        (["--task", "detection", "--head-warmup-iters", "5"], "'bn' has none"),
        (["--head-warmup-iters", "5", "--norm", "mabn"], "applies to detectors"),
        (["--task", "detection", "--recalibrate", "5"], "detectors train on images and targets"),
    ]
    for extra, message in cases:
        code, _, err = _run([*base, *extra], capsys)
        assert code == 2 and message in err, (extra, err)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_train_detection_end_to_end_and_resume_bit_identical(fashion_mnist_dir, tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    assert _run([*TRAIN, "--out", str(full)], capsys)[0] == 0
    result = json.loads((full / "result.json").read_text())
    assert result["task"] == "detection" and result["box_ap"] == result["box_ap_folded"]
    assert 0.0 <= result["box_ap"] <= 100.0 and {"box_ap50", "box_ap75"} <= set(result)
    assert _run([*TRAIN, "--out", str(part), "--stop-after", "1"], capsys)[0] == 0
    assert not (part / "result.json").exists()
    assert _run([*TRAIN, "--out", str(part), "--resume"], capsys)[0] == 0
    resumed = json.loads((part / "result.json").read_text())
    assert resumed["param_digest"] == result["param_digest"] and resumed["box_ap"] == result["box_ap"]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_checkpointed_activations_train_the_same_dense_model(fashion_mnist_dir, tmp_path, capsys, task):
    argv = [*TRAIN, "--epochs", "1"]
    argv[argv.index("detection")] = task
    digests = []
    for i, extra in enumerate(([], ["--checkpoint-activations"])):
        assert _run([*argv, "--out", str(tmp_path / str(i)), *extra], capsys)[0] == 0
        digests.append(json.loads((tmp_path / str(i) / "result.json").read_text())["param_digest"])
    assert digests[0] == digests[1]
    checkpoint = torch.load(tmp_path / "1" / "checkpoint.pt", weights_only=False)
    assert checkpoint["config"]["checkpoint_activations"] is True


@pytest.mark.slow
def test_accumulation_init_and_export_of_a_detector(fashion_mnist_dir, tmp_path, capsys):
    classifier = tmp_path / "cls"
    pretrain = ["train", "--data", "fashion-mnist", "--limit-train", "64", "--limit-test", "32", "--width", "8",
                "--epochs", "1", "--threads", "1", "--no-progress", "--out", str(classifier)]  # fmt: skip
    assert _run(pretrain, capsys)[0] == 0
    out = tmp_path / "det"
    argv = [
        *TRAIN,
        "--epochs",
        "1",
        "--accumulate",
        "2",
        "--init",
        str(classifier / "checkpoint.pt"),
        "--out",
        str(out),
    ]
    code, printed, err = _run(argv, capsys)
    assert code == 0, err
    assert "initialized the encoder" in printed
    ckpt = out / "checkpoint.pt"
    code, printed, err = _run(["export", str(ckpt), "-o", str(tmp_path / "d.onnx")], capsys)
    assert code == 0, err
    assert "backbone and feature pyramid" in printed and printed.count("max abs difference") == 3
    errors = [float(line.rsplit(" ", 1)[1]) for line in printed.splitlines() if "max abs difference" in line]
    assert max(errors) < 1e-4
    code, printed, err = _run(["export", str(ckpt), "-o", str(tmp_path / "w.onnx"), "--whole-detector"], capsys)
    assert code == 0, err
    assert printed.count("detections, max abs difference") == 3, printed


def test_training_loss_of_each_task():
    from mabn.apps.train.evaluate import to_device, training_loss

    model, source = _model_and_source()
    x, y = next(source.train_batches(torch.arange(4)[None], seed=0))
    loss, logits = training_loss(model, x, to_device(y, torch.device("cpu")), "detection")
    assert logits is None and loss.dim() == 0 and torch.isfinite(loss)
    net = models.resnet_small(width=4)
    loss, logits = training_loss(net, torch.randn(2, 1, 28, 28), torch.tensor([1, 2]), "classification")
    assert logits.shape == (2, 10)


def test_config_file_that_is_binary_names_the_option_and_the_file(tmp_path, capsys):
    path = tmp_path / "model.pt"
    torch.save({"model": torch.zeros(3)}, path)
    code, _, err = _run(["train", "--config", str(path), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and f"--config {path}: not a text file" in err and "JSON object of training options" in err
    assert "utf-8" not in err and not (tmp_path / "o").exists()


def test_reproduce_detection_grid_rows():
    from mabn.apps import reproduce

    labels = [r.label for r in reproduce.GRIDS["detection"]]
    assert labels == ["BN(16)", "BN(2)", "BRN(2)", "GN", "MABN(2)", "BN(16)+WC", "BN(2)+WC",
                      "SyncBN(16) x2 processes"]  # fmt: skip
    assert [r.label for r in reproduce.GRIDS["segmentation"]] == labels
    base = {**trainer.DEFAULTS, **reproduce.GRID_SPECS["detection"].protocol}
    configs = [
        trainer.check_config(r.config(base, 0, __import__("pathlib").Path("/tmp/x")))
        for r in reproduce.GRIDS["detection"]
    ]
    assert {c["task"] for c in configs} == {"detection"} and {c["arch"] for c in configs} == {"fcos_resnet_small"}


@pytest.mark.slow
def test_synced_detector_under_torchrun_keeps_every_buffer_identical(fashion_mnist_dir, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    argv = [a for a in TRAIN[1:] if a != "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mabn",
           "train", *argv, "--epochs", "1", "--sync-norm", "--head-warmup-iters", "2", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "synced" in proc.stdout and "2 process(es)" in proc.stdout
    rank0 = (out / "params-rank0.sha256").read_text().split()
    assert rank0 == (out / "params-rank1.sha256").read_text().split()  # heads' per-level norms synced too
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["box_ap"] == result["box_ap_folded"]


@pytest.mark.parametrize(
    "module", ["mabn.models.fpn", "mabn.models.detection", "mabn.apps.detection", "mabn.apps.scenes"]
)
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
