"""Training losses of CCNet: cross-entropy (ignore 255), OHEM, auxiliary weight, category
consistent loss.

``SegLoss(num_classes)(outputs, label) -> (total_loss_var, {name: float})`` where ``outputs`` is
what ``CCNet`` returns in training mode: ``[main_logits, aux_logits]`` and, when the model was
built with ``ccl_dim > 0``, the projected features as a third item.

* Logits are bilinearly upsampled to the label size before the loss (as the official
  CriterionDSN; it uses ``align_corners=True``, mmsegmentation and our eval path ``False``: option),
  inside one op that never stores the upsampled logits (models/upsampled_ce.py).
* OHEM (official ``OhemCrossEntropy2d``, main branch only): keep the valid pixels whose predicted
  probability of the true class is <= ``threshold``; if fewer than ``min_kept`` would remain, raise
  the threshold to the ``min_kept``-th smallest probability (so at least ``min_kept`` pixels, ties
  included); if ``min_kept`` >= the number of valid pixels, keep them all. The official code
  estimates that k-th value on a copy zoomed down 8x (min_kept / 64 of it) to save time; we
  compute it exactly.
* Category consistent loss (CCNet TPAMI, sec. "learning category consistent features"), per
  image on the features h_i at feature resolution (labels nearest-downsampled), with class
  means mu_c over the C classes present:
      l_var = 1/|C| sum_c 1/N_c sum_{i in c} phi_var(||mu_c - h_i||)
          phi_var(d) = d - delta_d + (delta_d - delta_v)^2   if d > delta_d
                       (d - delta_v)^2                        if delta_v < d <= delta_d
                       0                                      otherwise
      l_dis = 1/(|C|(|C|-1)) sum_{a != b} phi_dis(||mu_a - mu_b||),
          phi_dis(d) = (2 delta_d - d)^2 if d <= 2 delta_d else 0
      l_reg = 1/|C| sum_c ||mu_c||
  averaged over the images of the batch that have labelled pixels.
"""
import numpy as np

import jittor as jt

from .upsampled_ce import upsampled_nll

# A tiny floor inside square roots: ||x|| has no gradient at 0 (a one-pixel class sits exactly
# on its mean), and phi is flat there anyway, so the floor changes values by < 1e-6 at most.
NORM_EPS = 1e-12


def _to_numpy_label(label):
    array = label.numpy() if isinstance(label, jt.Var) else np.asarray(label)
    if array.ndim != 3:
        raise ValueError(f"label must have shape [B, H, W], got {list(array.shape)}")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise ValueError(f"label must hold integer class ids, got dtype {array.dtype} with fractions")
    return array.astype(np.int64)


def validate_labels(label: np.ndarray, num_classes: int, ignore_index: int = 255) -> None:
    """Raise ValueError naming the values outside [0, num_classes) other than ``ignore_index``.

    Jittor's cross-entropy silently treats such values as ignored (PyTorch raises), which would
    hide a wrong ``num_classes`` or an unconverted label encoding.
    """
    bad = ((label < 0) | (label >= num_classes)) & (label != ignore_index)
    if bad.any():
        values = np.unique(label[bad])
        shown = ", ".join(str(v) for v in values[:10]) + (" ..." if len(values) > 10 else "")
        raise ValueError(
            f"label holds {int(bad.sum())} pixel(s) with value(s) {shown} outside [0, {num_classes}) "
            f"and not the ignore index {ignore_index}; check num_classes and the label encoding")


def masked_cross_entropy(nll: jt.Var, keep: np.ndarray) -> jt.Var:
    """Mean of the per-pixel losses ``nll`` (jt.Var [B,H,W]) where ``keep`` (numpy bool) is true;
    0 if none."""
    count = int(keep.sum())
    return (nll * jt.array(keep.astype(np.float32)).cast(nll.dtype)).sum() / max(count, 1)


def ohem_keep_mask(prob_true: np.ndarray, valid: np.ndarray, threshold: float = 0.7,
                   min_kept: int = 100000) -> np.ndarray:
    """Pixels OHEM trains on (numpy bool, same shape as ``prob_true``); see module docstring."""
    num_valid = int(valid.sum())
    if num_valid == 0:
        return valid.copy()
    if min_kept >= num_valid:
        return valid.copy()
    cut = float(threshold)
    if min_kept > 0:
        kth = float(np.partition(prob_true[valid], min_kept - 1)[min_kept - 1])
        cut = max(cut, kth)
    return valid & (prob_true <= cut)


def _nearest_resize_label(label, size):
    """Nearest-neighbour resize of a [B,H,W] label (PyTorch's 'nearest' index rule)."""
    h, w = label.shape[1:]
    out_h, out_w = size
    rows = np.minimum((np.arange(out_h) * (h / out_h)).astype(np.int64), h - 1)
    cols = np.minimum((np.arange(out_w) * (w / out_w)).astype(np.int64), w - 1)
    return label[:, rows][:, :, cols]


