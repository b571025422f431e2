"""Train a small conv net with MABN at normalization batch 2 on Fashion-MNIST (a quick demo)."""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from ..conv import CenConv2d, CenLinear
from ..modules import MABN2d
from .data import load_fashion_mnist


def small_net(norm_batch_size: int) -> nn.Sequential:
    """conv-MABN-ReLU x3 with weight-centralized convolutions, global pooling and a linear head."""

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [
            CenConv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            MABN2d(cout, norm_batch_size=norm_batch_size),
            nn.ReLU(inplace=True),
        ]

    return nn.Sequential(
        *block(1, 16, 1), *block(16, 32, 2), *block(32, 64, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), CenLinear(64, 10)
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=600, help="training steps (default: 600)")
    parser.add_argument("--batch-size", type=int, default=32, help="gradient batch size (default: 32)")
    parser.add_argument("--norm-batch-size", type=int, default=2, help="normalization batch size (default: 2)")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default: 0.1)")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST directory (idx files)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.batch_size % args.norm_batch_size:
        raise ValueError(f"--norm-batch-size {args.norm_batch_size} does not divide --batch-size {args.batch_size}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_x, train_y = load_fashion_mnist("train", args.data_dir)
    test_x, test_y = load_fashion_mnist("test", args.data_dir)
    mean, std = 0.2860, 0.3530

    def prep(x: torch.Tensor) -> torch.Tensor:
        return ((x.float() / 255.0 - mean) / std).unsqueeze(1)

    model = small_net(args.norm_batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.2)
    print(
        f"training {args.steps} steps, gradient batch {args.batch_size}, MABN at normalization batch {args.norm_batch_size}"
    )
    model.train()
    start, running = time.perf_counter(), 0.0
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, train_x.shape[0], (args.batch_size,))
        loss = nn.functional.cross_entropy(model(prep(train_x[idx])), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
        if step % 50 == 0 or step == args.steps:
            count = 50 if step % 50 == 0 else step % 50
            print(f"step {step:5d}  loss {running / count:.4f}  ({time.perf_counter() - start:.0f} s)", flush=True)
            running = 0.0
    model.eval()
    wrong = 0
    with torch.no_grad():
        for i in range(0, test_x.shape[0], 1000):
            wrong += (model(prep(test_x[i : i + 1000])).argmax(1) != test_y[i : i + 1000]).sum().item()
    print(f"test error: {100.0 * wrong / test_x.shape[0]:.2f} % on {test_x.shape[0]} Fashion-MNIST test images")
    return 0
