"""Aten operations of one training forward+backward of each normalization layer (counts, not times).

    python benchmarks/operation_counts.py --out results/operation_counts.md

Counts every layer class of the package (every GeneralBatchNorm2d preset too), torch's BatchNorm2d
and GroupNorm, at G = 1 and G = 4 normalization groups, with the fused CPU step (the default on a
CPU), the composed CPU paths (a CPU without a C compiler), the generic paths a GPU runs
(``mabn.kernels.use_paths(cpu_specific=False)``), contiguous and channels_last, and with the
statistics synced over 2 gloo processes (counted on rank 0). What is counted and how:
``mabn.apps.opcount``. Counts are deterministic: the same on every run and machine with the same
torch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

from mabn.apps.opcount import COUNT_SHAPE, LARGE_MAP_SHAPE, LAYERS, OperationCount, count_layer, synced_counts

GROUPS = (1, 4)
REFERENCE = "nn.BatchNorm2d"

#: (title, input shape, channels_last, dispatch, synced)
SETTINGS = [
    ("fused CPU step, contiguous", COUNT_SHAPE, False, "fused", False),
    ("fused CPU step, channels_last", COUNT_SHAPE, True, "fused", False),
    ("composed CPU paths, contiguous", COUNT_SHAPE, False, "composed", False),
    ("composed CPU paths, contiguous, large maps", LARGE_MAP_SHAPE, False, "composed", False),
    ("composed CPU paths, channels_last", COUNT_SHAPE, True, "composed", False),
    ("generic paths (what a GPU runs), contiguous", COUNT_SHAPE, False, "generic", False),
    ("generic paths (what a GPU runs), channels_last", COUNT_SHAPE, True, "generic", False),
    ("synced over 2 gloo processes, fused CPU step, contiguous", COUNT_SHAPE, False, "fused", True),
    ("synced over 2 gloo processes, generic paths, contiguous", COUNT_SHAPE, False, "generic", True),
]


def _synced(shape: tuple[int, int, int, int]) -> dict[tuple[str, int, str], OperationCount]:
    import json

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "counts.json")
        mp.spawn(synced_counts, args=(2, os.path.join(tmp, "init"), out, shape), nprocs=2)
        with open(out) as f:
            raw = json.load(f)
    counts = {}
    for key, value in raw.items():
        name, groups, dispatch = key.split("|")
        count = OperationCount(value["ops"], value["views"])
        count.left_out.update(value["left_out"])
        counts[(name, int(groups), dispatch)] = count
    return counts


def _cell(count: OperationCount | None) -> list[str]:
    return ["—", "—"] if count is None else [str(count.total), str(count.non_view)]


def _compiled_kernels(name: str, groups: int) -> int | None:
    """Kernels ``torch.compile`` generates for the layer's training forward+backward (one graph each),
    past the warm-ups: Inductor's CPU kernels here, the count a GPU's Triton code generation fuses alike
    (library calls such as the matrix product are not counted)."""
    from torch._inductor import metrics

    from mabn.apps.opcount import build_layer

    layer = build_layer(name, COUNT_SHAPE[1], COUNT_SHAPE[0], groups)
    if layer is None:
        return None
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(COUNT_SHAPE, generator=generator)
    before = metrics.generated_kernel_count
    for _ in range(3):
        compiled(x.clone().requires_grad_()).backward(torch.randn(COUNT_SHAPE, generator=generator))
    return metrics.generated_kernel_count - before


def _ratio(count: OperationCount | None, reference: OperationCount) -> str:
    return "—" if count is None else f"{count.non_view / reference.non_view:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the markdown to this file")
    parser.add_argument("--no-sync", action="store_true", help="skip the synced counts (2 spawned processes)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    synced = {} if args.no_sync else _synced(COUNT_SHAPE)
    tables: dict[str, dict[tuple[str, int], OperationCount | None]] = {}
    for title, shape, channels_last, cpu, sync in SETTINGS:
        if sync and args.no_sync:
            continue
        table = {}
        for name in LAYERS:
            for g in GROUPS:
                if sync:
                    table[(name, g)] = synced.get((name, g, cpu))
                else:
                    table[(name, g)] = count_layer(name, g, shape=shape, channels_last=channels_last, dispatch=cpu)
        tables[title] = table
    # torch's BatchNorm2d has no synced CPU form (SyncBatchNorm runs on GPUs): the synced ratios are to the
    # unsynced BatchNorm2d of the same dispatch.
    unsynced = {(shape, cl, cpu): title for title, shape, cl, cpu, sync in SETTINGS if not sync}
    references = {
        title: tables[unsynced[(shape, cl, cpu)]][(REFERENCE, 1)]
        for title, shape, cl, cpu, _ in SETTINGS
        if title in tables
    }
    n, c, h, w = COUNT_SHAPE
    command = "python benchmarks/operation_counts.py --out results/operation_counts.md"
    lines = [
        "# Operations of one training forward+backward per normalization layer",
        "",
        "Produced by (deterministic counts, no timing):",
        "",
        f"    {command}",
        "",
        f"torch {torch.__version__.split('+')[0]}. Input {n} x {c} x {h} x {w} (float32): G = 1 is one group of "
        f"{n} samples, G = 4 four groups of 1 (`norm_batch_size`). The fused CPU step (the default on a CPU with "
        "a C compiler) is one native call per direction whatever the layer and G; what is left are its "
        "allocations (output, gradients, the statistics it keeps for backward) and its host reads of the counters "
        "(`_local_scalar_dense`: a memory read on a CPU, not a synchronization). The composed CPU paths (a CPU "
        "without a compiler) depend on the sizes: each sample here has "
        f"{c * h * w} values, enough for the per-sample statistics, and each "
        f"map {h * w}, small enough for the fused native backward, as ResNet-50's 28 x 28, 14 x 14 and 7 x 7 maps "
        f"at 1-2 images per device; the *large maps* table uses {' x '.join(map(str, LARGE_MAP_SHAPE))} (the "
        "paths of the 56 x 56 and 112 x 112 maps, whose backward reduces sample by sample: at N samples, N "
        "native calls). The generic paths are what every other device runs: each operation a kernel launch, "
        "none reads the host. Layers are past their warm-ups (built with warm-ups of 2 steps, the same phase "
        "tables as the defaults, and called 3 times first), renormalization active; the counted call is the 4th.",
        "",
        "What counts (`src/mabn/apps/opcount.py`): every operator call that reaches the dispatcher below autograd "
        "during the layer's forward and its backward, seen by a `TorchDispatchMode`. **total** counts them all; "
        "**non-view** leaves out views (the first return of the schema aliases an input without writing it: "
        "`view`, `select`, `slice`, `expand`, `detach`, `split`, ...), which move no data. Operations that take "
        "and return no tensor (`aten::promote_types`, a dtype computed on the host) are not kernels and are "
        "not counted at all (see the last section); in-place operations returning nothing (`_foreach_add_`) "
        "and `aten::equal` (the synced layers' fingerprint check, two tensors compared) are counted. The "
        "harness adds nothing: input and incoming gradient are made before the counted region, and the "
        "gradients are taken with `torch.autograd.grad(y, (x, *parameters), dy)`, the backward graph of "
        "`y.backward(dy)` without the `AccumulateGrad` nodes that would add (or detach) into `.grad`.",
        "",
        f"Ratios: non-view operations over `nn.BatchNorm2d`'s in the same layout and dispatch "
        f"({references[SETTINGS[0][0]].non_view} on CPU: `native_batch_norm`, its backward, "
        "the `num_batches_tracked` increment and the allocation of its empty reserve tensor). torch's "
        "`SyncBatchNorm` runs on GPUs only, so the synced tables compare with the unsynced BatchNorm2d. "
        "Layers without normalization groups (frozen BN, torch's) have no G = 4 column and no synced form.",
        "",
        "## MABN2d at a glance (non-view operations)",
        "",
        "| setting | MABN2d G=1 | MABN2d G=4 | BatchNorm2d | ratio G=1 | ratio G=4 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for title, table in tables.items():
        ref = references[title]
        g1, g4 = table[("MABN2d", 1)], table[("MABN2d", 4)]
        lines.append(
            f"| {title} | {g1.non_view} | {g4.non_view} | {ref.non_view} | {_ratio(g1, ref)} | {_ratio(g4, ref)} |"
        )
    for title, table in tables.items():
        ref = references[title]
        lines += [
            "",
            f"## {title[0].upper() + title[1:]}",
            "",
            "| layer | G=1 total | G=1 non-view | G=4 total | G=4 non-view | non-view / BN, G=1 | non-view / BN, G=4 |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name in LAYERS:
            g1, g4 = table[(name, 1)], table[(name, 4)]
            if g1 is None and g4 is None:
                continue
            cells = [*_cell(g1), *_cell(g4), _ratio(g1, ref), _ratio(g4, ref)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    by_name = (
        ("fused CPU step, contiguous", 1),
        ("composed CPU paths, contiguous", 1),
        ("generic paths (what a GPU runs), contiguous", 1),
        ("generic paths (what a GPU runs), contiguous", 4),
    )
    for title, groups in by_name:
        count = tables[title][("MABN2d", groups)]
        lines += [
            "",
            f"## MABN2d's operations by name: {title}, G = {groups}",
            "",
            "| operation | calls | view |",
            "|---|---:|---|",
        ]
        for views in (False, True):
            for op, k in sorted(count.by_name(views).items(), key=lambda item: (-item[1], item[0])):
                lines.append(f"| `{op}` | {k} | {'yes' if views else 'no'} |")
    lines += [
        "",
        "## Compiled: kernels `torch.compile` generates",
        "",
        "One training forward+backward compiled with `torch.compile(layer, fullgraph=True)` (one graph each "
        "way, the same over the warm-ups): the kernels Inductor generates for it, here its CPU kernels, "
        "which a GPU's Triton code generation fuses alike; library calls (the coefficient product) are not "
        "counted.",
        "",
        "| layer | G=1 | G=4 |",
        "|---|---:|---:|",
    ]
    for name in ("MABN2d", "GhostBatchNorm2d", "BatchRenorm2d", "nn.BatchNorm2d", "nn.GroupNorm(32)"):
        cells = [_compiled_kernels(name, g) for g in GROUPS]
        lines.append(f"| {name} | " + " | ".join("—" if k is None else str(k) for k in cells) + " |")
    left_out: dict[str, dict[str, set[str]]] = {}  # op -> setting -> layers
    for title, table in tables.items():
        for (name, g), count in table.items():
            if count is not None:
                for op in count.left_out:
                    left_out.setdefault(op, {}).setdefault(title, set()).add(f"{name} G={g}")
    lines += ["", "## Not counted", ""]
    for op, where in sorted(left_out.items()):
        per_call = sorted(
            {k for table in tables.values() for c in table.values() if c for o, k in c.left_out.items() if o == op}
        )
        lines.append(
            f"- `{op}` ({'/'.join(map(str, per_call))} per call; takes and returns no tensor: host arithmetic "
            "on dtypes, no kernel), in:"
        )
        lines += [f"  - {title}: {', '.join(sorted(layers))}" for title, layers in where.items()]
    if not left_out:
        lines.append("- nothing: every operation seen took or returned a tensor.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
