"""What synced statistics cost: all-reduce bytes and time per layer, against DDP's gradient all-reduce.

Two processes on gloo (CPU) run a ResNet-50 training step at ``--batch`` images of ``--size`` px per
process, once with synced MABN (``mabn.convert_model(..., process_group=WORLD)``) and its statistics'
all-reduces recorded, and once with an all-reduce of every gradient as DDP does it (in 25 MB
buckets, float32). Every ``dist.all_reduce`` call is wrapped to record its payload and wall time.
Reported per step: the statistics' calls and bytes (forward and backward), the gradients' calls and
bytes, the median time of one layer's statistics all-reduce, and the ratios. Each timed call starts
after a barrier, so it measures the collective itself rather than one rank waiting for the other. Times come from the
median over ``--steps`` steps after one warm-up step (which also runs the one-off configuration
check of each layer).

    python benchmarks/sync_allreduce.py                  # 224 px, batch 2 per process
    python benchmarks/sync_allreduce.py --quick          # 64 px: checks that it runs
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import mabn  # noqa: E402

BUCKET_BYTES = 25 * 1024 * 1024  # DDP's default bucket_cap_mb


class Recorder:
    """Wraps ``dist.all_reduce``: bytes and seconds of each call, under a label."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, float]] = []
        self.label = "stats"
        self._original = dist.all_reduce

    def __enter__(self) -> Recorder:
        def wrapped(tensor, *args, **kwargs):
            # Both ranks arrive first (untimed), so the time is the collective's, not a wait for the other.
            dist.barrier()
            t0 = time.perf_counter()
            out = self._original(tensor, *args, **kwargs)
            self.calls.append((self.label, tensor.numel() * tensor.element_size(), time.perf_counter() - t0))
            return out

        dist.all_reduce = wrapped
        return self

    def __exit__(self, *exc) -> None:
        dist.all_reduce = self._original


def _gradient_allreduce(model: torch.nn.Module, recorder: Recorder) -> None:
    """All-reduce the gradients in DDP-sized float32 buckets (what DDP's reducer sends)."""
    recorder.label = "grads"
    grads = [p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0
    for g in reversed(grads):  # DDP fills buckets in reverse order of the parameters
        bucket.append(g)
        size += g.numel() * 4
        if size >= BUCKET_BYTES:
            dist.all_reduce(torch.cat(bucket))
            bucket, size = [], 0
    if bucket:
        dist.all_reduce(torch.cat(bucket))
    recorder.label = "stats"


def worker(rank: int, world: int, init_file: str, args: argparse.Namespace, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(rank)
    model = mabn.models.resnet50(num_classes=1000, norm_layer="mabn", conv_layer="centralized", norm_batch_size=2)
    model = mabn.convert_model(model, "mabn", process_group=dist.group.WORLD)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))
    per_step = []
    with Recorder() as recorder:
        for step in range(args.steps + 1):
            recorder.calls.clear()
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            _gradient_allreduce(model, recorder)
            if step > 0:  # the first step also runs each layer's one-off configuration check
                per_step.append(list(recorder.calls))
    norms = sum(isinstance(m, mabn.StreamNorm) for m in model.modules())
    params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        queue.put({"steps": per_step, "norms": norms, "params": params})
    dist.barrier()
    dist.destroy_process_group()


def summarize(result: dict, args: argparse.Namespace) -> str:
    steps = result["steps"]
    stats = [[c for c in s if c[0] == "stats"] for s in steps]
    grads = [[c for c in s if c[0] == "grads"] for s in steps]
    stat_bytes, grad_bytes = sum(c[1] for c in stats[0]), sum(c[1] for c in grads[0])
    stat_time = statistics.median(sum(c[2] for c in s) for s in stats)
    grad_time = statistics.median(sum(c[2] for c in s) for s in grads)
    per_layer = statistics.median(c[2] for s in stats for c in s)
    per_layer_bytes = [c[1] for c in stats[0]]
    lines = [
        f"# Synced MABN on gloo, 2 processes: ResNet-50, {args.batch} x {args.size} px per process",
        "",
        "Produced by:",
        "",
        f"    python benchmarks/sync_allreduce.py --size {args.size} --batch {args.batch} --steps {args.steps}",
        "",
        f"{result['norms']} norm layers, {result['params'] / 1e6:.1f} M parameters; per training step "
        f"(median of {len(steps)} steps):",
        "",
        "| all-reduce | calls / step | bytes / step | time / step (ms) |",
        "|---|---|---|---|",
        f"| statistics (forward + backward, float64) | {len(stats[0])} | {stat_bytes / 1024:.1f} KiB | {stat_time * 1e3:.1f} |",
        f"| gradients (DDP buckets of 25 MB, float32) | {len(grads[0])} | {grad_bytes / 2**20:.1f} MiB | {grad_time * 1e3:.1f} |",
        f"| ratio statistics / gradients | {len(stats[0]) / len(grads[0]):.0f}x | {stat_bytes / grad_bytes:.4f} | {stat_time / grad_time:.2f} |",
        "",
        f"One layer's statistics all-reduce: {min(per_layer_bytes)}-{max(per_layer_bytes)} bytes, median "
        f"{per_layer * 1e6:.0f} µs. The payload is {stat_bytes / grad_bytes:.2%} of the gradients'; the "
        "cost is latency (two calls per layer, each a synchronization point inside forward or backward), "
        "not bandwidth.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="image side (default: 224)")
    parser.add_argument("--batch", type=int, default=2, help="images per process (default: 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default: 5)")
    parser.add_argument("--quick", action="store_true", help="64 px, 2 steps: checks that it runs")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.steps = 64, 2
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.get_context("spawn")
        queue = context.SimpleQueue()
        mp.start_processes(worker, (2, os.path.join(tmp, "init"), args, queue), nprocs=2, start_method="spawn")
        result = queue.get()
    text = summarize(result, args)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
