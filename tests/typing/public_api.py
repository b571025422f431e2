"""The public API as users call it; it must type-check clean under ``mypy --strict`` (see tests/test_typing.py).

Not collected by pytest (no ``test_`` prefix): it is read by the type checker, and it also runs.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

import mabn

# Layers: the constructor of torch's BatchNorm plus the options of the family.
layer: mabn.MABN2d = mabn.MABN2d(64, norm_batch_size=2)
mabn.MABN1d(8, eps=1e-5, momentum=0.02, affine=True, window=16, r_max=5.0, warmup_iters=100)
mabn.MABN3d(8, renorm_warmup_iters=1000, accumulate=4, device="cpu", dtype=torch.float32)
ghost: mabn.GhostBatchNorm2d = mabn.GhostBatchNorm2d(64, norm_batch_size=2)
brn: mabn.BatchRenorm2d = mabn.BatchRenorm2d(64, momentum=0.1, norm_batch_size=2)
general = mabn.GeneralBatchNorm2d(64, centered=False, forward_stats="batch", renorm=True, backward_stats="sma")
row = mabn.GeneralBatchNorm2d.from_preset("uncentered_ema", 64, norm_batch_size=2)
cumulative = mabn.GhostBatchNorm1d(8, momentum=None, eps=None, accumulate=2)  # None momentum: a value of its own
mabn.BatchRenorm3d(8, r_max=3.0, d_max=None, renorm_warmup_iters=10, process_group=None)
base: mabn.StreamNorm = layer
config: mabn.NormConfig = mabn.PRESETS["mabn"]
channels: int = layer.num_features
frozen = mabn.FrozenBatchNorm2d(64)

y: torch.Tensor = layer(mabn.CenConv2d(3, 64, 3, padding=1)(torch.randn(4, 3, 8, 8)))
linear: nn.Linear = mabn.CenLinear(64, 10)

# Models: the factory, the converters, folding, recalibration, checkpointing.
norm: nn.Module = mabn.create_norm_layer("mabn", 64, norm_batch_size=2)
by_class = mabn.create_norm_layer(mabn.MABN2d, 64)
by_partial = mabn.create_norm_layer(functools.partial(mabn.GhostBatchNorm2d, norm_batch_size=2), 64)
model: nn.Module = mabn.models.resnet_small(num_classes=10, in_channels=3, width=8, norm_layer="bn")
converted: nn.Module = mabn.convert_model(model, "mabn", conv="centralized", norm_batch_size=2)
kept: nn.Module = mabn.convert_model(nn.Sequential(nn.BatchNorm2d(4)).eval(), "mabn", preserve="function")
reverted: nn.Module = mabn.revert_model(converted, centralized_weights=False)
folded: nn.Module = mabn.fold(converted.eval())
folded_again, report = mabn.fold(converted.eval(), return_report=True)
report_type: mabn.FoldReport = report
as_bn: nn.Module = mabn.to_batchnorm(converted)
mabn.recalibrate(converted, [torch.randn(2, 3, 32, 32)], num_batches=1)
mabn.update_bn([(torch.randn(2, 3, 32, 32), torch.zeros(2))], converted, device="cpu")
out = mabn.checkpoint(nn.Sequential(mabn.MABN2d(3)), torch.randn(2, 3, 4, 4))
built: nn.Module = mabn.models.build_model({"arch": "resnet_small", "norm": "mabn", "conv": "centralized"})
