"""Segmentation metrics: a confusion-matrix accumulator with mIoU / mAcc / aAcc.

Conventions (the same as mmsegmentation's ``total_area_to_metrics``):

* pixels whose ground truth is ``ignore_index`` (255) are not counted at all;
* IoU_c = TP / (TP + FP + FN), Acc_c = TP / (TP + FN) (per-class recall);
* a class with no pixel in the ground truth *and* none in the prediction has IoU = NaN and is
  left out of the mean (``nanmean``); a class predicted but absent from the ground truth has
  IoU = 0 and *does* count. Acc_c is NaN whenever the class is absent from the ground truth;
* aAcc = correctly labelled pixels / all counted pixels.

All numbers are fractions in [0, 1]. Under MPI (``mpirun -np N``), ``summary()`` first sums the
matrices of all ranks, so every rank must call it.
"""
from typing import Any

import numpy as np


class ConfusionMatrix:
    """Accumulates ``matrix[gt, pred]`` pixel counts over any number of images.

    ``update(pred, label)`` takes integer arrays (numpy or ``jt.Var``) of the same shape.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def reset(self) -> None:
        self.matrix[:] = 0

    def update(self, pred: np.ndarray, label: np.ndarray) -> "ConfusionMatrix":
        """Add one image (or a batch) to the matrix. Returns self."""
        pred, label = _as_numpy(pred), _as_numpy(label)
        if pred.shape != label.shape:
            raise ValueError(f"prediction shape {pred.shape} differs from label shape {label.shape}")
        pred = pred.astype(np.int64, copy=False).ravel()
        label = label.astype(np.int64, copy=False).ravel()
        keep = label != self.ignore_index if self.ignore_index is not None else np.ones_like(label, bool)
        pred, label = pred[keep], label[keep]
        n = self.num_classes
        for name, values in (("label", label), ("prediction", pred)):
            bad = (values < 0) | (values >= n)
            if bad.any():
                raise ValueError(
                    f"{name} values {sorted(set(np.unique(values[bad]).tolist()))[:10]} are outside "
                    f"[0, {n}) (ignore index {self.ignore_index}); wrong --num-classes or label encoding?")
        self.matrix += np.bincount(label * n + pred, minlength=n * n).reshape(n, n)
        return self

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another accumulator's counts (e.g. from a worker process)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class matrix into {self.num_classes}-class one")
        self.matrix += other.matrix
        return self

    def synchronized(self) -> np.ndarray:
        """The matrix summed over all MPI ranks (this rank's own matrix when not under MPI).

        Jittor's ``mpi_all_reduce`` maps int64 to ``MPI_DOUBLE_INT`` (a pair type), so the counts
        travel as float64, which is exact up to 2**53 pixels.
        """
        import jittor as jt
        if not jt.in_mpi:
            return self.matrix.copy()
        summed = jt.array(self.matrix.astype(np.float64)).mpi_all_reduce("add").numpy()
        return np.rint(summed).astype(np.int64)

    def summary(self, reduce: bool = True) -> dict[str, Any]:
        """dict(mIoU, mAcc, aAcc, IoU=[per class], Acc=[per class]); fractions, NaN for absent classes."""
        matrix = self.synchronized() if reduce else self.matrix
        return summarize(matrix)


def summarize(matrix: np.ndarray) -> dict[str, Any]:
    """Metrics of a ``[C, C]`` confusion matrix indexed ``[ground truth, prediction]``."""
    matrix = np.asarray(matrix, dtype=np.float64)
    true_positive = np.diag(matrix)
    gt_count = matrix.sum(axis=1)
    pred_count = matrix.sum(axis=0)
    union = gt_count + pred_count - true_positive
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
        acc = np.where(gt_count > 0, true_positive / gt_count, np.nan)
    total = matrix.sum()
    return dict(
        mIoU=_nanmean(iou),
        mAcc=_nanmean(acc),
        aAcc=float(true_positive.sum() / total) if total > 0 else float("nan"),
        IoU=[float(v) for v in iou],
        Acc=[float(v) for v in acc],
        num_pixels=int(total),
    )


def _nanmean(values):
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def _as_numpy(array):
    if hasattr(array, "numpy") and not isinstance(array, np.ndarray):
        array = array.numpy()
    return np.asarray(array)
