"""Training log: one JSON object per line (``log.jsonl``) and a ``curves.png`` drawn from it.

Each record has a ``type``: ``"config"`` (the run's settings), ``"train"`` (iteration, loss terms,
learning rate, step and data-wait seconds), ``"val"`` (iteration, mIoU, mAcc, aAcc, per-class
IoU) or ``"event"`` (resume, interrupt, NaN stop, ...). The log is plain text so that
``jq``/pandas read it; the picture is redrawn from the records at every evaluation.

Only one process writes (rank 0 under MPI): the others get a logger with ``enabled=False``
that keeps nothing and writes nothing.
"""
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from .outputs import atomic_write

LOG_NAME = "log.jsonl"
CURVES_NAME = "curves.png"


def _jsonable(value):
    """Values that strict JSON can carry: NaN (e.g. IoU of a class absent from the val set)
    becomes null, +-inf the strings "inf" / "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:     # numpy scalars
        return _jsonable(value.item())
    return value


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a JSON-lines log (a torn last line from a crash is skipped)."""
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class TrainLogger:
    """Appends records to ``<work_dir>/log.jsonl`` and draws ``<work_dir>/curves.png``."""

    def __init__(self, work_dir: str | os.PathLike, enabled: bool = True) -> None:
        self.work_dir = work_dir
        self.enabled = enabled
        self.path = os.path.join(work_dir, LOG_NAME)
        self.records = []
        if enabled:
            os.makedirs(work_dir, exist_ok=True)

    def start_fresh(self) -> None:
        """Begin a new log (an old one in the same work dir is replaced)."""
        self.records = []
        if self.enabled:
            open(self.path, "w").close()

    def resume(self, iteration: int) -> None:
        """Continue the log of a run resumed at ``iteration``: records from later iterations
        (written after the checkpoint, before a crash) are dropped so the log reads as one run."""
        if not self.enabled:
            return
        records = read_log(self.path) if os.path.exists(self.path) else []
        self.records = [r for r in records if r.get("iter", 0) <= iteration or r.get("type") == "config"]
        lines = "".join(json.dumps(record) + "\n" for record in self.records)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(lines))

    def log(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = _jsonable(dict(record))
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def plot(self, path: str | os.PathLike | None = None) -> str | os.PathLike | None:
        """Draw training loss and validation mIoU over iterations; returns the PNG path."""
        if not self.enabled:
            return None
        path = path or os.path.join(self.work_dir, CURVES_NAME)
        plot_curves(self.records, path)
        return path


def plot_curves(records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Two panels: loss (raw + moving average) and validation mIoU, against the iteration."""
    from .visualize import pyplot
    plt = pyplot()

    train = [r for r in records if r.get("type") == "train" and isinstance(r.get("loss"), (int, float))]
    val = [r for r in records if r.get("type") == "val"]
    fig, (ax_loss, ax_miou) = plt.subplots(1, 2, figsize=(10, 3.8))

    if train:
        its = [r["iter"] for r in train]
        losses = [r["loss"] for r in train]
        ax_loss.plot(its, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
        window = max(1, len(losses) // 25)
        if window > 1:
            smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                      for i in range(len(losses))]
            ax_loss.plot(its, smooth, color="tab:blue", linewidth=1.6, label=f"mean of {window}")
        ax_loss.legend(loc="upper right")
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(alpha=0.3)

    if val:
        ax_miou.plot([r["iter"] for r in val], [100 * r["mIoU"] for r in val], "o-", color="tab:green")
    ax_miou.set_xlabel("iteration")
    ax_miou.set_ylabel("val mIoU (%)")
    ax_miou.grid(alpha=0.3)

    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))   # never a half-written picture
    plt.close(fig)
