"""Losses: cross-entropy on hand-computable cases, aux weight, OHEM pixel selection, category
consistent loss against a direct NumPy evaluation (values and float64 finite differences),
label validation."""
import math

import numpy as np
import pytest

import jittor as jt

from models.losses import SegLoss, category_consistent_terms, ohem_keep_mask


def as_float32_exact(array):
    """float64 values that float32 holds exactly (jt.array rounds float64 input to float32)."""
    return array.astype(np.float32).astype(np.float64)


def two_class_logits(p_true, label):
    """[1, 2, 1, N] logits whose softmax gives probability p_true to the labelled class."""
    p_true, label = np.asarray(p_true, np.float64), np.asarray(label)
    margin = np.log(p_true / (1 - p_true))                 # logit(true) - logit(other)
    logits = np.zeros((1, 2, 1, len(p_true)))
    logits[0, label.clip(0, 1), 0, np.arange(len(p_true))] = margin
    return jt.array(logits.astype(np.float32)), label.reshape(1, 1, -1)


# ---------------------------------------------------------------------------------------------
# Cross-entropy, aux weight, upsampling
# ---------------------------------------------------------------------------------------------
def test_cross_entropy_by_hand():
    # pixel 0: p = (0.25, 0.75), label 1; pixel 1: same logits, label 0; pixel 2 ignored.
    logits = np.zeros((1, 2, 1, 3), np.float32)
    logits[0, 1, 0, :] = math.log(3.0)
    label = np.array([[[1, 0, 255]]])
    total, terms = SegLoss(2)(jt.array(logits), label)
    expected = (-math.log(0.75) - math.log(0.25)) / 2
    assert terms["main"] == pytest.approx(expected, rel=1e-6)
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert set(terms) == {"main", "loss"}


@pytest.mark.parametrize("aux_weight", [0.4, 1.0])
def test_aux_weight(aux_weight):
    logits = np.zeros((2, 4, 3, 3), np.float32)
    logits[:, 2] = 2.0                                       # p(class 2) = e^2 / (e^2 + 3)
    label = np.full((2, 3, 3), 2)
    label[1, 0, 0] = 255
    aux = jt.zeros((2, 4, 3, 3))                             # uniform: CE = ln 4 exactly
    total, terms = SegLoss(4, aux_weight=aux_weight)([jt.array(logits), aux], label)
    main = -math.log(math.exp(2) / (math.exp(2) + 3))
    assert terms["main"] == pytest.approx(main, rel=1e-6)
    assert terms["aux"] == pytest.approx(math.log(4), rel=1e-6)
    assert terms["loss"] == pytest.approx(main + aux_weight * math.log(4), rel=1e-6)
    assert total.item() == pytest.approx(terms["loss"], rel=1e-6)


def test_logits_are_upsampled_to_the_label():
    # Constant-per-class logits stay constant under bilinear upsampling, so the loss is known.
    logits = np.zeros((1, 3, 2, 3), np.float32)
    logits[0, 0] = 1.0
    label = np.zeros((1, 16, 24), np.int64)
    label[0, :8] = 1
    _, terms = SegLoss(3)(jt.array(logits), label)
    z = math.exp(1) + 2
    assert terms["main"] == pytest.approx((-math.log(math.exp(1) / z) - math.log(1 / z)) / 2, rel=1e-5)


def test_all_pixels_ignored_gives_zero_not_nan():
    x = jt.randn(1, 3, 4, 4)
    x.requires_grad = True
    total, terms = SegLoss(3)([x, x], np.full((1, 4, 4), 255))
    assert terms["loss"] == 0.0
    assert np.isfinite(jt.grad(total, x).numpy()).all()


