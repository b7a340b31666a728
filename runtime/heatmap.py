"""A picture of which layers ran at which denoising step, drawn from a decision trace.

Reads the versioned JSON trace (``foresight-trace/2``) that the controller's decisions are
recorded in; knows nothing about tensors or engines. Layers run down the y axis (layer 0
at the top), steps along x. Each cell is one of:

* reused (the layer is not in the step's ``computed`` list): grey, hatched;
* computed and measured: coloured by the largest probe MSE against the cached output,
  on a log scale;
* computed but not measured (every step of policy ``none``): a pale neutral colour.

A strip below shows the share of layers computed per step, with measuring steps marked. In a run
of several stages (a model that switches experts) a black line marks where each stage begins.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np

from foresight import TRACE_SCHEMA  # the controller owns the trace format
from runtime.errors import ForesightError
from runtime.outputs import OutputSet, atomic_write, check_output_path

_REUSED_FACE = "#b0b0b0"
_REUSED_HATCH = "#6e6e6e"
_UNMEASURED_FACE = "#f1ead8"
_CMAP = "viridis"

# Cell states in the status matrix.
_REUSED, _UNMEASURED, _MEASURED = 0, 1, 2


def _trace_error(msg: str) -> ForesightError:
    return ForesightError(f"trace: {msg}; pass a trace saved by the runtime (schema {TRACE_SCHEMA!r})")


def _parse(trace: dict) -> tuple[list, np.ndarray, np.ndarray, list[bool]]:
    """Returns step labels, status (L, T), max-over-probes mse (L, T; NaN if none), measure flags."""
    if not isinstance(trace, dict):
        raise _trace_error(f"expected a dict, got {type(trace).__name__}")
    if trace.get("schema") != TRACE_SCHEMA:
        raise _trace_error(f"unknown schema {trace.get('schema')!r}")
    try:
        num_layers = int(trace["num_layers"])
        steps = trace["steps"]
    except (KeyError, TypeError, ValueError) as e:
        raise _trace_error(f"missing or bad field {e}") from e
    if num_layers < 1:
        raise _trace_error(f"num_layers is {num_layers}")
    if not steps:
        raise _trace_error("no steps recorded")

    status = np.full((num_layers, len(steps)), _REUSED, dtype=np.int8)  # (L, T)
    mse = np.full((num_layers, len(steps)), np.nan)  # (L, T)
    labels, measure = [], []
    for t, step in enumerate(steps):
        labels.append(step.get("step", t))
        measure.append(bool(step.get("measure", False)))
        computed = step.get("computed")
        if computed is None:
            raise _trace_error(f"step {labels[-1]} has no 'computed' list")
        for layer in computed:
            if not 0 <= int(layer) < num_layers:
                raise _trace_error(f"step {labels[-1]} computes layer {layer}, outside 0..{num_layers - 1}")
            status[int(layer), t] = _UNMEASURED
        rows = step.get("mse") or []
        for layer, row in enumerate(rows[:num_layers]):
            if status[layer, t] == _REUSED or not row:
                continue  # A reused layer's MSE (if any) says nothing about this step's output.
            values = [float(v) for v in row if v is not None and math.isfinite(float(v))]
            if values:
                status[layer, t] = _MEASURED
                mse[layer, t] = max(values)
    return labels, status, mse, measure


def _log_norm(mse: np.ndarray):
    from matplotlib.colors import LogNorm

    finite = mse[np.isfinite(mse)]
    positive = finite[finite > 0]
    if positive.size == 0:
        return LogNorm(vmin=1e-6, vmax=1e-5), 1e-6
    lo, hi = float(positive.min()), float(positive.max())
    if hi < lo * 10:  # Less than a decade: widen to one, centred, so a labelled tick shows.
        mid = math.sqrt(lo * hi)
        lo, hi = mid / math.sqrt(10), mid * math.sqrt(10)
    return LogNorm(vmin=lo, vmax=hi), lo  # Exact zeros are drawn at the bottom of the scale.


def plot_reuse_heatmap(trace: dict, path, title: str | None = None, outputs: OutputSet | None = None) -> pathlib.Path:
    """Draw the layer x step reuse map of ``trace`` as a PNG at ``path`` (atomically, or staged
    in ``outputs`` to appear when it commits).

    ``path`` must end in ``.png``. ``title`` replaces the default first title line; the
    policy and the share of layer calls skipped are always shown. Returns the resolved path.
    """
    path = check_output_path(path, (".png",))
    labels, status, mse, measure = _parse(trace)

    # Matplotlib is imported here, not at module import: the CLI only pays for it with --heatmap.
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle
    from matplotlib.collections import PatchCollection
    from matplotlib.ticker import MaxNLocator, FixedLocator, FuncFormatter

    num_layers, num_steps = status.shape
    skipped = int((status == _REUSED).sum())
    total = status.size
    policy = trace.get("policy", "?")

    # Cells stay roughly square-ish and labels readable from 1x1 up to ~100 steps x 40 layers.
    cell_w = min(0.32, max(0.1, 11.0 / num_steps))
    cell_h = min(0.3, max(0.14, 6.0 / num_layers))
    heat_w, heat_h = num_steps * cell_w, max(num_layers * cell_h, 1.6)
    share_h = 0.9
    fig_w = max(6.5, heat_w + 2.6)
    fig_h = heat_h + share_h + 2.0
    fig = Figure(figsize=(fig_w, fig_h), dpi=110, layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[heat_h, share_h], width_ratios=[1, 0.025])
    ax = fig.add_subplot(grid[0, 0])
    cax = fig.add_subplot(grid[0, 1])
    ax_share = fig.add_subplot(grid[1, 0], sharex=ax)
    fig.add_subplot(grid[1, 1]).set_axis_off()

    # The axes background is the unmeasured colour; measured cells are painted over it and
    # reused cells are covered with hatched grey rectangles.
    extent = (-0.5, num_steps - 0.5, num_layers - 0.5, -0.5)  # Layer 0 at the top.
    ax.set_facecolor(_UNMEASURED_FACE)
    norm, floor = _log_norm(mse)
    shown = np.where(status == _MEASURED, np.maximum(np.nan_to_num(mse, nan=floor), floor), np.nan)
    image = ax.imshow(np.ma.masked_invalid(shown), cmap=_CMAP, norm=norm, extent=extent,
                      aspect="auto", interpolation="nearest")
    layers_r, steps_r = np.nonzero(status == _REUSED)
    ax.add_collection(PatchCollection(
        [Rectangle((t - 0.5, l - 0.5), 1, 1) for l, t in zip(layers_r, steps_r)],
        facecolor=_REUSED_FACE, edgecolor=_REUSED_HATCH, hatch="///", linewidth=0,
    ))
    ax.set_xlim(-0.5, num_steps - 0.5)
    ax.set_ylim(num_layers - 0.5, -0.5)
    ax.set_ylabel("layer (0 = top)")
    ax.yaxis.set_major_locator(MaxNLocator(nbins=min(num_layers, 15), integer=True, min_n_ticks=1))
    ax.tick_params(axis="x", labelbottom=False)
    # Thin white separators between steps keep columns countable when cells are small.
    if num_steps <= 120:
        ax.vlines(np.arange(num_steps - 1) + 0.5, -0.5, num_layers - 0.5, colors="white", linewidths=0.4)
    for start in trace.get("stages", [0])[1:]:  # where another expert takes over: a fresh run of the policy
        ax.axvline(start - 0.5, color="black", linewidth=1.6)
        ax.text(start - 0.4, -0.6, "expert switch", fontsize=7, va="bottom")

    measured = bool((status == _MEASURED).any())
    if measured:
        fig.colorbar(image, cax=cax).set_label("mse vs cached output")
    else:  # Policy none (or nothing measured): a colour scale with no data would mislead.
        cax.set_axis_off()

    # Share of layers computed per step; measuring steps are drawn darker.
    share = (status != _REUSED).mean(axis=0)  # (T,)
    colours = ["#2b6ca3" if m else "#8fb7d9" for m in measure]
    ax_share.bar(np.arange(num_steps), share, width=0.85, color=colours)
    ax_share.set_ylim(0, 1.05)
    ax_share.set_yticks([0, 0.5, 1])
    ax_share.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0%}"))
    ax_share.set_ylabel("layers\ncomputed")
    ax_share.set_xlabel("denoising step")
    ax_share.grid(axis="y", linewidth=0.4, alpha=0.5)
    ax_share.set_axisbelow(True)
    # Tick positions are column indices; labels are the trace's own step numbers.
    tick_idx = MaxNLocator(nbins=min(num_steps, 20), integer=True, min_n_ticks=1).tick_values(0, num_steps - 1)
    tick_idx = [int(i) for i in tick_idx if 0 <= i < num_steps]
    ax_share.xaxis.set_major_locator(FixedLocator(tick_idx))
    ax_share.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _step_label(labels, v)))

    handles = [
        Patch(facecolor=_REUSED_FACE, edgecolor=_REUSED_HATCH, hatch="///", linewidth=0, label="reused (skipped)"),
        Patch(facecolor=_UNMEASURED_FACE, edgecolor="#999999", linewidth=0.5, label="computed, not measured"),
    ]
    if measured:
        handles.append(Patch(facecolor=image.cmap(0.6), label="computed, measured (colour = mse)"))
    if any(measure):
        handles += [Patch(facecolor="#2b6ca3", label="measuring step"), Patch(facecolor="#8fb7d9", label="other step")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 3 if fig_w < 9 else 5),
               fontsize="small", frameon=False)
    headline = title if title is not None else "Layer reuse"
    fig.suptitle(f"{headline}\npolicy {policy}: {skipped}/{total} layer calls skipped "
                 f"({skipped / total:.0%}), {num_layers} layer{'s' * (num_layers != 1)} x {num_steps} step{'s' * (num_steps != 1)}"
                 + ("" if measured else ", no mse measured"), fontsize="medium")

    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), outputs)


def _step_label(labels: list, v: float) -> str:
    i = int(round(v))
    return str(labels[i]) if 0 <= i < len(labels) else ""
