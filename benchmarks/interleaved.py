"""Interleaved inference timing shared by the inference benchmarks (``inference.py``, ``dense_inference.py``,
``detection_inference.py``).

Each round runs every model on every input (an image size or a batch size) in a fresh random order,
``iters`` passes each; a table reports medians over the rounds and, per model, the median of its
per-round ratio to a reference.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Mapping

import torch
from torch import nn

Samples = dict[int, dict[str, list[float]]]


def seconds_per_pass(model: nn.Module, x: torch.Tensor, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        model(x)
    return (time.perf_counter() - start) / iters


def interleaved_rounds(
    nets: Mapping[str, nn.Module],
    inputs: Mapping[int, torch.Tensor],
    rounds: int,
    iters: int | Mapping[int, int],
    seed: int,
    label: str = "{}px",
) -> Samples:
    """input key -> name -> seconds per pass, one entry per round (after one warm-up pass of each).

    ``iters`` is the passes per round, one count or one per input key; ``label`` formats a key in the
    progress lines (``"{}px"`` for image sizes, ``"b{}"`` for batch sizes).
    """
    names = list(nets)
    passes = {s: iters if isinstance(iters, int) else iters[s] for s in inputs}
    samples: Samples = {s: {n: [] for n in names} for s in inputs}
    rng = random.Random(seed)
    with torch.no_grad():
        for s in inputs:  # warm-up: allocator, oneDNN primitive caches
            for n in names:
                seconds_per_pass(nets[n], inputs[s], 1)
        for r in range(rounds):
            pairs = [(s, n) for s in inputs for n in names]
            rng.shuffle(pairs)
            for s, n in pairs:
                samples[s][n].append(seconds_per_pass(nets[n], inputs[s], passes[s]))
            line = "  ".join(
                label.format(s) + ": " + " ".join(f"{1 / samples[s][n][-1]:.2f}" for n in names) for s in inputs
            )
            print(f"round {r + 1}/{rounds}  passes/s ({', '.join(names)})  {line}", flush=True)
    return samples


def ratio_table(samples: Samples, reference: str, what: str) -> str:
    """Markdown: per size and model, median images/s, their range and the median ratio to ``reference``."""
    lines = [
        f"| size | {what} | images/s (median) | min - max | ratio to {reference} (median) |",
        "|---:|---|---:|---:|---:|",
    ]
    for size, by_name in samples.items():
        ref = by_name[reference]
        for name, secs in by_name.items():
            ips = [1 / t for t in secs]
            ratio = statistics.median(r / t for r, t in zip(ref, secs))
            lines.append(
                f"| {size}x{size} | {name} | {statistics.median(ips):.2f} | {min(ips):.2f} - {max(ips):.2f} "
                f"| {ratio:.3f} |"
            )
    return "\n".join(lines)
