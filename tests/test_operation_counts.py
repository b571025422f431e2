"""Operation counts of one training forward+backward: the counter itself, and MABN2d kept within its bound.

The full tables come from ``python benchmarks/operation_counts.py`` (results/operation_counts.md).
"""

import pytest
import torch
from torch import nn

from mabn.apps.opcount import COUNT_SHAPE, LARGE_MAP_SHAPE, OperationCounter, count_forward_backward, count_layer

# The bounds on MABN2d's non-view operations (4 samples, 32 channels), past the warm-ups, derived
# from how the engine computes a call (src/mabn/_fused.py, _step.py, _autograd.py, kernels.py).
#
# Fused CPU step (every G, every map size, 9): one native call per direction does the passes and the
#   vector work, so what is dispatched are its allocations (output, the (4, G, C) statistics it keeps
#   for backward, dx, grad_weight, grad_bias: 5) and its host reads of the counters (the forward's
#   phase and fill, the backward's: 4 `_local_scalar_dense`, a memory read on a CPU).
# Generic paths (what a GPU runs), G = 1 (36): forward 21: E[x^2] from the native statistics
#   kernel (batch_norm_update_stats, addcmul: 2); the rows of the product (cat: 1); the coefficients
#   looked up from the counters (clamp, bucketize, index: 3); the product (mm: 1); the running
#   statistics (lerp: 1); the finite guard (abs, max, lt, where: 4); r (div, clamp, sqrt_: 3);
#   gamma * r (mul: 1); the native normalization (1); the guarded writes (where x 2) and one
#   _foreach_add_ for the counters (3). Backward 15: the native backward reduces and writes dx's first
#   term (1); g_r / n and Psi (div, mul: 2); coefficients (3), rows and product (cat, mm: 2), finite
#   guard and guarded write (abs, max, lt, where: 4), counters (_foreach_add_: 1); dx's second term
#   (div, addcmul_: 2); grad_weight = r * sum (mul: 1) -- minus one where the renormalization's r is 1.
#   At G = 4: the grouped reductions and normalization on a group view instead (51).
# Composed CPU paths (no C compiler): the CPU-specific kernels of the generic list (per-sample
#   statistics, a native call per group or per chunk of samples), host reads instead of guards.
# These are today's counts: any growth fails. BatchNorm2d runs 4 on a CPU.
MABN2D_NON_VIEW_BOUND = {
    ("fused", 1, COUNT_SHAPE): 9,
    ("fused", 4, LARGE_MAP_SHAPE): 9,
    ("composed", 1, COUNT_SHAPE): 34,
    ("composed", 1, LARGE_MAP_SHAPE): 46,
    ("composed", 4, COUNT_SHAPE): 48,
    ("generic", 1, COUNT_SHAPE): 36,
    ("generic", 4, COUNT_SHAPE): 51,
}


@pytest.mark.parametrize("dispatch,groups,shape", list(MABN2D_NON_VIEW_BOUND))
def test_mabn2d_operations_within_bound(dispatch, groups, shape):
    count = count_layer("MABN2d", groups, shape=shape, dispatch=dispatch)
    bound = MABN2D_NON_VIEW_BOUND[(dispatch, groups, shape)]
    assert count.non_view <= bound, count.by_name(views=False)
    # Relative to torch's BatchNorm2d, measured here (its count may change with torch).
    batch_norm = count_layer("nn.BatchNorm2d", 1, shape=shape)
    assert batch_norm.non_view >= 2  # at least its forward and backward kernels
    assert count.non_view / batch_norm.non_view <= bound / 4


@pytest.mark.parametrize("layer", ["MABN2d", "GhostBatchNorm2d", "BatchRenorm2d"])
@pytest.mark.parametrize("groups", [1, 4])
def test_the_fused_step_dispatches_no_kernel_of_its_own(layer, groups):
    # Whatever the layer and G: allocations, host reads of CPU counters, and no computation.
    count = count_layer(layer, groups, dispatch="fused")
    computing = {op for op in count.by_name(views=False) if op.split(".")[1] not in _ALLOCATIONS}
    assert computing == set(), computing


_ALLOCATIONS = {"empty_like", "new_empty", "zeros", "new_zeros", "_local_scalar_dense"}


@pytest.mark.parametrize("layer", ["MABN2d", "GhostBatchNorm2d", "BatchRenorm2d"])
def test_generic_paths_do_not_depend_on_the_number_of_groups(layer):
    # What a GPU runs: one kernel per job whatever G (groups of B >= 2 samples: B = 1 skips a sum).
    shape = (8, 32, 4, 4)
    counts = [count_layer(layer, g, shape=shape, dispatch="generic") for g in (2, 4)]
    assert counts[0].ops == counts[1].ops


@pytest.mark.parametrize("dispatch", ["fused", "composed", "generic"])
@pytest.mark.parametrize("groups", [1, 4])
def test_counts_are_deterministic(dispatch, groups):
    first = count_layer("MABN2d", groups, dispatch=dispatch)
    second = count_layer("MABN2d", groups, dispatch=dispatch)
    assert first.ops == second.ops and first.views == second.views
    assert first.total > first.non_view > 0


def test_counter_tells_views_from_kernels_and_leaves_out_host_arithmetic():
    x = torch.randn(4, 3)
    with OperationCounter() as counter:
        y = x.view(3, 4)  # view
        y.t()  # view
        torch._foreach_add_([x], 1.0)  # returns nothing, writes x: a kernel
        torch.ops.aten.promote_types(torch.float16, torch.float32)  # no tensor in or out: left out
        x.sum()  # kernel
    count = counter.count
    assert count.ops == ["aten.view.default", "aten.t.default", "aten._foreach_add_.Scalar", "aten.sum.default"]
    assert count.views == [True, True, False, False]
    assert (count.total, count.non_view) == (4, 2)
    assert dict(count.left_out) == {"aten.promote_types.default": 1}


def test_harness_adds_no_operation_and_no_gradient_accumulation():
    # An identity layer's forward+backward does nothing: whatever is counted for a layer is the layer's.
    x = torch.randn(2, 3, 4, 4)
    assert count_forward_backward(nn.Identity(), x, torch.randn_like(x)).total == 0
    layer = nn.BatchNorm2d(3)
    count = count_forward_backward(layer, x, torch.randn_like(x))
    assert layer.weight.grad is None and layer.bias.grad is None
    # The layer's own backward kernel is the last operation: no accumulation into .grad after it.
    assert count.ops[-1] == "aten.native_batch_norm_backward.default"


def test_count_shapes_take_the_cpu_paths_they_stand_for():
    from mabn.kernels import FUSED_MAX_SPATIAL, PER_SAMPLE_MIN_NUMEL

    for n, c, h, w in (COUNT_SHAPE, LARGE_MAP_SHAPE):
        assert c * h * w >= PER_SAMPLE_MIN_NUMEL and c % 32 == 0 and n == 4
    assert COUNT_SHAPE[2] * COUNT_SHAPE[3] <= FUSED_MAX_SPATIAL < LARGE_MAP_SHAPE[2] * LARGE_MAP_SHAPE[3]


def test_docstring_examples_run():
    import doctest

    import mabn.apps.opcount

    result = doctest.testmod(mabn.apps.opcount)
    assert result.attempted > 0 and result.failed == 0
