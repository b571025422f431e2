r"""Watch the batch statistics of normalization layers during training (the paper's Figures 2-4).

A BatchNorm-like layer uses four statistics per channel and normalization group: the mean
:math:`\mu` and variance :math:`\sigma^2` of its input in the forward pass, and in the backward pass
:math:`g = E[\partial L / \partial z]` and :math:`\Psi = E[z \cdot \partial L / \partial z]`, where
:math:`z` is the normalized output and :math:`\partial L / \partial z = \gamma\, \partial L / \partial y`.
The uncentered form (MABN) normalizes by :math:`\chi^2 = E[x^2]` instead and uses :math:`\Psi` only.

:class:`BatchStatsMonitor` records, for every monitored layer and recorded training step, each of
these statistics computed over every normalization group of the call ("small" batch, B samples) and
over the whole batch of the call ("regular" batch), and, for layers with moving-average windows
(MABN and the SMA presets), the moving-average estimates the layer holds. Records are compact
(norms over channels, relative deviations and a few raw channels), kept in memory and exported to
CSV or JSON lines; :func:`read_stats_log` reads either back.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._checks import check_int
from .functional import window_means
from .kernels import group_dims, group_view, per_group_channel
from .modules import StreamNorm

__all__ = ["BatchStatsMonitor", "log_format", "read_stats_log", "write_stats_csv", "write_stats_jsonl"]

# The statistics a record can hold, in the order they are recorded: forward, then backward.
_FORWARD = ("mu", "sigma2", "chi2")
_BACKWARD = ("g", "psi")

#: Columns every record has, in export order (``run`` only when the caller adds it).
BASE_COLUMNS = (
    "run",
    "layer",
    "step",
    "stat",
    "phase",
    "form",
    "groups",
    "group_size",
    "group",
    "small_norm",
    "small_norm_mean",
    "regular_norm",
    "small_reldev",
    "sma_norm",
    "sma_reldev",
    "sma_groups",
    "sma_used",
)
_INT_COLUMNS = {"step", "groups", "group_size", "group", "sma_groups"}
_STR_COLUMNS = {"run", "layer", "stat", "phase", "form"}
_BOOL_COLUMNS = {"sma_used"}


def _is_supported(module: nn.Module) -> bool:
    return isinstance(module, (StreamNorm, _BatchNorm))


def _moments(xv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-(group, channel) mean, biased variance and second moment of a (G, B, C, *) view, each (G, C)."""
    dims = group_dims(xv.dim())
    var, mu = torch.var_mean(xv, dim=dims, correction=0)
    return mu, var, (xv * xv).mean(dim=dims)


def _backward_stats(hv: Tensor, xv: Tensor, mean: Tensor | None, var: Tensor, eps: float) -> dict[str, Tensor]:
    """g and Psi of each group of (G, B, C, *) views, (G, C) each; ``mean`` None: the uncentered form."""
    nd, dims = xv.dim(), group_dims(xv.dim())
    centered = xv if mean is None else xv - per_group_channel(mean, nd)
    z = centered * per_group_channel(torch.rsqrt(var + eps), nd)
    return {"g": hv.mean(dim=dims), "psi": (hv * z).mean(dim=dims)}


def _window_sma(
    before: Tensor | None, steps_before: int, after: Tensor, steps_after: int, groups: int
) -> Tensor | None:
    """Moving averages held by a window, (S, k, C), for the last S groups of a call.

    ``before``/``after`` are the window (m, k, C) before and after the call pushed its groups. When
    the call pushed all its G groups and G <= m, the window contents before and after determine the
    average ending at every group (S = G); otherwise only the one ending at the last group (S = 1),
    the mean of the valid entries of ``after``. Returns None when the window holds nothing or the
    call pushed nothing.
    """
    m = after.shape[0]
    pushed = steps_after - steps_before
    if before is not None and pushed == 0:
        return None  # the call pushed nothing (non-finite statistics): the window is not this call's
    if before is not None and pushed == groups and groups <= m:
        # The engine's own sliding mean, replayed on the entries this call pushed.
        steps = torch.tensor(steps_before, device=before.device)
        return window_means(before, steps, after[m - groups :])[0]
    valid = min(steps_after, m)
    if valid <= 0:
        return None
    return after[m - valid :].mean(0, keepdim=True)


