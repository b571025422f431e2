"""The zoo: real torchvision and timm models through conversion, training, folding, reverting and ONNX export.

    python benchmarks/zoo.py                  # every architecture -> results/zoo.md (about 2 hours, one core)
    python benchmarks/zoo.py --only resnet18 --only timm/efficientnet_b0    # some rows, printed
    python benchmarks/zoo.py --derive-timm-list   # recompute results/zoo_timm_models.txt (~10 minutes)

The architectures: every classification, detection, segmentation and video builder of torchvision
(``torchvision.models.list_models`` of each module; video models on clips of their minimum frame
count, 4 frames when they have none), and the smallest model (by parameter count)
of every timm family that contains a BatchNorm, from the list ``results/zoo_timm_models.txt``
(``--derive-timm-list`` writes it: a family is a timm model module and the name of the model
without its size, as ``resnet`` in ``resnet10t``). Random weights, nothing downloaded.

Each row, on a model whose BatchNorm statistics and affine parameters were made non-trivial first
(random affine parameters, running statistics of a few training-mode batches; detection models
with their backbone frozen into torchvision's ``FrozenBatchNorm2d``, as torchvision builds them
for pretrained backbones):

* converted: ``mabn.convert_model(model.eval(), "mabn", norm_batch_size=2, preserve="function")``,
  the norm layers converted, by class;
* kept: the largest relative change of the evaluation-mode outputs (max |a - b| / max |b| per
  output; detection models: backbone features and every head on fixed inputs);
* train: one SGD step at 4 samples (2 normalization groups of 2) is finite (loss, gradients,
  parameters and buffers);
* fold: ``mabn.fold`` of the converted model: the output change, the layers folded, and the
  norm layers left with the reason (the report's fold coverage counts them over the whole zoo);
* revert: ``mabn.revert_model``: the output change, the original classes back, and the state dict
  loads with ``strict=True`` into a freshly built model of the same name;
* ONNX: ``mabn.export_model`` to ONNX, run in onnxruntime (detection models: their backbone).

A row passes when every check does; a conversion that refuses (a ``ValueError`` naming the layer)
is reported as a deliberate refusal with its reason. Each architecture runs in its own process.
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import functools
import json
import math
import multiprocessing
import re
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "results" / "zoo.md"
TIMM_LIST = ROOT / "results" / "zoo_timm_models.txt"
DEFAULT_CACHE = ROOT / "runs" / "zoo" / "rows.jsonl"

# Tolerances (relative to the largest output): float32 through tens of layers.
TOL_KEPT = 1e-4
TOL_FOLD = 1e-4
TOL_REVERT = 1e-4
TOL_ONNX = 1e-3
SIZES = (64, 96, 128, 224, 299)  # input sizes tried in order, until the model runs
FRAMES = 4  # frames of a video clip, for the models without a minimum of their own
NUM_CLASSES = 10
TIMEOUT = 3600  # seconds per architecture

if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))  # this checkout's mabn, also in the per-architecture processes


@dataclasses.dataclass(frozen=True)
class Arch:
    """One architecture of the zoo."""

    source: str  # "torchvision" or "timm"
    task: str  # "classification", "detection", "segmentation" or "video" (classification of clips)
    name: str
    family: str = ""
    variant: str = ""  # "", or one of VARIANTS: the model's BatchNorms as another class

    @property
    def key(self) -> str:
        return f"{self.source}/{self.name}" + (f"+{self.variant}" if self.variant else "")


#: Variants of a model, to cover every kind of norm layer the converters know (and one they refuse):
#: "sync" torch's SyncBatchNorm (timm: its SyncBatchNormAct), "frozen" frozen BatchNorms (torchvision's
#: FrozenBatchNorm2d; timm: freeze_batch_norm_2d, with FrozenBatchNormAct2d), "splitbn" timm's
#: SplitBatchNorm2d (a BatchNorm subclass with its own forward: refused).
VARIANTS = ("sync", "frozen", "splitbn")
#: Why a refusal is the intended outcome, for the rows built to be refused.
DELIBERATE = {
    "splitbn": "SplitBatchNorm2d normalizes each part of a training batch with a BatchNorm of its own (AugMix's "
    "split BN); no layer of mabn computes that, so the converter names the layer and refuses instead of guessing",
}
EXTRA_ARCHS = [
    Arch("torchvision", "classification", "resnet18", variant="sync"),
    Arch("torchvision", "classification", "resnet18", variant="frozen"),
    Arch("timm", "classification", "mobilenetv3_small_050", variant="sync"),
    Arch("timm", "classification", "mobilenetv3_small_050", variant="frozen"),
    Arch("timm", "classification", "resnet18", variant="splitbn"),
]


# ---- the list of architectures ---------------------------------------------------------------------


def torchvision_archs() -> list[Arch]:
    import torchvision.models as tvm

    archs = [Arch("torchvision", "classification", n) for n in tvm.list_models(module=tvm)]
    archs += [Arch("torchvision", "detection", n) for n in tvm.list_models(module=tvm.detection)]
    archs += [Arch("torchvision", "segmentation", n) for n in tvm.list_models(module=tvm.segmentation)]
    archs += [Arch("torchvision", "video", n) for n in tvm.list_models(module=tvm.video)]
    return archs


@functools.cache
def video_minimum(name: str) -> tuple[int, int]:
    """(the smallest frame size, the frame count) of a torchvision video model's clips, from its weights' metadata."""
    import torchvision.models as tvm

    meta = next(iter(tvm.get_model_weights(name))).meta
    return int(meta.get("min_size", (1, 1))[-1]), int(meta.get("min_temporal_size", FRAMES))


def timm_archs(path: Path = TIMM_LIST) -> list[Arch]:
    rows = [line.split("\t") for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return [Arch("timm", "classification", name, family) for family, name, _ in rows]


_NAME_PREFIXES = {"tf", "gluon", "legacy", "ig", "ssl", "swsl", "timm", "hf", "tv", "fb", "dm"}


def timm_family(name: str, module: str) -> str:
    """``"<model module>/<name root>"``: ``resnet10t`` -> ``resnet/resnet``, ``tf_mixnet_s`` -> ``efficientnet/mixnet``."""
    tokens = name.split("_")
    while len(tokens) > 1 and tokens[0] in _NAME_PREFIXES:
        tokens = tokens[1:]
    root = re.sub(r"\d.*$", "", tokens[0]) or tokens[0]
    return f"{module.rsplit('.', 1)[-1]}/{root}"


def derive_timm_list(path: Path = TIMM_LIST) -> None:
    """Build every timm model on the meta device and keep the smallest of each family with a BatchNorm."""
    import timm
    import torch

    from mabn.convert import is_norm_layer

    families: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
    names = timm.list_models()
    for i, name in enumerate(names):
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        if any(is_norm_layer(m) for m in model.modules()):
            params = sum(p.numel() for p in model.parameters())
            families[timm_family(name, type(model).__module__)].append((params, name))
        if (i + 1) % 100 == 0:
            print(f"{i + 1}/{len(names)} models built", flush=True)
    lines = [
        f"# The smallest model of each of the {len(families)} families of timm {timm.__version__} that contain "
        f"a BatchNorm (of {len(names)} models).",
        "# Written by: python benchmarks/zoo.py --derive-timm-list",
        "# family\tmodel\tparameters",
    ]
    for family in sorted(families):
        params, name = min(families[family])
        lines.append(f"{family}\t{name}\t{params}")
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path} ({len(families)} families)")


# ---- building and preparing models -----------------------------------------------------------------


def build(arch: Arch):
    """The model with random weights (nothing downloaded)."""
    if arch.source == "timm":
        import timm

        return timm.create_model(arch.name, pretrained=False, num_classes=NUM_CLASSES)
    import torchvision.models as tvm

    if arch.task in ("classification", "video"):
        return tvm.get_model(arch.name, weights=None, num_classes=NUM_CLASSES)
    if arch.task == "segmentation":
        return tvm.get_model(arch.name, weights=None, weights_backbone=None, num_classes=3, aux_loss=False)
    kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None, "num_classes": 2}
    if not arch.name.startswith("ssd"):
        kwargs.update(min_size=64, max_size=64)  # the images are resized to this
    return tvm.get_model(arch.name, **kwargs)


def restructure(arch: Arch, model):
    """The norm classes of the variant that do not depend on the statistics (sync, split BN)."""
    if arch.variant == "sync":
        if arch.source == "timm":
            import timm.layers

            model = timm.layers.convert_sync_batchnorm(model)
        else:
            from torch import nn

            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif arch.variant == "splitbn":
        import timm.layers

        model = timm.layers.convert_splitbn_model(model, 2)
    return model


def freeze(arch: Arch, model):
    """Frozen BatchNorms (after the warm-up: they keep the statistics): the detection models' backbone,
    as torchvision builds them on a pretrained backbone, and the "frozen" variant."""
    if arch.task == "detection":
        freeze_backbone(model)
    elif arch.variant == "frozen" and arch.source == "timm":
        import timm.layers

        model = timm.layers.freeze_batch_norm_2d(model)
    elif arch.variant == "frozen":
        freeze_backbone(model, whole=True)
    return model


def build_structure(arch: Arch):
    """The model with the classes the zoo checks (statistics not warmed up): what a revert must load into."""
    return freeze(arch, restructure(arch, build(arch)))


def freeze_backbone(model, whole: bool = False) -> None:
    """torchvision's FrozenBatchNorm2d in the backbone's body (or the whole model), as torchvision builds
    detection models on a pretrained backbone."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    if whole:
        body = model
    else:
        body = model.backbone.body if hasattr(model.backbone, "body") else model.backbone
    for name, m in list(body.named_modules()):
        if type(m).__name__ == "BatchNorm2d":
            frozen = FrozenBatchNorm2d(m.num_features, m.eps)
            frozen.weight.copy_(m.weight.detach())
            frozen.bias.copy_(m.bias.detach())
            frozen.running_mean.copy_(m.running_mean)
            frozen.running_var.copy_(m.running_var)
            frozen.train(m.training)
            parent, _, leaf = name.rpartition(".")
            body.get_submodule(parent)._modules[leaf] = frozen


