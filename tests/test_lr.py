"""Poly learning-rate schedule: values against the mmsegmentation formula, edges, bad input."""
import numpy as np
import pytest

import jittor as jt

from utils.lr import PolyLR, poly_lr


def reference_poly(base, t, total, power, min_lr):
    # mmsegmentation PolyLrUpdaterHook.get_lr, written out independently.
    coeff = (1 - t / total) ** power
    return (base - min_lr) * coeff + min_lr


@pytest.mark.parametrize("power,min_lr", [(0.9, 1e-4), (0.9, 0.0), (1.0, 0.0), (2.0, 1e-3)])
def test_matches_reference_formula(power, min_lr):
    total = 1000
    for t in (0, 1, 17, 500, 999, 1000):
        assert poly_lr(0.01, t, total, power, min_lr) == pytest.approx(
            reference_poly(0.01, t, total, power, min_lr), rel=1e-12, abs=1e-15)


def test_edges_and_monotonic():
    total = 80000
    values = np.array([poly_lr(0.01, t, total, 0.9, 1e-4) for t in range(0, total + 1, 97)])
    assert values[0] == pytest.approx(0.01)
    assert poly_lr(0.01, total, total, 0.9, 1e-4) == pytest.approx(1e-4)
    assert np.all(np.diff(values) < 0)
    assert values.min() >= 1e-4
    # Half-way point of the ADE20K recipe, computed by hand: (0.01-1e-4)*0.5**0.9 + 1e-4.
    assert poly_lr(0.01, 40000, total, 0.9, 1e-4) == pytest.approx(0.0099 * 0.5 ** 0.9 + 1e-4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(base_lr=0.01, iteration=-1, max_iters=10), "iteration"),
    (dict(base_lr=0.01, iteration=11, max_iters=10), "iteration"),
    (dict(base_lr=0.01, iteration=0, max_iters=0), "max_iters"),
    (dict(base_lr=0.01, iteration=0, max_iters=10, min_lr=0.1), "min_lr"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        poly_lr(**kwargs)


def test_scheduler_sets_every_group_with_multipliers():
    a, b = jt.zeros(3), jt.zeros(2)
    optimizer = jt.optim.SGD([{"params": [a]}, {"params": [b], "lr_mult": 10.0}], lr=0.5, momentum=0.9)
    scheduler = PolyLR(optimizer, 0.01, 100, power=0.9, min_lr=1e-4)
    lr = scheduler.step(30)
    assert lr == pytest.approx(reference_poly(0.01, 30, 100, 0.9, 1e-4))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(10 * lr)
    # The rate really drives the update: one SGD step with gradient 1 moves by exactly lr.
    x = jt.array(np.ones(4, dtype=np.float32))
    opt = jt.optim.SGD([x], lr=123.0, momentum=0.0)
    PolyLR(opt, 0.01, 100, power=0.9).step(50)
    opt.step(x.sum())
    np.testing.assert_allclose(x.numpy(), 1 - reference_poly(0.01, 50, 100, 0.9, 0.0), rtol=1e-6)
    with pytest.raises(ValueError, match="min_lr"):
        PolyLR(optimizer, 0.01, 100, min_lr=0.5)
