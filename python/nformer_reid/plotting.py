"""PNG plots of the app: CMC curves and training losses (matplotlib, imported on first use)."""
from typing import Dict, List

import numpy as np

from nformer_reid.utils.checks import as_int
from nformer_reid.utils.io import save_figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_cmc(curves, path, max_rank: int = 20, title: str = "CMC"):
    """Save CMC curves {label: cmc array (or (cmc, mAP))} to path (PNG), atomically."""
    from matplotlib.ticker import MaxNLocator

    max_rank = as_int(max_rank, "max_rank", minimum=1)
    if not isinstance(curves, dict) or not curves:
        raise ValueError("curves must be a non-empty {label: cmc} mapping")
    for label, curve in curves.items():
        values = np.asarray(curve[0] if isinstance(curve, tuple) else curve, dtype=np.float64)
        if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all():
            raise ValueError(f"curves[{label!r}] must be a non-empty 1-D array of finite values")

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for label, curve in curves.items():
        mAP = None
        if isinstance(curve, tuple):
            curve, mAP = curve
        curve = np.asarray(curve)[:max_rank]
        name = f"{label} (R1 {curve[0]:.1%}" + (f", mAP {mAP:.1%})" if mAP is not None else ")")
        ax.plot(np.arange(1, len(curve) + 1), curve, marker="o", markersize=3, label=name)
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    try:
        save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)
    return path


def plot_losses(histories: Dict[str, List[dict]], path: str, key: str = "loss") -> str:
    """Save the per-step `key` of each training history {label: [{key: value}, ...]} (and its
    moving average) to path (PNG), atomically."""
    if not isinstance(histories, dict):
        raise TypeError(f"histories must be a {{label: [step dicts]}} mapping, got {type(histories).__name__}")
    for label, hist in histories.items():
        if not all(isinstance(h, dict) and key in h for h in hist):
            raise ValueError(f"histories[{label!r}] must be a list of dicts holding {key!r}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for label, hist in histories.items():
        values = np.array([h[key] for h in hist])
        ax.plot(np.arange(1, len(values) + 1), values, alpha=0.35, label=f"{label} (per step)")
        if len(values) >= 10:
            w = max(2, len(values) // 20)
            ax.plot(np.arange(w, len(values) + 1), np.convolve(values, np.ones(w) / w, mode="valid"),
                    label=f"{label} (moving avg {w})")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)
    return path
