"""Helpers shared by the 2D and 3D criss-cross attention tests (float64 mode, errors, gradcheck)."""
import numpy as np
import pytest

import jittor as jt


@pytest.fixture(autouse=True)
def keep_float64():
    """Jittor turns float64 numpy arrays into float32 by default; the tests need float64."""
    previous = jt.flags.auto_convert_64_to_32
    jt.flags.auto_convert_64_to_32 = 0
    yield
    jt.flags.auto_convert_64_to_32 = previous


def random_var(rng, shape, dtype="float64"):
    return jt.array(rng.standard_normal(shape).astype(dtype))


def rel_err(actual, expected, floor=1e-30):
    """Max error relative to the expected magnitude (floor: for gradients that are exactly zero
    in exact arithmetic, e.g. of the key bias, which shifts all energies of a position equally)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.abs(actual - expected).max() / max(np.abs(expected).max(), floor)


def finite_difference_check(fn, inputs, rng, coords=6, eps=1e-6):
    """Analytic gradient of sum(fn(*inputs) * g) vs central differences at random coordinates."""
    out = fn(*inputs)
    g = rng.standard_normal(out.shape)
    analytic = [gr.numpy() for gr in jt.grad((out * jt.array(g)).sum(), inputs)]
    for var, grad in zip(inputs, analytic):
        base = var.numpy().copy()
        for flat in rng.choice(base.size, size=min(coords, base.size), replace=False):
            losses = []
            for step in (eps, -eps):
                probe = base.copy()
                probe.flat[flat] += step
                var.assign(jt.array(probe))
                losses.append((fn(*inputs).numpy() * g).sum())
            var.assign(jt.array(base))
            numeric = (losses[0] - losses[1]) / (2 * eps)
            assert abs(grad.flat[flat] - numeric) <= 1e-6 * max(1.0, abs(numeric)), (flat, grad.flat[flat], numeric)
