"""Space-time criss-cross attention: ca_weight_3d / ca_map_3d / CrissCrossAttention3D.

Layout for clips [B, C, T, H, W]: the path of (t, y, x) has T + H + W - 2 entries: W row entries
(t, y, i), H - 1 column entries (t, j if j < y else j + 1, x), T - 1 temporal entries
(j if j < t else j + 1, y, x). T = 1 is the 2D layout.
"""
import numpy as np
import pytest

import jittor as jt

from cca_testing import finite_difference_check, keep_float64, random_var, rel_err  # noqa: F401 (autouse fixture)
from models import cc_attention as cca
from models.cc_attention import CrissCrossAttention, CrissCrossAttention3D, ca_map_3d, ca_weight_3d, criss_cross_attention

KERNEL_IMPLS = ("fused", "elementwise")
SHAPES = [(1, 3, 1, 4, 5), (2, 5, 2, 3, 4), (1, 4, 5, 2, 3), (1, 2, 3, 1, 1)]   # T = 1, 2, 5; H != W


def _path(t, y, x, tt, h, w):
    return ([(t, y, i) for i in range(w)] + [(t, j if j < y else j + 1, x) for j in range(h - 1)]
            + [(j if j < t else j + 1, y, x) for j in range(tt - 1)])


def numpy_ca_weight_3d(q, k):
    b, _, tt, h, w = q.shape
    energy = np.zeros((b, tt + h + w - 2, tt, h, w))
    for t in range(tt):
        for y in range(h):
            for x in range(w):
                for i, (pt, py, px) in enumerate(_path(t, y, x, tt, h, w)):
                    energy[:, i, t, y, x] = (q[:, :, t, y, x] * k[:, :, pt, py, px]).sum(1)
    return energy


def numpy_ca_map_3d(a, v):
    out = np.zeros(v.shape)
    tt, h, w = v.shape[2:]
    for t in range(tt):
        for y in range(h):
            for x in range(w):
                for i, (pt, py, px) in enumerate(_path(t, y, x, tt, h, w)):
                    out[:, :, t, y, x] += a[:, i, t, y, x][:, None] * v[:, :, pt, py, px]
    return out


@pytest.mark.parametrize("impl", cca.IMPLS)
def test_layout_3d(impl):
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 3, 3, 4, 5)), rng.standard_normal((2, 3, 3, 4, 5))
    energy = ca_weight_3d(jt.array(q), jt.array(k), impl=impl)
    assert energy.shape == [2, 3 + 4 + 5 - 2, 3, 4, 5]
    np.testing.assert_allclose(energy.numpy(), numpy_ca_weight_3d(q, k), rtol=1e-12, atol=1e-12)
    a, v = rng.standard_normal((2, 10, 3, 4, 5)), rng.standard_normal((2, 6, 3, 4, 5))
    np.testing.assert_allclose(ca_map_3d(jt.array(a), jt.array(v), impl=impl).numpy(), numpy_ca_map_3d(a, v),
                               rtol=1e-12, atol=1e-12)


def test_layout_3d_by_hand():
    """Position (t=1, y=0, x=1) of a 3x2x2 clip: row, then column, then the other frames."""
    tt, h, w = 3, 2, 2
    key = np.arange(tt * h * w, dtype=np.float64).reshape(1, 1, tt, h, w)   # key = flat index t*4+y*2+x
    energy = ca_weight_3d(jt.array(np.ones((1, 1, tt, h, w))), jt.array(key)).numpy()[0, :, 1, 0, 1]
    np.testing.assert_array_equal(energy, [4, 5, 7, 1, 9])


def _op_outputs(impl, q, k, v, g):
    energy = ca_weight_3d(q, k, impl=impl)
    out = ca_map_3d(jt.nn.softmax(energy, dim=1), v, impl=impl)
    return [energy.numpy(), out.numpy()] + [gr.numpy() for gr in jt.grad((out * g).sum(), [q, k, v])]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_3d_match_reference(shape, dtype):
    rng = np.random.default_rng(1)
    b, c = shape[:2]
    q, k = random_var(rng, shape, dtype), random_var(rng, shape, dtype)
    v, g = random_var(rng, (b, c + 2) + shape[2:], dtype), random_var(rng, (b, c + 2) + shape[2:], dtype)
    expected = _op_outputs("reference", q, k, v, g)
    tolerances = [1e-5, 1e-5, 1e-4, 1e-4, 1e-4] if dtype == "float32" else [1e-12] * 5
    for impl in KERNEL_IMPLS:
        for name, actual, wanted, tol in zip(["energy", "out", "dq", "dk", "dv"],
                                             _op_outputs(impl, q, k, v, g), expected, tolerances):
            assert rel_err(actual, wanted) <= tol, (impl, name)


