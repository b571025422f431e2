"""Forward and backward times of each layer, separately, at one shape (medians, interleaved).

python benchmarks/forward_backward.py --shape 32x1024x14x14 --repeats 15 --threads 1

Run it twice: at some shapes the kernels of every layer, BatchNorm's included, run at one of two
speeds depending on the process (see results/performance.md).
"""

import argparse
import gc
import statistics
import time

import torch

import mabn

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--shape", default="32x1024x14x14", help="NxCxHxW (default: 32x1024x14x14)")
parser.add_argument("--repeats", type=int, default=15, help="timed repeats (default: 15)")
parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
parser.add_argument("--channels-last", action="store_true", help="channels_last input")
args = parser.parse_args()
torch.set_num_threads(args.threads)
shape = tuple(int(s) for s in args.shape.lower().split("x"))
fmt = torch.channels_last if args.channels_last else torch.contiguous_format
x = torch.randn(*shape).contiguous(memory_format=fmt).requires_grad_()
dy = torch.randn(*shape).contiguous(memory_format=fmt)
c = shape[1]
past = dict(warmup_iters=1, renorm_warmup_iters=1)
layers = {
    "BatchNorm2d": torch.nn.BatchNorm2d(c),
    "MABN2d B=N": mabn.MABN2d(c, **past),
    "MABN2d B=2": mabn.MABN2d(c, norm_batch_size=2, **past),
    "GhostBN2d B=2": mabn.GhostBatchNorm2d(c, norm_batch_size=2),
    "BatchRenorm2d": mabn.BatchRenorm2d(c, renorm_warmup_iters=1),
}
for layer in layers.values():
    for _ in range(3):
        layer(x).backward(dy)
times = {name: ([], []) for name in layers}
for _ in range(args.repeats):
    for name, layer in layers.items():
        gc.collect()
        t0 = time.perf_counter()
        y = layer(x)
        t1 = time.perf_counter()
        y.backward(dy)
        t2 = time.perf_counter()
        x.grad = None
        del y
        times[name][0].append(t1 - t0)
        times[name][1].append(t2 - t1)
print(f"{args.shape} {'channels_last' if args.channels_last else 'contiguous'}, {args.threads} thread(s), ms:")
for name, (fwd, bwd) in times.items():
    print(f"{name:>14s}  forward {statistics.median(fwd) * 1e3:7.2f}  backward {statistics.median(bwd) * 1e3:7.2f}")