def test_cross_entropy_gradient_matches_finite_differences_float64():
    rng = np.random.RandomState(0)
    logits = as_float32_exact(rng.randn(1, 3, 2, 3))
    label = rng.randint(0, 3, (1, 2, 3))
    label[0, 0, 0] = 255

    def numpy_ce(z):
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        valid = label != 255
        picked = np.take_along_axis(logp, np.where(valid, label, 0)[:, None], 1)[:, 0]
        return -(picked * valid).sum() / valid.sum()

    x = jt.array(logits).float64()
    total, terms = SegLoss(3)(x, label)
    assert terms["main"] == pytest.approx(numpy_ce(logits), rel=1e-10)
    grad = jt.grad(total, x).numpy()
    numeric = np.zeros_like(logits)
    for idx in np.ndindex(logits.shape):
        step = np.zeros_like(logits)
        step[idx] = 1e-6
        numeric[idx] = (numpy_ce(logits + step) - numpy_ce(logits - step)) / 2e-6
    np.testing.assert_allclose(grad, numeric, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# OHEM
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("probs,valid,min_kept,expected", [
    # enough pixels under 0.7: the threshold stays at 0.7
    ([0.1, 0.5, 0.8, 0.9, 0.65], [1, 1, 1, 1, 1], 2, [1, 1, 0, 0, 1]),
    # too few: the threshold rises to the 4th smallest probability (0.8)
    ([0.1, 0.5, 0.8, 0.9, 0.65], [1, 1, 1, 1, 1], 4, [1, 1, 1, 0, 1]),
    # ignored pixels neither count nor get kept (3rd smallest valid: 0.8)
    ([0.1, 0.5, 0.8, 0.9, 0.65], [0, 1, 1, 1, 1], 3, [0, 1, 1, 0, 1]),
    # min_kept >= number of valid pixels: keep every valid pixel
    ([0.1, 0.5, 0.8, 0.9, 0.95], [1, 1, 1, 1, 0], 4, [1, 1, 1, 1, 0]),
    # ties at the raised threshold are all kept
    ([0.8, 0.8, 0.8, 0.9, 0.95], [1, 1, 1, 1, 1], 1, [1, 1, 1, 0, 0]),
    # min_kept 0: the plain threshold, even if nothing is kept
    ([0.8, 0.9], [1, 1], 0, [0, 0]),
])
def test_ohem_keeps_exactly_the_right_pixels(probs, valid, min_kept, expected):
    keep = ohem_keep_mask(np.array(probs), np.array(valid, bool), threshold=0.7, min_kept=min_kept)
    assert keep.tolist() == [bool(e) for e in expected]


def test_ohem_in_segloss_only_changes_the_main_branch():
    p_true = [0.2, 0.6, 0.69, 0.75, 0.9, 0.95, 0.3, 0.99]
    labels = [0, 1, 0, 1, 1, 0, 255, 0]
    logits, label = two_class_logits([p if l != 255 else 0.5 for p, l in zip(p_true, labels)], labels)
    loss = SegLoss(2, ohem=True, ohem_thresh=0.7, ohem_min_kept=4)
    _, terms = loss([logits, logits], label)
    # valid probabilities 0.2 0.6 0.69 0.75 0.9 0.95 0.99: three <= 0.7 < min_kept 4, so the
    # threshold becomes the 4th smallest, 0.75; kept: 0.2 0.6 0.69 0.75.
    assert terms["main"] == pytest.approx(-np.mean(np.log([0.2, 0.6, 0.69, 0.75])), rel=1e-5)
    assert terms["aux"] == pytest.approx(-np.mean(np.log([0.2, 0.6, 0.69, 0.75, 0.9, 0.95, 0.99])), rel=1e-5)
    _, plain = SegLoss(2, ohem=True, ohem_thresh=0.7, ohem_min_kept=2)([logits, logits], label)
    assert plain["main"] == pytest.approx(-np.mean(np.log([0.2, 0.6, 0.69])), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Category consistent loss
# ---------------------------------------------------------------------------------------------
def numpy_ccl(features, label, delta_v=0.5, delta_d=1.5, ignore=255):
    """The TPAMI formulas, evaluated literally with Python loops (label at feature size)."""
    per_image = []
    for f, lab in zip(features, label):
        classes = [c for c in np.unique(lab) if c != ignore]
        if not classes:
            continue
        means = {c: f[:, lab == c].mean(1) for c in classes}
        l_var = 0.0
        for c in classes:
            total = 0.0
            for h in f[:, lab == c].T:
                d = np.linalg.norm(means[c] - h)
                if d > delta_d:
                    total += d - delta_d + (delta_d - delta_v) ** 2
                elif d > delta_v:
                    total += (d - delta_v) ** 2
            l_var += total / (lab == c).sum()
        l_var /= len(classes)
        l_dis = 0.0
        if len(classes) > 1:
            for a in classes:
                for b in classes:
                    if a != b:
                        d = np.linalg.norm(means[a] - means[b])
                        l_dis += (2 * delta_d - d) ** 2 if d <= 2 * delta_d else 0.0
            l_dis /= len(classes) * (len(classes) - 1)
        l_reg = np.mean([np.linalg.norm(means[c]) for c in classes])
        per_image.append((l_var, l_dis, l_reg))
    return np.mean(per_image, axis=0) if per_image else np.zeros(3)


def ccl_case(seed=0):
    rng = np.random.RandomState(seed)
    label = rng.randint(0, 4, (3, 6, 7))
    label[0, :2] = 255
    label[1] = np.where(label[1] == 3, 255, 1)  # image 1: a single class (no distance term)
    label[2, 0, 0] = 2
    # class centres plus noise of three sizes, so pixel-to-mean distances fall in all three
    # branches of phi_var, and some class means lie closer than 2 delta_d, some farther
    centres = rng.randn(256, 4) * 1.5
    spread = rng.choice([0.05, 0.5, 2.0], size=(3, 1, 6, 7))
    features = centres[label].transpose(0, 3, 1, 2) + spread * rng.randn(3, 4, 6, 7)
    return as_float32_exact(features), label


@pytest.mark.parametrize("delta_v,delta_d", [(0.5, 1.5), (1.0, 2.5)])
def test_ccl_terms_match_numpy(delta_v, delta_d):
    features, label = ccl_case()
    ours = category_consistent_terms(jt.array(features).float64(), label, delta_v=delta_v, delta_d=delta_d)
    ref = numpy_ccl(features, label, delta_v, delta_d)
    np.testing.assert_allclose([t.item() for t in ours], ref, rtol=1e-9, atol=1e-9)
    # the case really exercises every branch of phi_var and phi_dis
    dists, gaps = [], []
    for f, lab in zip(features, label):
        classes = [c for c in np.unique(lab) if c != 255]
        means = {c: f[:, lab == c].mean(1) for c in classes}
        dists += [np.linalg.norm(f[:, lab == c] - means[c][:, None], axis=0) for c in classes]
        gaps += [np.linalg.norm(means[a] - means[b]) for a in classes for b in classes if a < b]
    dists = np.concatenate(dists)
    assert (dists <= delta_v).any() and ((dists > delta_v) & (dists <= delta_d)).any() and (dists > delta_d).any()
    gaps = np.array(gaps)
    assert (gaps < 2 * delta_d).any() and (gaps > 2 * delta_d).any()


def test_ccl_downsamples_the_label_and_skips_unlabelled_images():
    features, label = ccl_case(1)
    label[1] = 255                                            # no labelled pixel: not averaged in
    big = np.repeat(np.repeat(label, 2, axis=1), 2, axis=2)   # the label at twice the feature size
    ours = category_consistent_terms(jt.array(features).float64(), big)
    np.testing.assert_allclose([t.item() for t in ours], numpy_ccl(features, label), rtol=1e-9, atol=1e-9)


def test_ccl_gradient_matches_finite_differences_float64():
    features, label = ccl_case(2)
    features, label = features[:1, :, :3, :4], label[:1, :3, :4]
    weights = (1.0, 1.0, 0.3)

    def numpy_total(f):
        return float(np.dot(weights, numpy_ccl(f, label)))

    x = jt.array(features).float64()
    terms = category_consistent_terms(x, label)
    total = sum(w * t for w, t in zip(weights, terms))
    grad = jt.grad(total, x).numpy()
    numeric = np.zeros_like(features)
    for idx in np.ndindex(features.shape):
        step = np.zeros_like(features)
        step[idx] = 1e-6
        numeric[idx] = (numpy_total(features + step) - numpy_total(features - step)) / 2e-6
    np.testing.assert_allclose(grad, numeric, atol=1e-6)


def test_segloss_adds_weighted_ccl_terms():
    features, label = ccl_case()
    logits = jt.zeros((3, 4, 6, 7))
    loss = SegLoss(4, ccl_weights=(2.0, 0.5, 0.1), ccl_delta_v=0.4, ccl_delta_d=1.2)
    _, terms = loss([logits, logits, jt.array(features.astype(np.float32))], label)
    ref = numpy_ccl(features, label, 0.4, 1.2)
    np.testing.assert_allclose([terms["ccl_var"], terms["ccl_dis"], terms["ccl_reg"]], ref, rtol=1e-5)
    expected = math.log(4) * 1.4 + 2.0 * ref[0] + 0.5 * ref[1] + 0.1 * ref[2]
    assert terms["loss"] == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,named", [(7, "7"), (-1, "-1"), (254, "254")])
def test_bad_label_values_are_named(bad, named):
    label = np.zeros((1, 4, 4), np.int32)
    label[0, 1, 2] = bad
    label[0, 3, 3] = 255                                      # the ignore index itself is fine
    with pytest.raises(ValueError, match=rf"value\(s\) {named} outside \[0, 5\)"):
        SegLoss(5)(jt.zeros((1, 5, 4, 4)), label)


def test_bad_shapes_and_settings_raise():
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        SegLoss(5)(jt.zeros((1, 5, 4, 4)), np.zeros((4, 4), np.int32))
    with pytest.raises(ValueError, match=r"main logits must be \[1, 5, h, w\]"):
        SegLoss(5)(jt.zeros((1, 3, 4, 4)), np.zeros((1, 4, 4), np.int32))
    with pytest.raises(ValueError, match="ohem_thresh"):
        SegLoss(5, ohem=True, ohem_thresh=1.5)
    with pytest.raises(ValueError, match="ccl_delta"):
        SegLoss(5, ccl_delta_v=2.0, ccl_delta_d=1.0)