def category_consistent_terms(features: jt.Var, label: np.ndarray, ignore_index: int = 255, delta_v: float = 0.5,
                              delta_d: float = 1.5) -> tuple[jt.Var, jt.Var, jt.Var]:
    """(l_var, l_dis, l_reg) as jt Vars for features [B, D, h, w] and a numpy label [B, H, W].

    Sums are written as broadcast products rather than matmuls: oneDNN's matmul is float32-only,
    and the gradient checks run in float64 (the tensors here are small: K classes x D x h*w).
    """
    label = _nearest_resize_label(label, features.shape[2:])
    b, d = features.shape[:2]
    dtype = str(features.dtype)
    terms, images = [jt.zeros([1], dtype), jt.zeros([1], dtype), jt.zeros([1], dtype)], 0
    for i in range(b):
        flat = label[i].reshape(-1)
        classes = np.unique(flat[flat != ignore_index])
        k = len(classes)
        if k == 0:
            continue
        images += 1
        onehot_np = flat[None, :] == classes[:, None]                               # [K, N]
        onehot = jt.array(onehot_np.astype(np.float32)).cast(dtype)
        counts = jt.array(onehot_np.sum(1).astype(np.float32)).cast(dtype)          # N_c
        h = features[i].reshape(d, -1)                                              # [D, N]
        means = (onehot.unsqueeze(1) * h.unsqueeze(0)).sum(2) / counts.unsqueeze(1)  # [K, D]
        own_mean = (onehot.unsqueeze(1) * means.unsqueeze(2)).sum(0)                # [D, N]
        dist = ((h - own_mean).sqr().sum(0) + NORM_EPS).sqrt()                      # [N]
        phi_var = jt.ternary(dist > delta_d, dist - delta_d + (delta_d - delta_v) ** 2,
                             jt.ternary(dist > delta_v, (dist - delta_v).sqr(), jt.zeros_like(dist)))
        terms[0] += ((onehot * phi_var.unsqueeze(0)).sum(1) / counts).mean()
        if k > 1:
            first, second = np.triu_indices(k, 1)
            pairs = np.zeros((len(first), k), np.float32)                           # mu_a - mu_b
            pairs[np.arange(len(first)), first] = 1
            pairs[np.arange(len(first)), second] = -1
            pairs = jt.array(pairs).cast(dtype)
            gap = ((pairs.unsqueeze(2) * means.unsqueeze(0)).sum(1).sqr().sum(1) + NORM_EPS).sqrt()
            terms[1] += (2 * delta_d - gap).maximum(0).sqr().mean()
        terms[2] += (means.sqr().sum(1) + NORM_EPS).sqrt().mean()
    return tuple(t / max(images, 1) for t in terms)


class SegLoss:
    """Loss of a CCNet training step: ``loss(outputs, label) -> (total Var, {term: float})``.

    Terms: ``main`` (CE or OHEM-CE of the main logits), ``aux`` (CE of the auxiliary logits,
    weighted by ``aux_weight`` in the total), ``ccl_var`` / ``ccl_dis`` / ``ccl_reg`` (when the
    outputs carry CCL features; weighted by ``ccl_weights``), and ``loss`` (the total).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, aux_weight: float = 0.4, ohem: bool = False,
                 ohem_thresh: float = 0.7, ohem_min_kept: int = 100000,
                 ccl_weights: tuple[float, float, float] = (1.0, 1.0, 0.001), ccl_delta_v: float = 0.5,
                 ccl_delta_d: float = 1.5, align_corners: bool = False) -> None:
        if len(ccl_weights) != 3:
            raise ValueError(f"ccl_weights must be (var, dis, reg) weights, got {ccl_weights!r}")
        if not 0.0 <= ohem_thresh <= 1.0:
            raise ValueError(f"ohem_thresh must lie in [0, 1], got {ohem_thresh!r}")
        if not 0 < ccl_delta_v < ccl_delta_d:
            raise ValueError(f"need 0 < ccl_delta_v < ccl_delta_d, got {ccl_delta_v!r}, {ccl_delta_d!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.aux_weight = aux_weight
        self.ohem = ohem
        self.ohem_thresh = ohem_thresh
        self.ohem_min_kept = int(ohem_min_kept)
        self.ccl_weights = tuple(float(w) for w in ccl_weights)
        self.ccl_delta_v = ccl_delta_v
        self.ccl_delta_d = ccl_delta_d
        self.align_corners = align_corners

    def _main_keep(self, nll: jt.Var, valid: np.ndarray) -> np.ndarray:
        if not self.ohem:
            return valid
        return ohem_keep_mask(np.exp(-nll.numpy()), valid, self.ohem_thresh, self.ohem_min_kept)

    def __call__(self, outputs: jt.Var | list[jt.Var], label: jt.Var | np.ndarray) -> tuple[jt.Var, dict[str, float]]:
        if isinstance(outputs, jt.Var):
            outputs = [outputs]
        if not 1 <= len(outputs) <= 3:
            raise ValueError(f"expected [main, aux(, ccl_features)] outputs, got {len(outputs)} items")
        label = _to_numpy_label(label)
        validate_labels(label, self.num_classes, self.ignore_index)
        valid = label != self.ignore_index
        for name, out in zip(("main", "aux"), outputs[:2]):
            if out.ndim != 4 or out.shape[0] != label.shape[0] or out.shape[1] != self.num_classes:
                raise ValueError(f"{name} logits must be [{label.shape[0]}, {self.num_classes}, h, w] "
                                 f"for a label of shape {list(label.shape)}, got {list(out.shape)}")

        safe_label = np.where(valid, label, 0)
        main_nll = upsampled_nll(outputs[0], safe_label, self.align_corners)
        terms = {"main": masked_cross_entropy(main_nll, self._main_keep(main_nll, valid))}
        total = terms["main"]
        if len(outputs) > 1:
            aux_nll = upsampled_nll(outputs[1], safe_label, self.align_corners)
            terms["aux"] = masked_cross_entropy(aux_nll, valid)
            total = total + self.aux_weight * terms["aux"]
        if len(outputs) > 2:
            ccl = category_consistent_terms(outputs[2], label, self.ignore_index,
                                            self.ccl_delta_v, self.ccl_delta_d)
            for name, value, weight in zip(("ccl_var", "ccl_dis", "ccl_reg"), ccl, self.ccl_weights):
                terms[name] = value
                total = total + weight * value
        terms["loss"] = total
        jt.sync(list(terms.values()))        # one execution for all terms, not one per .item()
        floats = {name: float(value.item()) for name, value in terms.items()}
        return total, floats