def test_op_3d_gradients_finite_differences():
    rng = np.random.default_rng(2)
    q, k = random_var(rng, (1, 3, 3, 2, 4)), random_var(rng, (1, 3, 3, 2, 4))
    finite_difference_check(lambda q_, k_: ca_weight_3d(q_, k_), [q, k], rng, coords=4)
    a, v = random_var(rng, (1, 7, 3, 2, 4)), random_var(rng, (1, 5, 3, 2, 4))
    finite_difference_check(lambda a_, v_: ca_map_3d(a_, v_), [a, v], rng, coords=4)


def _module_3d(channels, impl, gamma=0.6, seed=0):
    jt.set_global_seed(seed)
    module = CrissCrossAttention3D(channels, impl=impl)
    for p in module.parameters():
        p.assign(p.float64())
    module.gamma.assign(jt.array(np.array([gamma])))
    return module


def _params(module):
    return [module.query_conv.weight, module.query_conv.bias, module.key_conv.weight, module.key_conv.bias,
            module.value_conv.weight, module.value_conv.bias, module.gamma]


def test_module_3d_matches_reference_and_finite_differences():
    rng = np.random.default_rng(3)
    x, g = random_var(rng, (2, 16, 3, 4, 2)), random_var(rng, (2, 16, 3, 4, 2))
    results = {}
    for impl in ("fused", "reference"):
        module = _module_3d(16, impl)
        out = module(module(x))
        results[impl] = [out.numpy()] + [gr.numpy() for gr in jt.grad((out * g).sum(), [x] + _params(module))]
    for actual, expected in zip(results["fused"], results["reference"]):
        assert rel_err(actual, expected, floor=1.0) <= 1e-10
    module = _module_3d(16, "fused")
    finite_difference_check(lambda x_, *params: module(module(x_)), [x] + _params(module), rng, coords=2)


def test_module_3d_float32_targets():
    """float32 (the CPU projections as matrix products): fused vs reference <= 1e-5 / 1e-4."""
    rng = np.random.default_rng(8)
    x, g = random_var(rng, (2, 24, 3, 5, 6), "float32"), random_var(rng, (2, 24, 3, 5, 6), "float32")
    results = {}
    for impl in ("fused", "reference"):
        jt.set_global_seed(0)
        module = CrissCrossAttention3D(24, impl=impl, gamma_init=0.8)
        out = module(module(x))
        results[impl] = [out.numpy()] + [gr.numpy() for gr in jt.grad((out * g).sum(), [x] + _params(module))]
    assert rel_err(results["fused"][0], results["reference"][0]) <= 1e-5
    for actual, expected in zip(results["fused"][1:], results["reference"][1:]):
        assert rel_err(actual, expected, floor=1.0) <= 1e-4


