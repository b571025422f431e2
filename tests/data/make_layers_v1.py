"""Freeze state dicts of the version-1 layers (written at commit 77644a6, before the version-2 layout) as test data.

Kept for the record of how layers_v1.pt was made; it needs the version-1 code to run.
"""

import torch

import mabn

torch.manual_seed(0)
layers = {
    "mabn2d": mabn.MABN2d(4, norm_batch_size=2, window=4, warmup_iters=2, renorm_warmup_iters=3),
    "mabn2d_half": mabn.MABN2d(
        4, norm_batch_size=2, window=4, warmup_iters=2, renorm_warmup_iters=3, dtype=torch.float16
    ),
    "ghost2d": mabn.GhostBatchNorm2d(4, norm_batch_size=2),
    "brn2d": mabn.BatchRenorm2d(4, norm_batch_size=2, renorm_warmup_iters=2),
    "bn_ema_sma2d": mabn.GeneralBatchNorm2d.from_preset("bn_ema_sma", 4, norm_batch_size=2, window=4),
    "mabn1d_noaffine": mabn.MABN1d(4, affine=False, window=4),
}
inputs = {}
for name, layer in layers.items():
    dtype = torch.float16 if name.endswith("half") else torch.float32
    shape = (4, 4) if name.startswith("mabn1d") else (4, 4, 3, 3)
    for _ in range(6):
        x = (torch.randn(*shape) * 2 + 0.5).to(dtype).requires_grad_()
        layer(x).square().sum().backward()
    if layer.weight is not None:
        with torch.no_grad():
            layer.weight.mul_(1.5)
            layer.bias.add_(0.25)
    layer.eval()
    x = (torch.randn(*shape) * 2 + 0.5).to(dtype)
    inputs[name] = (x, layer(x).detach())
state_dicts = {name: layer.state_dict() for name, layer in layers.items()}
torch.save({"state_dicts": state_dicts, "inputs": inputs, "torch": str(torch.__version__)}, "tests/data/layers_v1.pt")
