"""MABN written the straightforward way: plain tensor ops, a Python loop over groups, an ``.item()`` per call.

The yardstick for the engine's speed (``python benchmarks/layers.py``); ``tests/test_naive.py``
checks that it computes what the engine computes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _NaiveMABNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_var, x2_window, psi_window, iters, layer):
        b = layer.norm_batch_size or x.shape[0]
        outs, zs, vars_, rs = [], [], [], []
        for start in range(0, x.shape[0], b):
            xg = x[start : start + b]
            x2 = (xg * xg).mean(dim=(0, 2, 3))
            x2_window[layer.steps % layer.window].copy_(x2)
            layer.steps += 1
            var = x2_window[: min(layer.steps, layer.window)].mean(0) if iters >= layer.warmup_iters else x2
            z = xg / (var[None, :, None, None] + layer.eps).sqrt()
            r = ((var + layer.eps).sqrt() / (running_var + layer.eps).sqrt()).clamp(1 / layer.r_max, layer.r_max)
            if iters <= layer.renorm_warmup_iters:
                r = torch.ones_like(r)
            outs.append(weight[None, :, None, None] * r[None, :, None, None] * z + bias[None, :, None, None])
            zs.append(z)
            vars_.append(var)
            rs.append(r)
        running_var.mul_(1 - layer.momentum).add_(layer.momentum * torch.stack(vars_).mean(0))
        ctx.save_for_backward(torch.cat(zs), weight, torch.stack(vars_), torch.stack(rs), psi_window)
        ctx.layer, ctx.iters = layer, iters
        return torch.cat(outs)

    @staticmethod
    def backward(ctx, grad_output):
        z_all, weight, vars_, rs, psi_window = ctx.saved_tensors
        layer, iters = ctx.layer, ctx.iters
        groups = vars_.shape[0]
        b = grad_output.shape[0] // groups
        grads, dweight, dbias = [], 0, 0
        for i in range(groups):
            dy = grad_output[i * b : (i + 1) * b]
            z = z_all[i * b : (i + 1) * b]
            r = rs[i][None, :, None, None]
            g = dy * weight[None, :, None, None] * r
            psi = (g * z).mean(dim=(0, 2, 3))
            psi_window[layer.backward_steps % layer.window].copy_(psi)
            layer.backward_steps += 1
            if iters >= layer.warmup_iters:
                psi = psi_window[: min(layer.backward_steps, layer.window)].mean(0)
            grads.append((g - z * psi[None, :, None, None]) / (vars_[i][None, :, None, None] + layer.eps).sqrt())
            dweight = dweight + (dy * r * z).sum(dim=(0, 2, 3))
            dbias = dbias + dy.sum(dim=(0, 2, 3))
        return torch.cat(grads), dweight, dbias, None, None, None, None, None


class NaiveMABN2d(nn.Module):
    """MABN written with plain tensor ops, saving z and reading its counter with ``.item()`` each call."""

    def __init__(
        self,
        num_features: int,
        norm_batch_size: int | None = None,
        window: int = 16,
        warmup_iters: int = 100,
        renorm_warmup_iters: int = 1000,
    ) -> None:
        super().__init__()
        self.eps, self.momentum, self.r_max = 1e-5, 0.02, 5.0
        self.norm_batch_size, self.window = norm_batch_size, window
        self.warmup_iters, self.renorm_warmup_iters = warmup_iters, renorm_warmup_iters
        self.steps = self.backward_steps = 0
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("x2_window", torch.zeros(window, num_features))
        self.register_buffer("psi_window", torch.zeros(window, num_features))
        self.register_buffer("iters", torch.tensor(0))

    def forward(self, x: Tensor) -> Tensor:
        self.iters += 1
        iters = int(self.iters.item())  # the host synchronization of the straightforward version
        return _NaiveMABNFunction.apply(
            x, self.weight, self.bias, self.running_var, self.x2_window, self.psi_window, iters, self
        )