def test_module_3d_contract_and_keep_attention():
    module = CrissCrossAttention3D(16)
    assert module.gamma.shape == [1] and float(module.gamma.numpy()[0]) == 0.0
    assert module.value_conv.weight.shape == [16, 16, 1, 1, 1]
    assert set(module.state_dict()) == set(CrissCrossAttention(16).state_dict())
    rng = np.random.default_rng(4)
    x = random_var(rng, (1, 16, 3, 4, 5))
    attentions = {}
    for impl in cca.IMPLS:
        module = _module_3d(16, impl)
        module.keep_attention = True
        module(x)
        attentions[impl] = module.last_attention.numpy()
    assert attentions["fused"].shape == (1, 3 + 4 + 5 - 2, 3, 4, 5)
    np.testing.assert_allclose(attentions["fused"].sum(1), 1.0, rtol=1e-12)
    for impl in ("elementwise", "reference"):
        np.testing.assert_allclose(attentions[impl], attentions["fused"], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("impl", cca.IMPLS)
def test_single_frame_equals_2d(impl):
    """T = 1: the 3D module computes exactly what the 2D module computes with the same weights."""
    rng = np.random.default_rng(5)
    x2d, g2d = random_var(rng, (2, 16, 5, 3)), random_var(rng, (2, 16, 5, 3))
    module3d = _module_3d(16, impl)
    jt.set_global_seed(0)
    module2d = CrissCrossAttention(16, impl=impl)
    for p2, p3 in zip(_params(module2d), _params(module3d)):
        p2.assign(p3.reshape(p2.shape))
    out2d = module2d(module2d(x2d))
    grads2d = jt.grad((out2d * g2d).sum(), [x2d] + _params(module2d))
    x3d, g3d = x2d.unsqueeze(2), g2d.unsqueeze(2)
    out3d = module3d(module3d(x3d))
    grads3d = jt.grad((out3d * g3d).sum(), [x3d] + _params(module3d))
    tol = 0 if impl != "reference" else 1e-12       # same kernels vs two matmul formulations
    np.testing.assert_allclose(out3d.numpy()[:, :, 0], out2d.numpy(), rtol=tol, atol=tol)
    for gr3, gr2 in zip(grads3d, grads2d):
        np.testing.assert_allclose(gr3.numpy().reshape(gr2.shape), gr2.numpy(), rtol=tol, atol=tol)


# T = 1, H = 1, W = 1, one position, and a clip with many temporal lines (several lane ranges)
ATTENTION_SHAPES_3D = [((1, 4, 1, 3, 5), 1), ((2, 5, 3, 1, 4), 2), ((1, 3, 4, 5, 1), 1), ((1, 2, 3, 1, 1), 1),
                       ((1, 20, 3, 9, 30), 3)]


@pytest.mark.parametrize("shape, inner", ATTENTION_SHAPES_3D)
def test_criss_cross_attention_3d_matches_reference(shape, inner):
    """The fused 3D kernels (and the elementwise ops) against the plain-Jittor formulation, float64."""
    rng = np.random.default_rng(6)
    b, c = shape[:2]
    qkv = random_var(rng, (b, 2 * inner + c) + shape[2:])
    x, g = random_var(rng, shape), random_var(rng, shape)
    gamma = jt.array(np.array([0.7]))
    results = {}
    for impl in ("reference",) + KERNEL_IMPLS:
        out, _ = criss_cross_attention(qkv, x, gamma, impl=impl)
        results[impl] = [out.numpy()] + [gr.numpy() for gr in jt.grad((out * g).sum(), [qkv, x, gamma])]
    for impl in KERNEL_IMPLS:
        for name, actual, expected in zip(["out", "dqkv", "dx", "dgamma"], results[impl], results["reference"]):
            assert rel_err(actual, expected) <= 1e-12, (impl, name, rel_err(actual, expected))


def test_criss_cross_attention_3d_finite_differences():
    rng = np.random.default_rng(7)
    qkv, x = random_var(rng, (1, 7, 3, 2, 4)), random_var(rng, (1, 3, 3, 2, 4))
    gamma = jt.array(np.array([0.4]))
    finite_difference_check(lambda q_, x_, g_: criss_cross_attention(q_, x_, g_)[0], [qkv, x, gamma], rng, coords=4)


def _zeros(*shape, dtype="float32"):
    return jt.zeros(shape, dtype=dtype)


@pytest.mark.parametrize("call, message", [
    (lambda: ca_weight_3d(_zeros(1, 2, 3, 4), _zeros(1, 2, 3, 4)), r"query must be 5-D \[B, C, T, H, W\], got shape \[1, 2, 3, 4\]"),
    (lambda: ca_weight_3d(_zeros(1, 2, 2, 3, 4), _zeros(1, 2, 3, 3, 4)), r"query \[1, 2, 2, 3, 4\] and key \[1, 2, 3, 3, 4\]"),
    (lambda: ca_map_3d(_zeros(1, 6, 2, 3, 4), _zeros(1, 8, 2, 3, 4)), r"attention \[1, 6, 2, 3, 4\] must have 7 channels"),
    (lambda: CrissCrossAttention3D(16)(_zeros(1, 16, 3, 3)), r"input must be \[B, C, T, H, W\] with C = 16, got shape \[1, 16, 3, 3\]"),
    (lambda: CrissCrossAttention3D(7), r"in_channels=7"),
])
def test_bad_input_3d(call, message):
    with pytest.raises(ValueError, match=message):
        call()
