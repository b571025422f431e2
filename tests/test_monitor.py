"""BatchStatsMonitor: values against statistics computed here, hooks, no effect on training, export."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import mabn
from mabn.monitor import BatchStatsMonitor, read_stats_log, write_stats_csv, write_stats_jsonl

EPS = 1e-5


def _by(records, **keys):
    return [r for r in records if all(r.get(k) == v for k, v in keys.items())]


def _one(records, **keys):
    rows = _by(records, **keys)
    assert len(rows) == 1, (keys, len(rows))
    return rows[0]


def _close(actual, expected):
    torch.testing.assert_close(
        torch.tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    )


def test_hand_checkable_forward_values():
    # Channel 0 holds 1, 3 | 5, 7 (two groups of two samples), channel 1 is constant 2.
    layer = mabn.GhostBatchNorm1d(2, norm_batch_size=2, dtype=torch.float64)
    x = torch.tensor([[1.0, 2.0], [3.0, 2.0], [5.0, 2.0], [7.0, 2.0]], dtype=torch.float64)
    with BatchStatsMonitor(layer) as monitor:
        layer(x)
    mu, var, chi2 = (_one(monitor.records, stat=s) for s in ("mu", "sigma2", "chi2"))
    assert mu["groups"] == 2 and mu["group_size"] == 2 and mu["step"] == 1 and mu["layer"] == "<model>"
    assert mu["group"] == 0  # the probed group: the first
    assert mu["form"] == "centered" and mu["phase"] == "forward"
    # First group: mu = (2, 2), var = (1, 0), E[x^2] = (5, 4); whole batch: mu = (4, 2), var = (5, 0), E[x^2] = (21, 4).
    assert (mu["small_c0"], mu["small_c1"], mu["regular_c0"], mu["regular_c1"]) == (2.0, 2.0, 4.0, 2.0)
    assert (var["small_c0"], var["small_c1"], var["regular_c0"], var["regular_c1"]) == (1.0, 0.0, 5.0, 0.0)
    assert (chi2["small_c0"], chi2["small_c1"], chi2["regular_c0"], chi2["regular_c1"]) == (5.0, 4.0, 21.0, 4.0)
    _close(mu["small_norm"], math.sqrt(8.0))
    _close(mu["small_norm_mean"], (math.sqrt(8.0) + math.sqrt(40.0)) / 2)
    _close(mu["regular_norm"], math.sqrt(20.0))
    _close(mu["small_reldev"], 2.0 / math.sqrt(20.0))  # both groups are 2 away from the batch mean
    _close(var["small_reldev"], 4.0 / 5.0)
    _close(chi2["small_reldev"], (16.0 / math.sqrt(457.0) + 16.0 / math.sqrt(457.0)) / 2)


def _direct_stats(x, dy, gamma, groups, centered):
    """Per-group and whole-batch statistics written out with plain tensor ops, (G, C) and (C,)."""

    def stats(t, d):  # t, d: (n, C, L)
        mu = t.mean(dim=(0, 2))
        var = ((t - mu[None, :, None]) ** 2).mean(dim=(0, 2))
        chi2 = (t * t).mean(dim=(0, 2))
        h = d * gamma[None, :, None]
        if centered:
            z = (t - mu[None, :, None]) / torch.sqrt(var + EPS)[None, :, None]
        else:
            z = t / torch.sqrt(chi2 + EPS)[None, :, None]
        return {"mu": mu, "sigma2": var, "chi2": chi2, "g": h.mean(dim=(0, 2)), "psi": (h * z).mean(dim=(0, 2))}

    x3, d3 = x.flatten(2), dy.flatten(2)
    b = x.shape[0] // groups
    small = [stats(x3[i * b : (i + 1) * b], d3[i * b : (i + 1) * b]) for i in range(groups)]
    small = {k: torch.stack([s[k] for s in small]) for k in small[0]}
    return small, stats(x3, d3)


def _check_small_regular(record, small, regular, channels):
    s, r = small[record["stat"]], regular[record["stat"]]
    assert record["group"] == 0
    _close(record["small_norm"], s[0].norm())
    _close(record["small_norm_mean"], s.norm(dim=1).mean())
    _close(record["regular_norm"], r.norm())
    _close(record["small_reldev"], ((s - r).norm(dim=1) / r.norm()).mean())
    for c in channels:
        _close(record[f"small_c{c}"], s[0, c])
        _close(record[f"regular_c{c}"], r[c])


LAYERS = {
    "torch_bn": (lambda: nn.BatchNorm2d(3, dtype=torch.float64), 1, True),
    "ghost_bn": (lambda: mabn.GhostBatchNorm2d(3, norm_batch_size=2, dtype=torch.float64), 3, True),
    "uncentered": (
        lambda: mabn.GeneralBatchNorm2d.from_preset("uncentered", 3, norm_batch_size=3, dtype=torch.float64),
        2,
        False,
    ),
    "mabn": (lambda: mabn.MABN2d(3, norm_batch_size=2, window=4, dtype=torch.float64), 3, False),
    "brn": (lambda: mabn.BatchRenorm2d(3, norm_batch_size=6, dtype=torch.float64), 1, True),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_values_equal_direct_statistics(kind):
    make, groups, centered = LAYERS[kind]
    layer = make()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([2.0, -0.5, 1.5], dtype=torch.float64))
    monitor = BatchStatsMonitor(nn.Sequential(layer), channels=[0, 2])
    for step in range(1, 3):
        x = (torch.randn(6, 3, 2, 3, dtype=torch.float64) + 0.5).requires_grad_()
        dy = torch.randn(6, 3, 2, 3, dtype=torch.float64)
        layer(x).backward(dy)  # dL/dy = dy
        small, regular = _direct_stats(x.detach(), dy, layer.weight.detach(), groups, centered)
        rows = _by(monitor.records, step=step)
        assert sorted(r["stat"] for r in rows) == sorted(["mu", "sigma2", "chi2", "g", "psi"])
        for record in rows:
            assert record["groups"] == groups and record["group_size"] == 6 // groups and record["layer"] == "0"
            assert record["form"] == ("centered" if centered else "uncentered")
            assert "small_c1" not in record
            _check_small_regular(record, small, regular, (0, 2))
    monitor.remove()


def _sma_reference(history, m):
    """SMA ending at each entry of ``history`` (list of (C,) tensors): mean of the last <= m entries."""
    return [torch.stack(history[max(0, t - m + 1) : t + 1]).mean(0) for t in range(len(history))]


@pytest.mark.parametrize("warmup_iters", [1, 3, 100])
@pytest.mark.parametrize("window, groups", [(4, 2), (3, 3), (2, 4)])
def test_moving_averages_of_mabn(warmup_iters, window, groups):
    c, b = 3, 2
    layer = mabn.MABN2d(c, norm_batch_size=b, window=window, warmup_iters=warmup_iters, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, 0.5, -1.0], dtype=torch.float64))
    gamma = layer.weight.detach().clone()
    monitor = BatchStatsMonitor(layer, channels=3)
    chi2_stream, psi_stream = [], []
    for call in range(1, 5):
        x = torch.randn(groups * b, c, 2, 2, dtype=torch.float64).requires_grad_()
        dy = torch.randn_like(x)
        layer(x).backward(dy)
        xs, hs = x.detach().flatten(2), (dy * gamma[None, :, None, None]).flatten(2)
        regular_chi2 = (xs * xs).mean(dim=(0, 2))
        regular_psi = (hs * xs / torch.sqrt(regular_chi2 + EPS)[None, :, None]).mean(dim=(0, 2))
        new_chi2 = [(xs[i * b : (i + 1) * b] ** 2).mean(dim=(0, 2)) for i in range(groups)]
        chi2_stream += new_chi2
        chi2_sma = _sma_reference(chi2_stream, window)[-groups:]
        in_warmup = call < warmup_iters
        for i in range(groups):
            # The second moment the layer normalized with (r = 1 during the renorm warm-up), and the Psi it pushed.
            used = new_chi2[i] if in_warmup else chi2_sma[i]
            xg, hg = xs[i * b : (i + 1) * b], hs[i * b : (i + 1) * b]
            psi_stream.append((hg * xg / torch.sqrt(used + EPS)[None, :, None]).mean(dim=(0, 2)))
        psi_sma = _sma_reference(psi_stream, window)[-groups:]
        for stat, sma, regular, active in (
            ("chi2", chi2_sma, regular_chi2, not in_warmup),
            ("psi", psi_sma, regular_psi, not in_warmup),
        ):
            record = _one(monitor.records, step=call, stat=stat)
            assert record["sma_used"] is active
            # The probed group is the first, or the last when the window is shorter than the call.
            probe = 0 if groups <= window else groups - 1
            assert record["group"] == probe
            _close(record["sma_norm"], sma[probe].norm())
            for ch in range(c):
                _close(record[f"sma_c{ch}"], sma[probe][ch])
            known = groups if groups <= window else 1
            assert record["sma_groups"] == known
            expected = torch.stack([(s - regular).norm() / regular.norm() for s in sma[-known:]]).mean()
            _close(record["sma_reldev"], expected)
        for stat in ("mu", "sigma2", "g"):
            record = _one(monitor.records, step=call, stat=stat)
            assert record["sma_norm"] is None and record["sma_reldev"] is None and record["sma_used"] is None
    monitor.remove()


def test_centered_backward_window_gives_g_and_psi():
    layer = mabn.GeneralBatchNorm1d.from_preset(
        "bn_ema_sma", 2, norm_batch_size=2, window=8, warmup_iters=100, dtype=torch.float64
    )
    with BatchStatsMonitor(layer) as monitor:
        small_history = {"g": [], "psi": []}
        for step in range(1, 4):
            x = torch.randn(4, 2, 5, dtype=torch.float64, requires_grad=True)
            dy = torch.randn_like(x)
            layer(x).backward(dy)
            small, _ = _direct_stats(x.detach(), dy, layer.weight.detach(), 2, True)
            for stat in ("g", "psi"):
                # In warm-up the layer uses (and stores) each group's own g and Psi.
                small_history[stat] += list(small[stat])
                record = _one(monitor.records, step=step, stat=stat)
                expected = _sma_reference(small_history[stat], 8)[-2]  # at the first of the two groups
                _close(record["sma_c0"], expected[0])
                _close(record["sma_c1"], expected[1])
                assert record["sma_used"] is False
    assert _one(monitor.records, step=1, stat="mu")["sma_norm"] is None  # no forward window in this preset


def _tiny_model():
    return nn.Sequential(
        mabn.CenConv2d(1, 4, 3, padding=1, bias=False),
        mabn.MABN2d(4, norm_batch_size=2, window=4, warmup_iters=2, renorm_warmup_iters=3),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3, bias=False),
        mabn.GhostBatchNorm2d(4, norm_batch_size=2),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def _train(monitor_kwargs, steps=6):
    torch.manual_seed(1)
    model = _tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = torch.Generator().manual_seed(2)
    monitor = BatchStatsMonitor(model, **monitor_kwargs) if monitor_kwargs is not None else None
    for _ in range(steps):
        x = torch.randn(8, 1, 6, 6, generator=data)
        y = torch.randint(0, 3, (8,), generator=data)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if monitor is not None:
        monitor.remove()
    return model, monitor


@pytest.mark.parametrize("kwargs", [{}, {"every": 2}, {"layers": ["1"], "channels": [1, 3]}])
def test_training_is_bit_identical_with_monitor(kwargs):
    plain, _ = _train(None)
    watched, monitor = _train(kwargs)
    assert monitor.records
    for (name, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items()):
        assert torch.equal(a, b), name


def test_every_and_layer_selection():
    _, monitor = _train({"every": 2, "layers": ["4", "7"]})
    assert monitor.layer_names == ["4", "7"]
    assert {r["layer"] for r in monitor.records} == {"4", "7"}
    assert sorted({r["step"] for r in monitor.records}) == [2, 4, 6]
    assert len(monitor.records) == 2 * 3 * 5  # layers x recorded steps x statistics


def _hook_counts(model):
    return [
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    ]


def test_hooks_removed():
    model = _tiny_model()
    with BatchStatsMonitor(model) as monitor:
        assert sum(_hook_counts(model)) == 2 * 3
        out = model(torch.randn(4, 1, 6, 6))  # a pending backward when the monitor goes away
        forward_rows = len(monitor.records)
    assert _hook_counts(model) == [0] * len(list(model.modules()))
    out.sum().backward()
    model(torch.randn(4, 1, 6, 6)).sum().backward()
    assert len(monitor.records) == forward_rows == 3 * 3
    monitor.remove()  # idempotent
    with pytest.raises(RuntimeError):
        monitor.__enter__()

    other = BatchStatsMonitor(model, layers=[model[1]])
    other.remove()
    assert _hook_counts(model) == [0] * len(list(model.modules()))


def test_eval_and_no_grad_calls():
    model = _tiny_model()
    with BatchStatsMonitor(model) as monitor:
        model.eval()
        model(torch.randn(4, 1, 6, 6))
        assert monitor.records == []
        model.train()
        with torch.no_grad():
            model(torch.randn(4, 1, 6, 6))
    assert {r["phase"] for r in monitor.records} == {"forward"}
    assert {r["step"] for r in monitor.records} == {1}


def _same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float) and math.isnan(a[key]):
            assert isinstance(b[key], float) and math.isnan(b[key]), key
        else:
            assert a[key] == b[key] and type(a[key]) is type(b[key]), (key, a[key], b[key])


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".csv.gz", ".jsonl.gz"])
def test_export_round_trip(tmp_path, suffix):
    _, monitor = _train({}, steps=3)
    records = [dict(r, run="tiny") for r in monitor.records]
    records[0]["small_reldev"] = math.nan  # what a zero regular statistic gives
    path = tmp_path / f"log{suffix}"
    (write_stats_csv if ".csv" in suffix else write_stats_jsonl)(records, path)
    if suffix.endswith(".gz"):
        with open(path, "rb") as f:
            assert f.read(2) == b"\x1f\x8b"  # gzip magic
    back = read_stats_log(path)
    assert len(back) == len(records)
    for a, b in zip(records, back):
        _same(a, b)
    if suffix == ".csv":
        assert path.read_text().splitlines()[0].startswith("run,layer,step,stat,")
    # The monitor's own methods write the same thing.
    own = tmp_path / f"own{suffix}"
    (monitor.to_csv if ".csv" in suffix else monitor.to_jsonl)(own)
    for a, b in zip(monitor.records, read_stats_log(own)):
        _same(a, b)


def test_bad_arguments():
    model = _tiny_model()
    with pytest.raises(ValueError, match="every"):
        BatchStatsMonitor(model, every=0)
    with pytest.raises(TypeError, match="every"):
        BatchStatsMonitor(model, every=1.5)
    with pytest.raises(ValueError, match="'nope'"):
        BatchStatsMonitor(model, layers=["nope"])
    with pytest.raises(TypeError, match="'2'.*ReLU"):
        BatchStatsMonitor(model, layers=["2"])
    with pytest.raises(ValueError, match="not a module of the model"):
        BatchStatsMonitor(model, layers=[nn.BatchNorm2d(4)])
    with pytest.raises(ValueError, match="no normalization layer"):
        BatchStatsMonitor(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="channels"):
        BatchStatsMonitor(model, channels=-1)
    with pytest.raises(TypeError, match="model"):
        BatchStatsMonitor("model")
    assert _hook_counts(model) == [0] * len(list(model.modules()))


def test_read_stats_log_errors(tmp_path):
    with pytest.raises(ValueError, match="format"):
        read_stats_log(tmp_path / "log.txt")
    with pytest.raises(FileNotFoundError):
        read_stats_log(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a statistics log"):
        read_stats_log(bad)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"layer": "x", "stat": "mu"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        read_stats_log(bad)