def norm_classes(model) -> collections.Counter:
    from mabn.adapters import looks_like_norm
    from mabn.convert import is_norm_layer

    return collections.Counter(
        type(m).__name__ for m in model.modules() if is_norm_layer(m) or looks_like_norm(m) is not None
    )


def meta_census(arch: Arch) -> tuple[bool, float] | None:
    """(has norm layers, parameters in millions) from a build on the meta device; None when that fails."""
    import torch

    try:
        with torch.device("meta"):
            model = build(arch)
    except Exception:  # noqa: BLE001 - some builders compute values at build time: build it for real
        return None
    return bool(norm_classes(model)), sum(p.numel() for p in model.parameters()) / 1e6


def batch(arch: Arch, size: int, n: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    frames = (video_minimum(arch.name)[1],) if arch.task == "video" else ()
    x = torch.rand(n, 3, *frames, size, size, generator=g)
    return x * 2 - 0.5  # a non-zero mean and a spread other than 1 in every layer


def detection_targets(model, n: int, size: int) -> list[dict[str, Any]]:
    import torch

    g = torch.Generator().manual_seed(3)
    targets = []
    for _ in range(n):
        x1, y1 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        w, h = torch.randint(size // 4, size // 2, (2,), generator=g).tolist()
        target = {"boxes": torch.tensor([[x1, y1, x1 + w, y1 + h]], dtype=torch.float32), "labels": torch.tensor([1])}
        heads = getattr(model, "roi_heads", None)
        if heads is not None and getattr(heads, "mask_head", None) is not None:
            mask = torch.zeros(1, size, size, dtype=torch.uint8)
            mask[0, y1 : y1 + h, x1 : x1 + w] = 1
            target["masks"] = mask
        if heads is not None and getattr(heads, "keypoint_head", None) is not None:
            k = heads.keypoint_predictor.kps_score_lowres.out_channels
            xs = torch.randint(x1, x1 + w, (k,), generator=g).float()
            ys = torch.randint(y1, y1 + h, (k,), generator=g).float()
            target["keypoints"] = torch.stack([xs, ys, torch.ones(k)], 1)[None]
        targets.append(target)
    return targets


def tensors(value: Any) -> list:
    """Every tensor of a model's output, in a fixed order (tensors, tuples, lists, dicts)."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for k in value for t in tensors(value[k])]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors(v)]
    return []


def detection_outputs(model, x) -> list:
    """Everything a detection model computes before its data-dependent steps (proposals, NMS):
    backbone features, and every head on those features or on fixed region features."""
    import torch

    feats = model.backbone(x)
    levels = list(feats.values())
    outs = list(levels)
    if hasattr(model, "rpn"):
        outs += tensors(model.rpn.head(levels))
    if hasattr(model, "head"):
        outs += tensors(model.head(levels))
    if hasattr(model, "roi_heads"):
        rh, channels = model.roi_heads, model.backbone.out_channels
        g = torch.Generator().manual_seed(1)
        box = rh.box_head(torch.randn(8, channels, 7, 7, generator=g))
        outs += [box, *tensors(rh.box_predictor(box))]
        for head, predictor in (("mask_head", "mask_predictor"), ("keypoint_head", "keypoint_predictor")):
            if getattr(rh, head, None) is not None:
                feat = getattr(rh, head)(torch.randn(4, channels, 14, 14, generator=g))
                outs += [feat, *tensors(getattr(rh, predictor)(feat))]
    return outs


def outputs(arch: Arch, model, x) -> list:
    import torch

    with torch.no_grad():
        if arch.task == "detection":
            return detection_outputs(model, x)
        return tensors(model(x))


def rel_error(got: list, expected: list) -> float:
    if len(got) != len(expected):
        return math.inf
    worst = 0.0
    for a, b in zip(got, expected):
        if a.shape != b.shape:
            return math.inf
        scale = b.abs().max().item() if b.numel() else 0.0
        diff = (a.double() - b.double()).abs().max().item() if b.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst if math.isfinite(worst) else math.inf


@dataclasses.dataclass
class Warmup:
    """Non-trivial BatchNorm state: random affine parameters, statistics of a few training batches."""

    batches: int = 2

    def __call__(self, arch: Arch, model, size: int) -> None:
        import torch
        from torch import nn

        momentum = {}
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    if m.weight is not None:
                        m.weight.uniform_(0.5, 1.5)
                        m.bias.normal_(0, 0.3)
                    momentum[m] = m.momentum
                    m.momentum = 0.5
            model.train()
            for i in range(self.batches):
                x = batch(arch, size, 4, seed=100 + i)
                if arch.task == "detection":
                    detection_outputs(model, x)
                else:
                    model(x)
        for m, value in momentum.items():
            m.momentum = value
        model.eval()


def pick_size(arch: Arch, model) -> int:
    """The smallest of SIZES at which the model runs in training and evaluation mode."""
    import torch

    sizes = list(SIZES)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        sizes.append(int(cfg["input_size"][-1]))
    if arch.name.startswith("ssd"):
        sizes = [int(re.search(r"\d+", arch.name.split("_")[0]).group())]  # fixed by the builder
    if arch.task == "video":  # s3d needs 224 px: skip the sizes below the model's minimum
        smallest = video_minimum(arch.name)[0]
        sizes = [s for s in sizes if s >= smallest] or [smallest]
    error = None
    for size in sorted(set(sizes)):
        try:
            state = copy.deepcopy(model.state_dict())
            with torch.no_grad():
                model.train()
                outputs(arch, model, batch(arch, size, 4, seed=0))
                model.eval()
                outputs(arch, model, batch(arch, size, 2, seed=0))
            model.load_state_dict(state)
            return size
        except Exception as exc:  # noqa: BLE001 - too small for this model: try the next size
            error = exc
            model.load_state_dict(state)
    raise RuntimeError(f"runs at none of the sizes {sorted(set(sizes))}: {type(error).__name__}: {error}")


# ---- one row ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    key: str
    source: str
    task: str
    family: str = ""
    params: float = 0.0  # millions
    size: int = 0
    norms: dict[str, int] = dataclasses.field(default_factory=dict)
    converted: int = 0
    kept: float | None = None
    train: str = ""
    fold: float | None = None
    folded: int = 0
    left: dict[str, int] = dataclasses.field(default_factory=dict)
    revert: float | None = None
    revert_note: str = ""
    onnx: float | None = None
    onnx_note: str = ""
    status: str = ""
    note: str = ""
    seconds: float = 0.0


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _all_finite(model) -> bool:
    import torch

    values = [*model.parameters(), *model.buffers()]
    values += [p.grad for p in model.parameters() if p.grad is not None]
    return all(bool(torch.isfinite(t).all()) for t in values if t.is_floating_point())


def train_step(arch: Arch, model, size: int) -> str:
    """One SGD step at 4 samples (2 groups of 2): "ok (loss ...)" or what is not finite."""
    import torch
    import torch.nn.functional as F

    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    x = batch(arch, size, 4, seed=7)
    if arch.task == "detection":
        losses = model(list(x.clamp(0, 1)), detection_targets(model, 4, size))
        loss = sum(losses.values())
    elif arch.task == "segmentation":
        out = model(x)["out"]
        target = torch.randint(0, out.shape[1], (4, *out.shape[2:]), generator=torch.Generator().manual_seed(5))
        loss = F.cross_entropy(out, target)
    else:
        labels = torch.randint(0, NUM_CLASSES, (4,), generator=torch.Generator().manual_seed(5))
        loss = sum(F.cross_entropy(t, labels) for t in tensors(model(x)) if t.dim() == 2)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    model.eval()
    if not torch.isfinite(loss):
        return f"loss {loss.item()}"
    if not _all_finite(model):
        return "non-finite gradients, parameters or buffers"
    return f"ok (loss {loss.item():.3g})"


def onnx_check(arch: Arch, model, x, threads: int) -> float:
    import numpy as np
    import onnxruntime as ort
    import torch

    import mabn

    part = model.backbone if arch.task == "detection" else model
    with torch.no_grad():
        expected = tensors(part(x))
    with tempfile.TemporaryDirectory() as tmp:
        path = mabn.export_model(part, Path(tmp) / "model.onnx", example_input=x)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return rel_error([torch.from_numpy(np.asarray(g)) for g in got[:1]], expected[:1])


def check(arch: Arch, threads: int = 1, onnx: bool = True) -> Row:
    """Run every check of the zoo on one architecture (``onnx=False``: all but the ONNX export)."""
    import torch

    import mabn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    row = Row(arch.key, arch.source, arch.task, arch.family)
    census = meta_census(arch) if not arch.variant else None
    if census is not None and not census[0]:
        row.params, row.status, row.note = census[1], "no BatchNorm", "nothing to convert"
        row.seconds = time.perf_counter() - start
        return row
    model = restructure(arch, build(arch))
    row.params = sum(p.numel() for p in model.parameters()) / 1e6
    if not norm_classes(model):
        row.status, row.note = "no BatchNorm", "nothing to convert"
        row.seconds = time.perf_counter() - start
        return row
    size = row.size = pick_size(arch, model)
    Warmup()(arch, model, size)
    model = freeze(arch, model).eval()  # after the warm-up: frozen layers hold non-trivial statistics
    row.norms = dict(norm_classes(model))
    x = batch(arch, size, 2, seed=1)
    expected = outputs(arch, model, x)
    original_types = [(name, type(m)) for name, m in model.named_modules()]
    try:
        if arch.task == "detection":
            # Region heads see one sample per region, whose count need not be even: whole-batch statistics there.
            for name, child in model.named_children():
                nbs = None if name == "roi_heads" else 2
                mabn.convert_model(child, "mabn", norm_batch_size=nbs, preserve="function")
        else:
            model = mabn.convert_model(model, "mabn", norm_batch_size=2, preserve="function")
    except ValueError as exc:
        row.status, row.note = "refused", _short(exc, 400)
        row.seconds = time.perf_counter() - start
        return row
    row.converted = sum(isinstance(m, mabn.StreamNorm) for m in model.modules())
    converted_out = outputs(arch, model, x)
    row.kept = rel_error(converted_out, expected)
    failures = []
    if not row.kept <= TOL_KEPT:
        failures.append("kept")
    # fold
    try:
        example = None if arch.task == "detection" else x
        folded, report = mabn.fold(model, example_input=example, return_report=True)
        row.fold = rel_error(outputs(arch, folded, x), converted_out)
        row.folded = len(report.folded)
        row.left = dict(collections.Counter(reason for _, _, reason in report.unfolded))
        left_mabn = [type(m).__name__ for m in folded.modules() if type(m).__module__.startswith("mabn.")]
        if left_mabn:
            failures.append(f"fold left {left_mabn[:3]}")
        del folded
    except Exception as exc:  # noqa: BLE001 - a row reports what failed
        row.left = {_short(exc): 1}
    if not (row.fold is not None and row.fold <= TOL_FOLD):
        failures.append("fold")
    # revert
    try:
        back = mabn.revert_model(copy.deepcopy(model))
        row.revert = rel_error(outputs(arch, back, x), converted_out)
        types = [(name, type(m)) for name, m in back.named_modules()]
        notes = []
        if types != original_types:
            wrong = [f"{n}: {t.__name__}" for (n, t), o in zip(types, original_types) if (n, t) != o][:2]
            notes.append(f"classes differ ({', '.join(wrong)})")
        fresh = build_structure(arch)
        fresh.load_state_dict(back.state_dict(), strict=True)
        notes.append("strict load ok")
        row.revert_note = "; ".join(notes)
        del back, fresh
        if len(notes) > 1:
            failures.append("revert classes")
    except Exception as exc:  # noqa: BLE001
        row.revert_note = _short(exc)
        failures.append("revert")
    if not (row.revert is not None and row.revert <= TOL_REVERT):
        failures.append("revert")
    if onnx:
        try:
            row.onnx = onnx_check(arch, model, x, threads)
            if arch.task == "detection":
                row.onnx_note = "backbone"
        except Exception as exc:  # noqa: BLE001
            row.onnx_note = _short(exc)
        if not (row.onnx is not None and row.onnx <= TOL_ONNX):
            failures.append("onnx")
    # one training step, last (it changes the model)
    try:
        row.train = train_step(arch, model, size)
    except Exception as exc:  # noqa: BLE001
        row.train = _short(exc)
    if not row.train.startswith("ok"):
        failures.append("train")
    row.status = "pass" if not failures else "FAIL"
    row.note = ", ".join(dict.fromkeys(failures))
    row.seconds = time.perf_counter() - start
    return row


def _child(arch: Arch, threads: int, conn) -> None:
    warnings.filterwarnings("ignore")
    try:
        row = check(arch, threads)
    except Exception as exc:  # noqa: BLE001
        row = Row(arch.key, arch.source, arch.task, arch.family, status="FAIL", note=_short(exc, 300))
        traceback.print_exc()
    conn.send(dataclasses.asdict(row))
    conn.close()


def run_isolated(arch: Arch, threads: int, timeout: float = TIMEOUT) -> Row:
    """``check(arch)`` in a process of its own (memory returned, a crash or hang contained)."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(arch, threads, child), daemon=True)
    start = time.perf_counter()
    process.start()
    child.close()
    row = None
    if parent.poll(timeout):
        try:
            row = Row(**parent.recv())
        except EOFError:
            row = None
    process.join(30)
    if process.is_alive():
        process.kill()
        process.join()
    if row is None:
        why = f"no result within {timeout:.0f} s" if process.exitcode is None else f"exit code {process.exitcode}"
        row = Row(arch.key, arch.source, arch.task, arch.family, status="FAIL", note=f"crashed ({why})")
        row.seconds = time.perf_counter() - start
    return row


# ---- the report ------------------------------------------------------------------------------------


def _err(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "inf"
    return "0" if value == 0 else f"{value:.1e}"


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" if v > 1 else k for k, v in sorted(d.items(), key=lambda kv: -kv[1]))


def summary(rows: list[Row]) -> str:
    n = len(rows)
    with_bn = [r for r in rows if r.status != "no BatchNorm"]
    converted = [r for r in with_bn if r.converted]
    kept = [r for r in converted if r.kept is not None and r.kept <= TOL_KEPT]
    trained = [r for r in converted if r.train.startswith("ok")]
    folded = [r for r in converted if r.fold is not None and r.fold <= TOL_FOLD]
    reverted = [r for r in converted if r.revert is not None and r.revert <= TOL_REVERT and "strict" in r.revert_note]
    onnx = [r for r in converted if r.onnx is not None and r.onnx <= TOL_ONNX]
    refused = [r for r in rows if r.status == "refused"]
    failed = [r for r in rows if r.status == "FAIL"]
    tv = sum(r.source == "torchvision" for r in rows)
    return (
        f"**{n} architectures** ({tv} torchvision, {n - tv} timm), {len(with_bn)} with BatchNorm: "
        f"{len(converted)} converted, {len(kept)} kept their function, {len(trained)} trained, "
        f"{len(folded)} folded, {len(reverted)} reverted, {len(onnx)} exported to ONNX; "
        f"{len(refused)} refused deliberately, {len(failed)} failed; "
        f"{n - len(with_bn)} without BatchNorm (nothing to convert)."
    )


def markdown(rows: list[Row], command: str) -> str:
    import timm
    import torch
    import torchvision

    lines = [
        "# The zoo: torchvision and timm models through mabn",
        "",
        summary(rows),
        "",
        *(line for t in totals(rows) for line in (t, "")),
        f"Written by `{command}` (torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"timm {timm.__version__}; random weights; one thread). The timm models are listed in "
        "`results/zoo_timm_models.txt` (the smallest model of every timm family that contains a BatchNorm, "
        "written by `python benchmarks/zoo.py --derive-timm-list`). What each column checks is in the docstring "
        "of `benchmarks/zoo.py`.",
        "",
        f"Columns: **norms** the norm layers of the model, by class; **converted** the layers converted by "
        f'`convert_model(model.eval(), "mabn", norm_batch_size=2, preserve="function")`; **kept** the largest '
        f"relative change of the evaluation outputs (pass: at most {TOL_KEPT:g}); **train** one SGD step at 2 "
        f"samples per normalization group; **fold** the output change after `mabn.fold` (pass: at most "
        f"{TOL_FOLD:g}), layers folded, and the norm layers left with why; **revert** the output change after "
        f"`mabn.revert_model` (pass: at most {TOL_REVERT:g}), the original classes back and a `strict=True` load "
        f"into a new model; **ONNX** the relative error of onnxruntime on the exported model (pass: at most "
        f"{TOL_ONNX:g}). Sizes are input pixels (the smallest of {', '.join(map(str, SIZES))} or the model's own "
        f"at which it runs; video clips of the model's minimum frame count, else {FRAMES} frames).",
        "",
    ]
    sections = [
        (
            "torchvision classification",
            lambda r: "+" not in r.key and r.source == "torchvision" and r.task == "classification",
        ),
        ("torchvision detection", lambda r: "+" not in r.key and r.task == "detection"),
        ("torchvision segmentation", lambda r: "+" not in r.key and r.task == "segmentation"),
        ("torchvision video", lambda r: "+" not in r.key and r.task == "video"),
        ("timm", lambda r: "+" not in r.key and r.source == "timm"),
        ("variants: the same models with other norm classes", lambda r: "+" in r.key),
    ]
    header = "| model | size | params (M) | norms | converted | kept | train | fold | folded / left | revert | ONNX | status |"
    for title, pick in sections:
        chosen = [r for r in rows if pick(r)]
        if not chosen:
            continue
        lines += [f"## {title} ({len(chosen)})", "", header, "|" + "---|" * 12]
        for r in chosen:
            name = r.key.split("/", 1)[1] + (f" ({r.family})" if r.family else "")
            if r.status in ("no BatchNorm", "refused") or (r.status == "FAIL" and not r.converted):
                lines.append(f"| {name} | {r.size or '-'} | {r.params:.1f} | {_counts(r.norms) or '-'} | "
                             f"- | - | - | - | - | - | - | {r.status}: {r.note} |")  # fmt: skip
                continue
            left = f"{r.folded} / {sum(r.left.values())}" + (f": {_counts(reason_kinds(r.left))}" if r.left else "")
            revert = _err(r.revert) + (f" ({r.revert_note})" if r.revert_note else "")
            onnx = _err(r.onnx) + (f" ({r.onnx_note})" if r.onnx_note else "")
            status = r.status + (f": {r.note}" if r.note else "")
            lines.append(
                f"| {name} | {r.size} | {r.params:.1f} | {_counts(r.norms)} | {r.converted} | {_err(r.kept)} | "
                f"{r.train} | {_err(r.fold)} | {left} | {revert} | {onnx} | {status} |"
            )
        lines.append("")
    refused = [r for r in rows if r.status == "refused"]
    if refused:
        lines += ["## Refusals", ""]
        for r in refused:
            why = DELIBERATE.get(r.key.rpartition("+")[2] if "+" in r.key else "")
            lines.append(f"- {r.key}: {why + '. The error: ' if why else ''}{r.note}")
        lines.append("")
    return "\n".join(lines)


def reason_kind(reason: str) -> str:
    """The case a reason of ``mabn.fold`` names: its text before the first ":" (the rest gives the layer's details)."""
    return reason.split(":", 1)[0]


def reason_kinds(left: dict[str, int]) -> dict[str, int]:
    """Norm layers left unfolded, by reason -> by case."""
    kinds: collections.Counter = collections.Counter()
    for reason, count in left.items():
        kinds[reason_kind(reason)] += count
    return dict(kinds)


def fold_coverage(rows: list[Row]) -> str:
    """The norm layers folded out of all the norm layers of the folded models, and the others by case."""
    folded = [r for r in rows if r.fold is not None]
    done = sum(r.folded for r in folded)
    left: collections.Counter = collections.Counter()
    for r in folded:
        left.update(reason_kinds(r.left))
    total = done + sum(left.values())
    share = f" ({100 * done / total:.1f} %)" if total else ""
    line = (
        f"Fold coverage: {done} of the {total} norm layers of the {len(folded)} folded models{share} folded into "
        "the convolution before them"
    )
    if left:
        line += f"; the other {sum(left.values())} stay in place, reported by `mabn.fold`: {_counts(dict(left))}"
    return line + "."


def totals(rows: list[Row]) -> list[str]:
    """The layers converted by class, the largest errors, and the fold coverage."""
    converted = [r for r in rows if r.converted]
    by_class: collections.Counter = collections.Counter()
    for r in converted:
        by_class.update(r.norms)
    lines = [f"Norm layers converted: {sum(r.converted for r in converted)} ({_counts(dict(by_class))})."]
    worst = []
    for label, attr in (("kept", "kept"), ("fold", "fold"), ("revert", "revert"), ("ONNX", "onnx")):
        values = [(getattr(r, attr), r.key) for r in converted if getattr(r, attr) is not None]
        if values:
            value, key = max(values)
            worst.append(f"{label} {_err(value)} ({key})")
    if worst:
        lines.append(f"Largest relative changes: {'; '.join(worst)}.")
    if any(r.fold is not None for r in rows):
        lines.append(fold_coverage(rows))
    return lines


# ---- command line ----------------------------------------------------------------------------------


def _select(archs: list[Arch], only: list[str]) -> list[Arch]:
    if not only:
        return archs
    chosen = [a for a in archs if a.key in only or (a.name in only and not a.variant)]
    unknown = set(only) - {a.key for a in chosen} - {a.name for a in chosen if not a.variant}
    if unknown:
        # Any timm model may be named, not only those of the list.
        chosen += [Arch("timm", "classification", n.removeprefix("timm/")) for n in sorted(unknown)]
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run this architecture only (repeatable): resnet18, torchvision/resnet18, timm/dla34, ...")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None,
                        help=f"the report to write (default: {DEFAULT_OUT.relative_to(ROOT)} for the whole zoo; "
                             "with --only the rows are printed)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads (default: 1)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="rows as JSON lines, one per architecture")
    parser.add_argument("--resume", action="store_true", help="keep the rows of the cache, run the others")
    parser.add_argument("--derive-timm-list", action="store_true", help=f"write {TIMM_LIST.relative_to(ROOT)} and stop")
    args = parser.parse_args(argv)
    # Stopped with SIGTERM: exit normally, so that the running architecture's process is ended too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.derive_timm_list:
        derive_timm_list()
        return 0
    archs = _select(torchvision_archs() + timm_archs() + EXTRA_ARCHS, args.only)
    done: dict[str, Row] = {}
    if args.resume and args.cache.exists():
        for line in args.cache.read_text().splitlines():
            row = Row(**json.loads(line))
            done[row.key] = row
    args.cache.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, arch in enumerate(archs, 1):
        if arch.key in done:
            rows.append(done[arch.key])
            continue
        row = run_isolated(arch, args.threads)
        rows.append(row)
        with args.cache.open("a") as f:
            f.write(json.dumps(dataclasses.asdict(row)) + "\n")
        print(f"[{i}/{len(archs)}] {arch.key}: {row.status}{': ' + row.note if row.note else ''} "
              f"(kept {_err(row.kept)}, fold {_err(row.fold)}, revert {_err(row.revert)}, onnx {_err(row.onnx)}, "
              f"{row.seconds:.0f} s)", flush=True)  # fmt: skip
    command = "python benchmarks/zoo.py" + "".join(f" --only {n}" for n in args.only)
    report = markdown(rows, command)
    out = args.out if args.out is not None else (None if args.only else DEFAULT_OUT)
    if out is None:
        print(report)
    else:
        out.write_text(report)
        print(f"wrote {out}: {summary(rows)}")
    return 0 if all(r.status != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
