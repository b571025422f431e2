"""Activation memory of a ResNet-50 training step: micro-batch 2 x 16 with gradient accumulation vs batch 32.

The recipe for one small GPU: MABN at normalization batch 2 with ``accumulate=16`` keeps the
statistics of the batch-32 run with the activations of a batch of 2. Each configuration runs one
training step (forward, backward, SGD step) in a fresh process and reports:

* saved activations: the largest total of the storages autograd saves for backward during one
  forward (``torch.autograd.graph.saved_tensors_hooks``; each storage once, parameters left out):
  exact, and the same on any device (the centered weights of WC convolutions count: they are
  computed in each forward);
* peak memory: the process's peak resident memory during the step minus its resident memory just
  before it (model, optimizer and the batch already allocated), from ``/proc/self/status``.

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
    conv = "centralized" if spec["norm"] == "mabn" else None
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="image side (default: 224)")
    parser.add_argument("--quick", action="store_true", help="64 px: checks that it runs")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    size = 64 if args.quick else args.size
    if args.child:
        print(json.dumps(child(args.child, size)))
        return 0
    results = {}
    for name in CONFIGS:
        cmd = [sys.executable, __file__, "--child", name, "--size", str(size)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
        print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    ref = results["MABN(2)+WC, batch 32"]
    lines = [
        f"# Activation memory of a ResNet-50 training step, {size} x {size} px, gradient batch 32",
        "",
        "Produced by:",
        "",
        f"    python benchmarks/accumulation_memory.py --size {size}",
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
    ratio = acc["saved"] / ref["saved"]
    lines += [
        "",
        f"Target: activation memory of the accumulated step ≤ 1/8 of batch 32's: {ratio:.3f}, "
        f"{'met' if ratio <= 1 / 8 else 'missed'}. The step's peak also holds what does not scale with the "
        f"batch (gradients, momentum, the centered weights of each forward): {acc['peak'] / ref['peak']:.3f} of "
        "batch 32's.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
