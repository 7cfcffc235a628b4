"""Confusion matrix and mIoU / mAcc / aAcc (utils/metrics.py)."""
import math

import numpy as np
import pytest

from utils.metrics import ConfusionMatrix, summarize


def _pixels(pairs):
    """(label, pred) arrays from [(gt, pred, count), ...]."""
    label = np.concatenate([np.full(n, g) for g, _, n in pairs])
    pred = np.concatenate([np.full(n, p) for _, p, n in pairs])
    return pred, label


def test_known_confusion_matrix():
    # 4 classes. class 2: absent from GT and prediction -> NaN, left out of the means.
    # class 3: predicted once, never in GT -> IoU 0 (counts), Acc NaN.
    pred, label = _pixels([(0, 0, 3), (0, 1, 1), (1, 0, 2), (1, 1, 4), (1, 3, 1), (255, 2, 5), (255, 0, 2)])
    cm = ConfusionMatrix(4).update(pred.reshape(1, -1), label.reshape(1, -1))
    np.testing.assert_array_equal(cm.matrix, [[3, 1, 0, 0], [2, 4, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    s = cm.summary()
    assert s["IoU"][0] == pytest.approx(3 / 6) and s["IoU"][1] == pytest.approx(4 / 8)
    assert math.isnan(s["IoU"][2]) and s["IoU"][3] == 0.0
    assert s["mIoU"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert s["Acc"][0] == pytest.approx(3 / 4) and s["Acc"][1] == pytest.approx(4 / 7)
    assert math.isnan(s["Acc"][2]) and math.isnan(s["Acc"][3])
    assert s["mAcc"] == pytest.approx((3 / 4 + 4 / 7) / 2)
    assert s["aAcc"] == pytest.approx(7 / 11)
    assert s["num_pixels"] == 11          # the 7 ignored pixels are not counted


def _direct_metrics(preds, labels, num_classes, ignore_index=255):
    """Per-class IoU / Acc by counting pixels class by class (no confusion matrix)."""
    pred = np.concatenate([p.ravel() for p in preds])
    label = np.concatenate([g.ravel() for g in labels])
    valid = label != ignore_index
    ious, accs = [], []
    for c in range(num_classes):
        in_gt, in_pred = (label == c) & valid, (pred == c) & valid
        inter, union = np.sum(in_gt & in_pred), np.sum(in_gt | in_pred)
        ious.append(inter / union if union else np.nan)
        accs.append(inter / in_gt.sum() if in_gt.sum() else np.nan)
    a_acc = np.sum((pred == label) & valid) / valid.sum()
    return np.array(ious), np.array(accs), a_acc


def test_matches_direct_computation_on_random_data():
    rng = np.random.default_rng(0)
    num_classes = 7
    preds, labels = [], []
    cm = ConfusionMatrix(num_classes)
    for _ in range(5):                    # several images of different sizes, accumulated
        h, w = rng.integers(5, 40, size=2)
        label = rng.integers(0, num_classes - 1, size=(h, w))    # class 6 never in GT
        label[rng.random((h, w)) < 0.2] = 255
        pred = np.where(rng.random((h, w)) < 0.6, label, rng.integers(0, num_classes - 2, size=(h, w)))
        pred[pred == 255] = 0
        preds.append(pred)
        labels.append(label)
        cm.update(pred, label)
    ious, accs, a_acc = _direct_metrics(preds, labels, num_classes)
    s = cm.summary()
    np.testing.assert_allclose(s["IoU"], ious, equal_nan=True)
    np.testing.assert_allclose(s["Acc"], accs, equal_nan=True)
    assert math.isnan(s["IoU"][6]) and math.isnan(s["Acc"][6])
    assert s["mIoU"] == pytest.approx(np.nanmean(ious))
    assert s["mAcc"] == pytest.approx(np.nanmean(accs))
    assert s["aAcc"] == pytest.approx(a_acc)


def test_accepts_jittor_vars_and_merges():
    import jittor as jt
    rng = np.random.default_rng(1)
    pred, label = rng.integers(0, 3, (2, 6, 5)), rng.integers(0, 3, (2, 6, 5))
    a = ConfusionMatrix(3).update(jt.array(pred.astype(np.int32)), jt.array(label.astype(np.int32)))
    b = ConfusionMatrix(3).update(pred[0], label[0]).merge(ConfusionMatrix(3).update(pred[1], label[1]))
    np.testing.assert_array_equal(a.matrix, b.matrix)
    np.testing.assert_array_equal(a.synchronized(), a.matrix)     # not under MPI: unchanged
    assert a.matrix.sum() == pred.size


def test_bad_input_is_named():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"label values \[3, 7\]"):
        cm.update(np.zeros((2, 2), int), np.array([[0, 3], [7, 255]]))
    with pytest.raises(ValueError, match=r"prediction values \[-1\]"):
        cm.update(np.array([-1, 0]), np.array([0, 0]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 3), int), np.zeros((3, 2), int))
    assert cm.matrix.sum() == 0           # nothing half-added by the failed updates


def test_empty_matrix_gives_nan_not_crash():
    s = summarize(np.zeros((2, 2)))
    assert math.isnan(s["mIoU"]) and math.isnan(s["aAcc"])
