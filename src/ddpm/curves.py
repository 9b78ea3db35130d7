"""The training curves as PNG files (matplotlib), beside the vega plots of the same TSVs: they
show in `dvc plots show` without a network (its page loads vega from a CDN) and in any viewer.

plots/curves/loss.png   the loss log, raw and smoothed, against the optimizer step
plots/curves/fid.png    the FIDs (and KIDs) during training against the epoch; absent while there
                        are none
"""
from __future__ import annotations

import math
from pathlib import Path
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from ddpm.files import atomic_file

LOSS_PNG, FID_PNG = "loss.png", "fid.png"
SIZE, DPI = (6.4, 4.0), 100  # inches, dots per inch: 640 x 400 pixels whatever the data
SPAN = 0.02                  # the smoothing's span, as a fraction of the loss rows


def smooth(values: Sequence[float], span: float) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing), w = 1 - 1/span:
    s_n = sum_{i<=n} w^(n-i) x_i / sum_{i<=n} w^(n-i), so a constant series stays constant."""
    w = 1.0 - 1.0 / max(span, 1.0)
    out, mean, weight = np.empty(len(values)), 0.0, 0.0
    for n, x in enumerate(values):
        mean, weight = w * mean + x, w * weight + 1.0
        out[n] = mean / weight
    return out


def loss_span(rows: int) -> float:
    """The span loss_figure smooths over: SPAN of the rows, at least one (no smoothing)."""
    return max(1.0, SPAN * rows)


def loss_figure(rows: Sequence[Sequence[float]], objective: str = "eps-prediction MSE") -> Figure:
    """rows: plots/train/loss.tsv's (step, loss, images/s); objective: what the loss is (the
    y label; ddpm.losses.Loss.label). Log scale while every loss is > 0."""
    fig = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    steps = [row[0] for row in rows]
    loss = [row[1] for row in rows]
    span = loss_span(len(rows))
    ax.plot(steps, loss, color="tab:blue", alpha=0.35, linewidth=0.8,
            label="loss (mean over train.log_every steps)")
    ax.plot(steps, smooth(loss, span), color="tab:blue", linewidth=2,
            label=f"smoothed (exponential moving average, span {span:.0f} rows)")
    if loss and all(math.isfinite(x) and x > 0 for x in loss):
        ax.set_yscale("log")
    ax.set(xlabel="optimizer step", ylabel=objective, title="Training loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper right")
    return fig


def fid_figure(rows: Sequence[Sequence[float]]) -> Figure:
    """rows: plots/train/fid.tsv's (epoch, step, FID, seconds[, KID, KID's std]); the lowest FID
    is marked, and the KIDs, where known, drawn on a right-hand axis with their std as bars."""
    fig = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    epochs = [row[0] for row in rows]
    fid = [row[2] for row in rows]
    lines = ax.plot(epochs, fid, marker="o", color="tab:orange", label="FID of the EMA weights")
    best = int(np.argmin(fid))
    lines.append(ax.scatter([epochs[best]], [fid[best]], s=120, facecolors="none",
                            edgecolors="black", zorder=3,
                            label=f"lowest FID: {fid[best]:.2f} at epoch {epochs[best]:g}"))
    ax.set(xlabel="epoch", ylabel="FID (train.fid_images images)",
           title="FID and KID during training" if _kids(rows) else "FID during training")
    ax.grid(alpha=0.3)
    if kids := _kids(rows):
        right = ax.twinx()
        x, kid, std = zip(*kids)
        lines.append(right.errorbar(x, kid, yerr=std, marker="s", markersize=4, capsize=3,
                                    color="tab:green", label="KID (right; bars: std over its "
                                                             "subsets)"))
        right.set_ylabel("KID")
    ax.legend(handles=lines, loc="upper right")
    return fig


def _kids(rows: Sequence[Sequence[float]]) -> list[tuple[float, float, float]]:
    """(epoch, KID, std) of the rows that have a KID."""
    return [(row[0], row[4], row[5]) for row in rows if len(row) >= 6 and math.isfinite(row[4])]


def save(fig: Figure, path: Path) -> None:
    """PNG, replaced atomically; no Software tag, so the bytes follow the pixels alone."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})


def write(folder: Path, loss_rows: Sequence[Sequence[float]],
          fid_rows: Sequence[Sequence[float]], objective: str = "eps-prediction MSE") -> None:
    """folder/loss.png, and folder/fid.png when there are FIDs (else none: a stale one goes)."""
    save(loss_figure(loss_rows, objective), folder / LOSS_PNG)
    if fid_rows:
        save(fid_figure(fid_rows), folder / FID_PNG)
    else:
        (folder / FID_PNG).unlink(missing_ok=True)
