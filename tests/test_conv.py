"""Weight-centralized layers: the plain layer with centralized weights, gradients through the centralization."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import mabn

CASES = [
    (mabn.CenConv1d, nn.Conv1d, (2, 4, 11), dict(in_channels=4, out_channels=6, kernel_size=3)),
    (mabn.CenConv1d, nn.Conv1d, (2, 4, 11), dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, dilation=2)),
    (mabn.CenConv2d, nn.Conv2d, (2, 4, 9, 9), dict(in_channels=4, out_channels=8, kernel_size=3, stride=2, padding=1)),
    (
        mabn.CenConv2d,
        nn.Conv2d,
        (2, 4, 9, 9),
        dict(in_channels=4, out_channels=8, kernel_size=3, padding=2, padding_mode="reflect", dilation=2, groups=4),
    ),
    (
        mabn.CenConv2d,
        nn.Conv2d,
        (2, 4, 9, 9),
        dict(in_channels=4, out_channels=8, kernel_size=3, padding="same", padding_mode="circular", bias=False),
    ),
    (
        mabn.CenConv3d,
        nn.Conv3d,
        (2, 2, 5, 6, 6),
        dict(in_channels=2, out_channels=4, kernel_size=3, padding=1, padding_mode="replicate"),
    ),
    (mabn.CenLinear, nn.Linear, (5, 7), dict(in_features=7, out_features=3)),
]


@pytest.mark.parametrize("cen_cls,torch_cls,shape,kwargs", CASES)
def test_equals_plain_layer_with_centralized_weights(cen_cls, torch_cls, shape, kwargs):
    cen = cen_cls(**kwargs, dtype=torch.float64)
    plain = torch_cls(**kwargs, dtype=torch.float64)
    plain.load_state_dict(cen.state_dict())  # same parameters, same state dict keys
    cen.load_state_dict(plain.state_dict())
    x = torch.randn(*shape, dtype=torch.float64)
    dy = torch.randn_like(cen(x))

    # Reference: the plain layer's functional form with W - mean(W), autograd through the mean.
    w = plain.weight.detach().clone().requires_grad_()
    wc = w - w.mean(dim=tuple(range(1, w.dim())), keepdim=True)
    with torch.no_grad():
        plain.weight.copy_(wc)
    assert_close(cen(x), plain(x))
    if isinstance(plain, nn.Linear):
        ref = nn.functional.linear(x, wc, plain.bias)
    else:
        ref = plain._conv_forward(x, wc, plain.bias)
    ref.backward(dy)
    cen(x).backward(dy)
    assert_close(cen.weight.grad, w.grad)
    # The gradient reaching the raw weight is itself centralized: the centralization is in the graph.
    assert_close(cen.weight.grad.mean(dim=tuple(range(1, w.dim()))), torch.zeros(w.shape[0], dtype=torch.float64))
    assert isinstance(cen, torch_cls)


def test_centralized_weight_has_zero_mean_per_output_channel():
    conv = mabn.CenConv2d(3, 5, 3)
    wc = conv.centralized_weight()
    assert not hasattr(conv, "centered_weight")  # one name: centralized
    assert_close(wc.mean(dim=(1, 2, 3)), torch.zeros(5))
    assert_close(wc, mabn.centralize_weight(conv.weight))
