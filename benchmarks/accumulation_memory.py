"""Activation memory of a ResNet-50 training step: micro-batch 2 x 16 with gradient accumulation vs batch 32.

The recipe for one small GPU: MABN at normalization batch 2 with ``accumulate=16`` keeps the
statistics of the batch-32 run with the activations of a batch of 2. Each configuration runs one
training step (forward, backward, SGD step) in a fresh process and reports:

* saved activations: the largest total of the storages autograd saves for backward during one
  forward (``torch.autograd.graph.saved_tensors_hooks``; each storage once, parameters left out):
  exact, and the same on any device (the centralized weights the WC layers keep, one copy computed
  once per change of the weights and used by every forward and backward until the next, count);
* peak memory: the process's peak resident memory during the step minus its resident memory just
  before it (model, optimizer and the batch already allocated), from ``/proc/self/status``.

A row without WC measures, within the same run, what the WC layers' copy of their centralized weights
holds. A second table isolates it: the storages one forward of the model saves for backward,
parameters left out and each storage once, with plain convolutions and with the WC layers.

    python benchmarks/accumulation_memory.py            # 224 px
    python benchmarks/accumulation_memory.py --quick    # 64 px: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CONFIGS = {
    "BN, batch 32": {"norm": "bn", "kwargs": {}, "micro": 32},
    "MABN(2)+WC, batch 32": {"norm": "mabn", "kwargs": {"norm_batch_size": 2}, "micro": 32},
    "MABN(2)+WC, 16 x 2 accumulated": {"norm": "mabn", "kwargs": {"norm_batch_size": 2, "accumulate": 16}, "micro": 2},
    "MABN(2), no WC, 16 x 2 accumulated": {
        "norm": "mabn",
        "kwargs": {"norm_batch_size": 2, "accumulate": 16},
        "micro": 2,
        "conv": None,
    },
}

#: The convolutions of the centralization table: label -> conv_layer.
CENTRALIZATION = {
    "Conv2d (no WC)": None,
    "CenConv2d (WC: its centralized weight, one copy, used forward and backward)": "centralized",
}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def child(name: str, size: int) -> dict:
    import torch

    import mabn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = CONFIGS[name]
    conv = spec.get("conv", "centralized" if spec["norm"] == "mabn" else None)
    model = mabn.models.resnet50(num_classes=1000, norm_layer=spec["norm"], conv_layer=conv, **spec["kwargs"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(32, 3, size, size), torch.randint(0, 1000, (32,))
    saved = [0]
    peak_saved = [0]
    weights = {p.data_ptr() for p in model.parameters()}

    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        # A layer keeps its weight for backward (not an activation); a tensor saved by two layers
        # (a conv's input is the norm's output) is held once.
        if t.data_ptr() in weights or storage.data_ptr() in seen:
            return t
        seen.add(storage.data_ptr())
        saved[0] += storage.nbytes()
        peak_saved[0] = max(peak_saved[0], saved[0])
        return t

    micro = spec["micro"]
    before = _status("VmRSS")
    for xm, ym in zip(x.split(micro), y.split(micro)):
        saved[0] = 0
        seen.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = torch.nn.functional.cross_entropy(model(xm), ym) / (32 // micro)
        loss.backward()
    optimizer.step()
    return {"saved": peak_saved[0], "peak": _status("VmHWM") - before}


def centralization_child(size: int, batch: int = 2) -> dict:
    """Bytes saved for backward (parameters left out) by one forward of ResNet-50 (MABN(2)) per kind of convolution."""
    import torch

    import mabn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    results = {}
    for label, conv in CENTRALIZATION.items():
        model = mabn.models.resnet50(norm_layer="mabn", conv_layer=conv, norm_batch_size=2)
        storages: dict[int, int] = {}
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(t: torch.Tensor, storages: dict[int, int] = storages, params: set[int] = params) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:  # a layer's own weight is held by the model anyway
                storages[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        results[label] = sum(storages.values())
    conv_weights = sum(m.weight.numel() * 4 for m in model.modules() if mabn.conv.is_centralized(m))
    return {"saved": results, "weights": conv_weights, "batch": batch}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="image side (default: 224)")
    parser.add_argument("--quick", action="store_true", help="64 px: checks that it runs")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--centralization-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    size = 64 if args.quick else args.size
    if args.child:
        print(json.dumps(child(args.child, size)))
        return 0
    if args.centralization_child:
        print(json.dumps(centralization_child(size)))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = {}
    for name in CONFIGS:
        cmd = [sys.executable, __file__, "--child", name, "--size", str(size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
        print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    cmd = [sys.executable, __file__, "--centralization-child", "--size", str(size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    centralization = json.loads(out.strip().splitlines()[-1])
    print(f"centralization: {centralization}", file=sys.stderr, flush=True)
    ref = results["MABN(2)+WC, batch 32"]
    lines = [
        f"# Activation memory of a ResNet-50 training step, {size} x {size} px, gradient batch 32",
        "",
        "Produced by:",
        "",
        f"    python benchmarks/accumulation_memory.py --size {size}" + (f" --out {args.out}" if args.out else ""),
        "",
        "| configuration | saved activations (MiB) | ratio | peak memory of the step (MiB) | ratio |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['saved'] / 2**20:.1f} | {r['saved'] / ref['saved']:.3f} | {r['peak'] / 2**20:.1f} | "
            f"{r['peak'] / ref['peak']:.3f} |"
        )
    acc = results["MABN(2)+WC, 16 x 2 accumulated"]
    plain_acc = results["MABN(2), no WC, 16 x 2 accumulated"]
    ratio = acc["saved"] / ref["saved"]
    lines += [
        "",
        f"Target: activation memory of the accumulated step ≤ 1/8 of batch 32's: {ratio:.3f}, "
        f"{'met' if ratio <= 1 / 8 else 'missed'}. The step's peak also holds what does not scale with the "
        f"batch (gradients, momentum): {acc['peak'] / ref['peak']:.3f} of batch 32's. Without WC: "
        f"{plain_acc['saved'] / ref['saved']:.3f} ({plain_acc['saved'] / 2**20:.1f} MiB saved per micro-batch "
        f"instead of {acc['saved'] / 2**20:.1f}): the difference is the WC layers' copy of their centralized "
        "weights, which they compute once per optimizer step and use in every micro-batch's forward and "
        "backward (at 16 x 2, 1 centralization per step instead of 32).",
        "",
        f"## What the centralization holds: one forward of ResNet-50 with MABN(2), batch {centralization['batch']}, {size} px",
        "",
        "Storages saved for backward (`torch.autograd.graph.saved_tensors_hooks`, each storage once; the "
        "parameters left out, since the model holds them anyway: a plain convolution saves its weight, the "
        "WC layers their centralized copy); the last column is the difference to plain convolutions. "
        f"The convolution and linear weights of the model are {centralization['weights'] / 2**20:.1f} MiB.",
        "",
        "| convolutions | saved for backward (MiB) | beyond plain convolutions (MiB) |",
        "|---|---|---|",
    ]
    plain = centralization["saved"]["Conv2d (no WC)"]
    for label, nbytes in centralization["saved"].items():
        lines.append(f"| {label} | {nbytes / 2**20:.1f} | {(nbytes - plain) / 2**20:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