def _parse_channels(channels: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(channels, bool):
        raise TypeError(f"channels must be an int or a sequence of ints, got {channels!r}")
    if isinstance(channels, int):
        if channels < 0:
            raise ValueError(f"channels must be >= 0, got {channels}")
        return tuple(range(channels))
    if not isinstance(channels, Sequence) or isinstance(channels, str):
        raise TypeError(f"channels must be an int or a sequence of ints, got {channels!r}")
    out = []
    for c in channels:
        if isinstance(c, bool) or not isinstance(c, int):
            raise TypeError(f"channel indices must be ints, got {c!r}")
        if c < 0:
            raise ValueError(f"channel indices must be >= 0, got {c}")
        if c not in out:
            out.append(c)
    return tuple(out)


class _Pending:
    """What the backward of one recorded call needs from its forward."""

    __slots__ = (
        "name",
        "step",
        "x",
        "mu",
        "var",
        "chi2",
        "mu_r",
        "var_r",
        "chi2_r",
        "gamma",
        "eps",
        "centered",
        "groups",
        "window_before",
        "steps_before",
        "done",
        "key",
    )


class BatchStatsMonitor:
    r"""Record the forward and backward batch statistics of normalization layers while training.

    For each monitored layer, every ``every``-th training call (a *step* of that layer; calls in
    evaluation mode are not counted) yields one record per statistic, appended to :attr:`records`:

    * forward, from the layer's input x (N, C, \*): ``mu`` = mean, ``sigma2`` = biased variance and
      ``chi2`` = :math:`E[x^2]` per channel;
    * backward, from :math:`h = \gamma\, \partial L / \partial y` (gamma = 1 without affine): ``g`` =
      mean of h and ``psi`` = mean of :math:`h z`, with :math:`z = (x - \mu) / \sqrt{\sigma^2 + \epsilon}`
      in the centered form (BatchNorm) and :math:`z = x / \sqrt{\chi^2 + \epsilon}` in the uncentered
      form (MABN, which does not use ``g``).

    Each statistic is computed over every normalization group (the *small* batch: B =
    ``norm_batch_size`` consecutive samples; B = N for ``torch.nn.BatchNorm``) with that group's own
    forward statistics, and over the whole batch of the call (the *regular* batch). For layers with
    moving-average windows (``forward_window``: mu and sigma2, or chi2; ``backward_window``: g and
    psi, or psi) the record also holds the moving averages the window gives at each group of the
    call (read from the window contents before and after the call; only at the last group when the
    call has more groups than the window holds) and whether the layer used them (``sma_used``:
    out of warm-up). The layer's backward-window entries include the renormalization factor r, which
    is 1 during ``renorm_warmup_iters``; the small and regular ``psi`` here do not.

    A record is a dict with the columns :data:`BASE_COLUMNS` (minus ``run``) and raw channels:

    * ``layer`` (qualified name), ``step`` (1-based training call of the layer), ``stat``,
      ``phase`` ("forward"/"backward"), ``form`` ("centered"/"uncentered"), ``groups`` G,
      ``group_size`` B, ``group``: the 0-based index of the *probed* group, the one whose values
      ``small_norm``, ``sma_norm`` and the raw channels show. It is the first group, whose moving
      average reaches furthest into earlier steps (the paper's "2 + 30" samples at B = 2, m = 16);
      the last group when the call has more groups than the window (G > m), since only the average
      at the last group can then be read from the window. (With G = m the average at the last group
      spans exactly the call's groups, so in the forward pass it equals the regular statistic.)
    * ``small_norm``: L2 norm over channels of the probed group's statistic; ``small_norm_mean``:
      the mean of these norms over all groups; ``regular_norm``: norm of the regular-batch
      statistic; ``small_reldev``: mean over all groups of :math:`\|s_t - s_{reg}\| / \|s_{reg}\|`
      (NaN when :math:`\|s_{reg}\| = 0`);
    * ``sma_norm``: norm of the moving average at the probed group; ``sma_reldev``: mean over the
      ``sma_groups`` groups it is known for of :math:`\|a_t - s_{reg}\| / \|s_{reg}\|`; both None
      (and ``sma_groups`` 0) without a window for this statistic;
    * ``small_c{i}``, ``regular_c{i}``, ``sma_c{i}``: the value of channel i (probed group), for
      the channels selected by ``channels``.

    The hooks never modify the model: statistics are computed under ``torch.no_grad()`` from
    detached tensors into new tensors, so training with and without the monitor is bit-identical.
    Forward hooks compute the forward statistics; a pre-hook and a hook on the layer's autograd node
    compute the backward ones once the layer's backward has run (so its backward window is current).
    Backward statistics need a floating-point output with a ``grad_fn``; forward calls that are never
    backpropagated yield forward records only.

    Args:
        model: the model to watch.
        layers: the layers to monitor: names (as in ``model.named_modules()``) or modules of
            ``model``; ``None`` monitors every normalization layer of this package and every
            ``torch.nn`` BatchNorm layer.
        every: record every ``every``-th training call of each layer (steps every, 2 * every, ...).
        channels: raw channels to keep: the first ``channels`` (int) or these indices (sequence).
            Indices a layer does not have are left None.
        start_step: training calls each layer has already made, so that a resumed run continues
            its step numbering (and its every-th-step schedule) where it stopped.

    Example::

        >>> import mabn, torch
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), mabn.GhostBatchNorm2d(4, norm_batch_size=2))
        >>> with mabn.BatchStatsMonitor(model) as monitor:
        ...     model(torch.randn(8, 1, 6, 6)).square().mean().backward()
        >>> sorted({r["stat"] for r in monitor.records})
        ['chi2', 'g', 'mu', 'psi', 'sigma2']
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[str | nn.Module] | str | nn.Module | None = None,
        every: int = 1,
        channels: int | Sequence[int] = 2,
        start_step: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_int("every", every, 1)
        check_int("start_step", start_step, 0)
        self.channels = _parse_channels(channels)
        self.every = every
        self._layers = self._resolve_layers(model, layers)
        self.records: list[dict[str, Any]] = []
        self._steps = {name: start_step for name in self._layers}
        self._window_before: dict[str, tuple[Tensor, int]] = {}
        self._node_handles: dict[int, list[Any]] = {}
        self._next_key = 0
        self._active = True
        self._handles = []
        for name, module in self._layers.items():
            self._handles.append(module.register_forward_pre_hook(self._make_pre_hook(name)))
            self._handles.append(module.register_forward_hook(self._make_hook(name)))

    @staticmethod
    def _resolve_layers(model: nn.Module, layers: Any) -> dict[str, nn.Module]:
        named = list(model.named_modules())
        names = {id(m): (n or "<model>") for n, m in reversed(named)}  # first name of each module wins
        if layers is None:
            chosen = [(names[id(m)], m) for _, m in named if _is_supported(m)]
            if not chosen:
                raise ValueError(f"no normalization layer found in {type(model).__name__}")
        else:
            if isinstance(layers, (str, nn.Module)):
                layers = [layers]
            by_name = {(n or "<model>"): m for n, m in named}
            chosen = []
            for item in layers:
                if isinstance(item, str):
                    if item not in by_name:
                        raise ValueError(f"model has no layer named {item!r}")
                    module = by_name[item]
                elif isinstance(item, nn.Module):
                    if id(item) not in names:
                        raise ValueError(f"layer {type(item).__name__} is not a module of the model")
                    module = item
                else:
                    raise TypeError(f"layers must hold names or modules, got {item!r}")
                if not _is_supported(module):
                    raise TypeError(
                        f"layer {names[id(module)]!r} ({type(module).__name__}) is not a normalization layer of "
                        "mabn or a torch.nn BatchNorm layer"
                    )
                chosen.append((names[id(module)], module))
            if not chosen:
                raise ValueError("layers is empty")
        out: dict[str, nn.Module] = {}
        for name, module in chosen:
            out.setdefault(name, module)
        return out

    @property
    def layer_names(self) -> list[str]:
        """Names of the monitored layers, in module order."""
        return list(self._layers)

    # ----------------------------------------------------------------- hooks
    def _make_pre_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if not (self._active and module.training) or (self._steps[name] + 1) % self.every:
                return
            window = getattr(module, "forward_window", None)
            if window is not None:
                self._window_before[name] = (window.detach().clone(), int(module.forward_steps))

        return hook

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not (self._active and module.training):
                return
            if not args or not isinstance(args[0], Tensor):
                return
            self._steps[name] += 1
            before = self._window_before.pop(name, None)
            if self._steps[name] % self.every:
                return
            with torch.no_grad():
                self._forward(name, module, args[0], output, before)

        return hook

    # ------------------------------------------------------------ statistics
    def _forward(self, name: str, module: nn.Module, x: Tensor, output: Any, before: Any) -> None:
        x = x.detach()
        dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.to(dtype)
        n = x.shape[0]
        if isinstance(module, StreamNorm):
            b = module.config.norm_batch_size or n
            centered = module.config.centered
        else:
            b, centered = n, True
        if n == 0 or n % b:
            return  # the layer itself raises for this input
        groups = n // b
        # The groups' statistics, and the whole batch's (one group: "regular").
        mu, var, chi2 = _moments(group_view(x, groups))
        mu_r, var_r, chi2_r = (t[0] for t in _moments(group_view(x, 1)))

        sma: dict[str, Tensor] = {}
        used = None
        window = getattr(module, "forward_window", None)
        if window is not None:
            steps_after = int(module.forward_steps)
            prev, steps_before = before if before is not None else (None, -1)
            est = _window_sma(prev, steps_before, window.detach().to(dtype), steps_after, groups)
            if est is not None:
                for i, stat in enumerate(("mu", "sigma2") if centered else ("chi2",)):
                    sma[stat] = est[:, i]
            used = int(module.num_batches_tracked) >= module.config.warmup_iters
        form = "centered" if centered else "uncentered"
        # The probed group: the first, whose moving average reaches furthest back, unless the windows
        # are shorter than the call and only the average at the last group can be read from them.
        m = getattr(module.config, "window", groups) if isinstance(module, StreamNorm) else groups
        has_window = window is not None or getattr(module, "backward_window", None) is not None
        probe = groups - 1 if has_window and groups > m else 0
        common = {"layer": name, "step": self._steps[name], "form": form, "groups": groups, "group_size": b}
        common["group"] = probe
        small = {"mu": mu, "sigma2": var, "chi2": chi2}
        regular = {"mu": mu_r, "sigma2": var_r, "chi2": chi2_r}
        self.records.extend(self._rows(common, "forward", _FORWARD, small, regular, sma, used))

        node = getattr(output, "grad_fn", None) if isinstance(output, Tensor) else None
        if node is None:
            return
        weight = getattr(module, "weight", None)
        p = _Pending()
        p.name, p.step, p.x, p.groups, p.centered = name, self._steps[name], x, groups, centered
        p.mu, p.var, p.chi2, p.mu_r, p.var_r, p.chi2_r = mu, var, chi2, mu_r, var_r, chi2_r
        p.gamma = weight.detach().to(dtype).clone() if weight is not None else None
        p.eps = float(module.eps)
        p.window_before, p.steps_before, p.done = None, -1, False
        p.key = self._next_key
        self._next_key += 1
        self._purge_node_handles()
        self._node_handles[p.key] = [
            node.register_prehook(self._make_node_prehook(module, p)),
            node.register_hook(self._make_node_hook(module, p, common)),
        ]

    def _make_node_prehook(self, module: nn.Module, p: _Pending):
        def prehook(grad_outputs: tuple) -> None:
            window = getattr(module, "backward_window", None)
            if self._active and not p.done and window is not None:
                p.window_before, p.steps_before = window.detach().clone(), int(module.backward_steps)

        return prehook

    def _make_node_hook(self, module: nn.Module, p: _Pending, common: dict[str, Any]):
        def hook(grad_inputs: tuple, grad_outputs: tuple) -> None:
            if not self._active or p.done:
                return
            p.done = True  # a retained graph backpropagated twice is recorded once
            self._node_handles.pop(p.key, None)
            dy = grad_outputs[0] if grad_outputs else None
            if dy is None:
                return
            with torch.no_grad():
                self._backward(module, p, dy, common)

        return hook

    def _backward(self, module: nn.Module, p: _Pending, dy: Tensor, common: dict[str, Any]) -> None:
        x = p.x
        h = dy.detach().to(x.dtype)
        if p.gamma is not None:
            h = h * per_group_channel(p.gamma.unsqueeze(0), h.dim() + 1)[0]
        groups = p.groups
        if p.centered:
            small = _backward_stats(group_view(h, groups), group_view(x, groups), p.mu, p.var, p.eps)
            whole = _backward_stats(group_view(h, 1), group_view(x, 1), p.mu_r[None], p.var_r[None], p.eps)
        else:
            small = _backward_stats(group_view(h, groups), group_view(x, groups), None, p.chi2, p.eps)
            whole = _backward_stats(group_view(h, 1), group_view(x, 1), None, p.chi2_r[None], p.eps)
        regular = {k: v[0] for k, v in whole.items()}

        sma: dict[str, Tensor] = {}
        used = None
        window = getattr(module, "backward_window", None)
        if window is not None:
            steps_after = int(module.backward_steps)
            est = _window_sma(p.window_before, p.steps_before, window.detach().to(x.dtype), steps_after, groups)
            if est is not None:
                for i, stat in enumerate(("g", "psi") if p.centered else ("psi",)):
                    sma[stat] = est[:, i]
            used = int(module.backward_calls) >= module.config.warmup_iters
        self.records.extend(self._rows(common, "backward", _BACKWARD, small, regular, sma, used))

    def _rows(
        self,
        common: dict[str, Any],
        phase: str,
        stats: tuple[str, ...],
        small: dict[str, Tensor],
        regular: dict[str, Tensor],
        sma: dict[str, Tensor],
        used: bool | None,
    ) -> list[dict[str, Any]]:
        rows = []
        probe = common["group"]
        for stat in stats:
            s, r = small[stat], regular[stat]  # (G, C), (C,)
            r_norm = torch.linalg.vector_norm(r)
            s_norms = torch.linalg.vector_norm(s, dim=1)
            s_dev = torch.linalg.vector_norm(s - r, dim=1) / r_norm
            values = [s_norms[probe], s_norms.mean(), r_norm, s_dev.mean()]
            est = sma.get(stat)  # (S, C): the last S groups of the call
            at_probe = None
            if est is not None:
                e_dev = torch.linalg.vector_norm(est - r, dim=1) / r_norm
                values.append(e_dev.mean())
                offset = probe - (s.shape[0] - est.shape[0])
                if offset >= 0:
                    at_probe = est[offset]
                    values.append(torch.linalg.vector_norm(at_probe))
            numbers = torch.stack(values).tolist()  # one host sync per statistic
            row = dict(common)
            row.update(stat=stat, phase=phase, small_norm=numbers[0], small_norm_mean=numbers[1])
            row.update(regular_norm=numbers[2], small_reldev=_finite_or_nan(numbers[3]))
            row.update(sma_norm=None, sma_reldev=None, sma_groups=0, sma_used=None)
            if est is not None:
                row.update(sma_reldev=_finite_or_nan(numbers[4]), sma_groups=est.shape[0], sma_used=used)
                if at_probe is not None:
                    row["sma_norm"] = numbers[5]
            channels = [i for i in self.channels if i < r.shape[0]]
            raw_s = s[probe, channels].tolist() if channels else []
            raw_r = r[channels].tolist() if channels else []
            raw_e = at_probe[channels].tolist() if channels and at_probe is not None else [None] * len(channels)
            values_by_channel = dict(zip(channels, zip(raw_s, raw_r, raw_e)))
            for i in self.channels:
                vs, vr, ve = values_by_channel.get(i, (None, None, None))
                row[f"small_c{i}"], row[f"regular_c{i}"], row[f"sma_c{i}"] = vs, vr, ve
            rows.append(row)
        return rows

    # ------------------------------------------------------------- lifecycle
    def _purge_node_handles(self) -> None:
        # Graphs that were freed without a backward leave dead handles behind.
        dead = [k for k, hs in self._node_handles.items() if all(h.hooks_dict_ref() is None for h in hs)]
        for k in dead:
            del self._node_handles[k]

    def remove(self) -> None:
        """Remove every hook (forward hooks and those on pending autograd nodes); idempotent."""
        self._active = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for handles in self._node_handles.values():
            for handle in handles:
                handle.remove()
        self._node_handles.clear()
        self._window_before.clear()

    def __enter__(self) -> BatchStatsMonitor:
        if not self._active:
            raise RuntimeError("this BatchStatsMonitor has been removed; create a new one")
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def clear(self) -> None:
        """Drop the records collected so far (the step counters keep counting)."""
        self.records.clear()

    def to_csv(self, path: str | os.PathLike) -> None:
        """Write :attr:`records` to ``path`` as CSV (see :func:`write_stats_csv`)."""
        write_stats_csv(self.records, path)

    def to_jsonl(self, path: str | os.PathLike) -> None:
        """Write :attr:`records` to ``path`` as JSON lines (see :func:`write_stats_jsonl`)."""
        write_stats_jsonl(self.records, path)


def _finite_or_nan(value: float) -> float:
    return value if math.isfinite(value) else math.nan


def _columns(records: Sequence[dict[str, Any]]) -> list[str]:
    keys: dict[str, None] = {}
    for record in records:
        keys.update(dict.fromkeys(record))
    base = [c for c in BASE_COLUMNS if c in keys]
    extra = [k for k in keys if k not in BASE_COLUMNS]

    def channel_key(column: str) -> tuple:
        kind, _, index = column.rpartition("_c")
        if index.isdigit() and kind in ("small", "regular", "sma"):
            return (1, int(index), ("small", "regular", "sma").index(kind))
        return (0, column)

    return base + sorted(extra, key=channel_key)


def _open_text(path: str | os.PathLike, mode: str):
    """Open a text file, gzip-compressed when its name ends in ``.gz``."""
    if os.fspath(path).lower().endswith(".gz"):
        return gzip.open(path, mode + "t", newline="")
    return open(path, mode, newline="")


def log_format(path: str | os.PathLike) -> str:
    """``"csv"`` or ``"jsonl"`` from a log file name (``.csv``, ``.jsonl``, ``.json``, each optionally ``.gz``).

    Raises:
        ValueError: for any other name.
    """
    name = os.fspath(path).lower()
    name = name[:-3] if name.endswith(".gz") else name
    suffix = os.path.splitext(name)[1]
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    raise ValueError(f"cannot tell the format of {os.fspath(path)!r}: expected a .csv or .jsonl file (optionally .gz)")


def write_stats_csv(records: Sequence[dict[str, Any]], path: str | os.PathLike | TextIO) -> None:
    """Write monitor records as CSV: one row per record, None as an empty field.

    Floats are written with ``repr`` so :func:`read_stats_log` reads back the same values.

    Args:
        records: dicts as in :attr:`BatchStatsMonitor.records` (extra keys such as ``run`` allowed).
        path: the file to write, gzip-compressed when the name ends in ``.gz``; or an open text file
            (opened with ``newline=""``), which is left open.
    """
    if hasattr(path, "write"):
        _write_csv_rows(records, path)
        return
    with _open_text(path, "w") as f:
        _write_csv_rows(records, f)


def _write_csv_rows(records: Sequence[dict[str, Any]], f: TextIO) -> None:
    columns = _columns(records)
    writer = csv.writer(f)
    writer.writerow(columns)
    for record in records:
        writer.writerow(
            [
                "" if record.get(c) is None else repr(record[c]) if isinstance(record[c], float) else record[c]
                for c in columns
            ]
        )


def write_stats_jsonl(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Write monitor records as JSON lines, one object a line (NaN written as ``NaN``); ``.gz`` compresses."""
    with _open_text(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def _parse_field(column: str, text: str) -> Any:
    if text == "":
        return None
    if column in _STR_COLUMNS:
        return text
    if column in _INT_COLUMNS:
        return int(text)
    if column in _BOOL_COLUMNS:
        if text not in ("True", "False"):
            raise ValueError(f"column {column!r} holds {text!r}, expected True or False")
        return text == "True"
    try:
        return float(text)
    except ValueError:
        return text


def read_stats_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read records written by :func:`write_stats_csv` or :func:`write_stats_jsonl`.

    The format is taken from the suffix: ``.csv`` or ``.jsonl``/``.json``, each optionally followed
    by ``.gz`` for a gzip-compressed file.

    Args:
        path: the log file.

    Returns:
        The records, as :attr:`BatchStatsMonitor.records` holds them.

    Example::

        >>> records = read_stats_log("results/statistics_log.csv")  # doctest: +SKIP
    """
    path = os.fspath(path)
    fmt = log_format(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"statistics log {path!r} does not exist")
    if fmt == "csv":
        with _open_text(path, "r") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or "stat" not in header or "layer" not in header:
                raise ValueError(f"{path!r} is not a statistics log: no header with 'layer' and 'stat' columns")
            return [{c: _parse_field(c, v) for c, v in zip(header, row)} for row in reader if row]
    records = []
    with _open_text(path, "r") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path!r} line {number} is not JSON: {exc}") from None
            if not isinstance(record, dict) or "stat" not in record or "layer" not in record:
                raise ValueError(f"{path!r} line {number} is not a statistics record")
            records.append(record)
    return records
