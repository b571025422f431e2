"""A naive float64 model of the family, written line by line from docs/design.md, sections 2-6.

Plain Python loops over groups and lists for the windows: slow and obviously right, the yardstick
for the engine.
"""

from __future__ import annotations

import torch


class NaiveNorm:
    def __init__(
        self,
        num_features,
        *,
        centered,
        forward_stats,
        renorm,
        backward_stats,
        eps=1e-5,
        momentum=0.02,
        norm_batch_size=None,
        window=16,
        r_max=5.0,
        d_max=5.0,
        warmup_iters=100,
        renorm_warmup_iters=1000,
    ):
        self.centered, self.forward_stats, self.renorm, self.backward_stats = (
            centered,
            forward_stats,
            renorm,
            backward_stats,
        )
        self.eps, self.momentum, self.B, self.m = eps, momentum, norm_batch_size, window
        self.r_max, self.d_max, self.warmup, self.renorm_warmup = r_max, d_max, warmup_iters, renorm_warmup_iters
        c = num_features
        self.running_mean = torch.zeros(c, dtype=torch.float64)
        self.running_var = torch.ones(c, dtype=torch.float64)
        self.calls = 0
        self.backward_calls = 0
        self.forward_history: list[tuple[torch.Tensor, ...]] = []
        self.backward_history: list[tuple[torch.Tensor, ...]] = []

    @staticmethod
    def _sma(history, m):
        last = history[-m:]
        return tuple(sum(entry[i] for entry in last) / len(last) for i in range(len(last[0])))

    def forward(self, x, gamma, beta):
        """Returns y and what the backward needs."""
        self.calls += 1
        n_batch = x.shape[0]
        b = self.B or n_batch
        dims = [0] + list(range(2, x.dim()))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        outs, saved, used = [], [], []
        for start in range(0, n_batch, b):
            xg = x[start : start + b]
            if self.centered:
                stat = (xg.mean(dims), xg.var(dims, unbiased=False))
            else:
                stat = ((xg * xg).mean(dims),)
            self.forward_history.append(stat)
            if self.forward_stats == "sma" and self.calls >= self.warmup:
                stat = self._sma(self.forward_history, self.m)
            mu = stat[0] if self.centered else torch.zeros_like(stat[0])
            var = stat[-1]
            std = torch.sqrt(var + self.eps)
            r = torch.ones_like(var)
            d = torch.zeros_like(var)
            if self.renorm and self.calls > self.renorm_warmup:
                running_std = torch.sqrt(self.running_var + self.eps)
                r = (std / running_std).clamp(1 / self.r_max, self.r_max)
                if self.centered:
                    d = ((mu - self.running_mean) / running_std).clamp(-self.d_max, self.d_max)
            z = (xg - mu.view(shape)) / std.view(shape)
            outs.append(gamma.view(shape) * (r.view(shape) * z + d.view(shape)) + beta.view(shape))
            saved.append((z, std, r, d))
            used.append((mu, var))
        n = x[:b].numel() // x.shape[1]
        mean_var = sum(v for _, v in used) / len(used)
        if self.centered:
            mean_var = mean_var * n / (n - 1)
            mean_mu = sum(mu for mu, _ in used) / len(used)
            self.running_mean = (1 - self.momentum) * self.running_mean + self.momentum * mean_mu
        self.running_var = (1 - self.momentum) * self.running_var + self.momentum * mean_var
        return torch.cat(outs), saved

    def backward(self, dy, saved, gamma):
        """Returns dL/dx, dL/dgamma, dL/dbeta."""
        self.backward_calls += 1
        b = dy.shape[0] // len(saved)
        dims = [0] + list(range(2, dy.dim()))
        shape = (1, -1) + (1,) * (dy.dim() - 2)
        grads, dgamma, dbeta = [], 0, 0
        for i, (z, std, r, d) in enumerate(saved):
            dyg = dy[i * b : (i + 1) * b]
            h = gamma.view(shape) * r.view(shape) * dyg
            stat = (h.mean(dims), (h * z).mean(dims)) if self.centered else ((h * z).mean(dims),)
            self.backward_history.append(stat)
            if self.backward_stats == "sma" and self.backward_calls >= self.warmup:
                stat = self._sma(self.backward_history, self.m)
            g = stat[0] if self.centered else torch.zeros_like(stat[0])
            psi = stat[-1]
            grads.append((h - g.view(shape) - z * psi.view(shape)) / std.view(shape))
            dgamma = dgamma + (dyg * (r.view(shape) * z + d.view(shape))).sum(dims)
            dbeta = dbeta + dyg.sum(dims)
        return torch.cat(grads), dgamma, dbeta
