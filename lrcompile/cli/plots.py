"""PNG plots of an inspection (matplotlib, the ``plot`` extra; imported only here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lrcompile.errors import LrcompileError
from lrcompile.inspection import Inspection


def write_plots(inspection: Inspection, folder: str | Path) -> list[Path]:
    """Writes ``spectra.png`` (and ``tradeoff.png`` when the curve was measured) into ``folder``.

    Raises:
        LrcompileError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LrcompileError("plots need matplotlib: pip install 'lrcompile[plot]'") from None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [_spectra(plt, inspection, folder / "spectra.png")]
    if inspection.curve:
        written.append(_tradeoff(plt, inspection, folder / "tradeoff.png"))
    return written


def _spectra(plt, inspection: Inspection, path: Path) -> Path:
    kinds = [("plain", "weight SVD")]
    if any(layer.whitened is not None for layer in inspection.layers):
        kinds.append(("whitened", "activation-whitened SVD"))
    figure, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.2), squeeze=False)
    colours = plt.get_cmap("viridis")
    for axis, (kind, title) in zip(axes[0], kinds, strict=True):
        for index, layer in enumerate(inspection.layers):
            values = getattr(layer, kind)
            if values is None:
                continue
            energy = np.square(values.astype(np.float64))
            missing = 1.0 - np.cumsum(energy) / energy.sum()
            rank = np.arange(1, len(values) + 1) / len(values)
            colour = colours(index / max(1, len(inspection.layers) - 1))
            axis.plot(rank, np.maximum(missing, 1e-8), color=colour, alpha=0.7, linewidth=1)
        axis.set_yscale("log")
        axis.set_ylim(1e-4, 1.0)
        axis.set_xlabel("rank / min(K, N)")
        axis.set_ylabel("energy discarded (1 - kept)")
        axis.set_title(f"{title}, one line per layer")
        axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _tradeoff(plt, inspection: Inspection, path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(6, 4.2))
    cost = [point.cost_ratio for point in inspection.curve]
    axis.plot(cost, [p.measured_error for p in inspection.curve], "o-", label="measured")
    axis.plot(cost, [p.predicted_error for p in inspection.curve], "x--", label="predicted")
    axis.set_xlabel("cost of the factorable layers (1 = dense)")
    axis.set_ylabel("relative L2 error of the outputs")
    axis.set_title(f"the path --rank auto bisects ({inspection.calibration})", fontsize=9)
    axis.invert_xaxis()
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
