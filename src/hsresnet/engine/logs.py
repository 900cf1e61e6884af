"""Run records on rank 0: per-epoch CSV, TensorBoard scalars, a PNG of the curves and the final JSON summary."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .outputs import atomic_write


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically (a reader never sees half a file)."""
    text = json.dumps(data, indent=2, default=str) + '\n'
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))


def write_csv(path: str | Path, rows: List[Dict[str, Any]]) -> None:
    """Write dict rows, atomically; the header is the union of keys in first-seen order."""
    keys: List[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]

    def write(tmp: Path) -> None:
        with open(tmp, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(Path(path), write)


def new_figure(rows: int, cols: int, figsize: Tuple[float, float], squeeze: bool = True) -> Tuple[Any, Any]:
    """A matplotlib figure and its ``rows`` x ``cols`` axes, drawn off-screen (no pyplot state, nothing to close)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=squeeze)


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> None:
    """Lay out ``fig`` and write it as a PNG, atomically."""
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=dpi, format='png'))


def plot_curves(path: str | Path, history: List[Dict[str, Any]], main_metric: str) -> None:
    """Two panels: the losses, and the main metric (and any ``ema_`` twin) per epoch."""
    epochs = [row['epoch'] for row in history]
    fig, (ax_loss, ax_metric) = new_figure(1, 2, figsize=(10, 4))
    for key in sorted({k for row in history for k in row if 'loss' in k}):
        ax_loss.plot(epochs, [row.get(key, math.nan) for row in history], marker='o', label=key)
    ax_loss.set_xlabel('epoch')
    ax_loss.set_title('loss')
    for key in (f'val_{main_metric}', f'val_ema_{main_metric}'):
        if any(key in row for row in history):
            ax_metric.plot(epochs, [row.get(key, math.nan) for row in history], marker='o', label=key)
    ax_metric.set_xlabel('epoch')
    ax_metric.set_title(main_metric)
    for ax in (ax_loss, ax_metric):
        if ax.get_legend_handles_labels()[0]:  # nothing plotted yet (no eval so far): no empty legend
            ax.legend()
    save_figure(fig, path, dpi=100)


class RunLogger:
    """Per-epoch records in ``output``: ``metrics.csv``, ``tb/`` (TensorBoard) and ``curves.png``.

    ``history`` (from a resumed checkpoint) is kept, so the CSV and the curves cover the whole run.
    A logger with ``enabled=False`` (ranks other than 0) does nothing.
    """

    def __init__(
        self,
        output: Path,
        main_metric: str,
        enabled: bool = True,
        history: Optional[List[Dict[str, Any]]] = None,
        tensorboard: bool = True,
    ):
        self.output, self.main_metric, self.enabled = Path(output), main_metric, enabled
        self.history: List[Dict[str, Any]] = list(history or [])
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.output / 'tb'), purge_step=len(self.history) + 1)
            except ImportError:  # tensorboard is optional
                self.tb = None

    def log_epoch(self, row: Dict[str, Any]) -> None:
        self.history.append(row)
        if not self.enabled:
            return
        write_csv(self.output / 'metrics.csv', self.history)
        if self.tb is not None:
            for key, value in row.items():
                if key != 'epoch' and isinstance(value, (int, float)):
                    self.tb.add_scalar(key.replace('_', '/', 1), value, row['epoch'])
            self.tb.flush()
        plot_curves(self.output / 'curves.png', self.history, self.main_metric)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
