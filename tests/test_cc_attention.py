"""Criss-cross attention ops and module.

The fused CPU kernels, the elementwise kernels (the per-element arithmetic the CUDA kernels run)
and the plain-Jittor reference are checked against each other, against an explicit numpy reading
of the layout and against finite differences in float64.
"""
import numpy as np
import pytest

import jittor as jt

from cca_testing import finite_difference_check, keep_float64, random_var, rel_err  # noqa: F401 (autouse fixture)
from models import cc_attention as cca
from models.cc_attention import CrissCrossAttention, ca_map, ca_weight, criss_cross_attention

KERNEL_IMPLS = ("fused", "elementwise")
# (B, C, H, W): H != W, H = 1, W = 1, a single position, B > 1 with odd C and a wide row
SHAPES = [(2, 5, 4, 7), (1, 3, 1, 6), (1, 3, 5, 1), (1, 2, 1, 1), (3, 17, 9, 6)]


# ------------------------------------------------------------------------------------------------
# Layout: an explicit numpy reading of the layout (models/cc_attention.py docstring)
# ------------------------------------------------------------------------------------------------

def _path(y, x, h, w):
    """Positions of the criss-cross path of (y, x), in channel order."""
    return [(y, i) for i in range(w)] + [(j if j < y else j + 1, x) for j in range(h - 1)]


def numpy_ca_weight(q, k):
    b, _, h, w = q.shape
    energy = np.zeros((b, h + w - 1, h, w))
    for y in range(h):
        for x in range(w):
            for i, (py, px) in enumerate(_path(y, x, h, w)):
                energy[:, i, y, x] = (q[:, :, y, x] * k[:, :, py, px]).sum(1)
    return energy


def numpy_ca_map(a, v):
    out = np.zeros(v.shape)
    h, w = v.shape[2:]
    for y in range(h):
        for x in range(w):
            for i, (py, px) in enumerate(_path(y, x, h, w)):
                out[:, :, y, x] += a[:, i, y, x][:, None] * v[:, :, py, px]
    return out


@pytest.mark.parametrize("impl", cca.IMPLS)
def test_layout_matches_numpy(impl):
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((2, 6, 4, 5))
    energy = ca_weight(jt.array(q), jt.array(k), impl=impl)
    assert energy.shape == [2, 4 + 5 - 1, 4, 5]
    np.testing.assert_allclose(energy.numpy(), numpy_ca_weight(q, k), rtol=1e-12, atol=1e-12)
    a = rng.standard_normal((2, 8, 4, 5))
    np.testing.assert_allclose(ca_map(jt.array(a), jt.array(v), impl=impl).numpy(), numpy_ca_map(a, v),
                               rtol=1e-12, atol=1e-12)


def test_layout_by_hand():
    """One position spelled out: row entries first (self included), then the column without self."""
    h, w = 3, 4
    key = np.arange(h * w, dtype=np.float64).reshape(1, 1, h, w)          # key value = flat index
    query = np.ones((1, 1, h, w))
    energy = ca_weight(jt.array(query), jt.array(key)).numpy()[0, :, 1, 2]   # position (y=1, x=2)
    np.testing.assert_array_equal(energy, [4, 5, 6, 7, 2, 10])   # row 1: (1,0..3); column 2: (0,2), (2,2)


# ------------------------------------------------------------------------------------------------
# Implementations agree (forward and gradients of both ops)
# ------------------------------------------------------------------------------------------------

def _op_outputs(impl, q, k, v, g):
    """Attention output and the gradients of sum(out * g) with respect to q, k, v."""
    energy = ca_weight(q, k, impl=impl)
    out = ca_map(jt.nn.softmax(energy, dim=1), v, impl=impl)
    grads = jt.grad((out * g).sum(), [q, k, v])
    return [energy.numpy(), out.numpy()] + [gr.numpy() for gr in grads]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_reference(shape, dtype):
    b, c, h, w = shape
    rng = np.random.default_rng(1)
    q, k = random_var(rng, (b, c, h, w), dtype), random_var(rng, (b, c, h, w), dtype)
    v, g = random_var(rng, (b, c + 3, h, w), dtype), random_var(rng, (b, c + 3, h, w), dtype)
    expected = _op_outputs("reference", q, k, v, g)
    # float32 targets: 1e-5 forward, 1e-4 gradients (relative to the magnitude)
    tolerances = [1e-5, 1e-5, 1e-4, 1e-4, 1e-4] if dtype == "float32" else [1e-12] * 5
    for impl in KERNEL_IMPLS:
        for name, actual, wanted, tol in zip(["energy", "out", "dq", "dk", "dv"],
                                             _op_outputs(impl, q, k, v, g), expected, tolerances):
            assert actual.dtype == np.dtype(dtype)
            assert rel_err(actual, wanted) <= tol, (impl, name, rel_err(actual, wanted))


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_op_gradients_finite_differences(impl):
    rng = np.random.default_rng(2)
    q, k = random_var(rng, (2, 3, 3, 4)), random_var(rng, (2, 3, 3, 4))
    finite_difference_check(lambda q_, k_: ca_weight(q_, k_, impl=impl), [q, k], rng)
    a, v = random_var(rng, (2, 6, 3, 4)), random_var(rng, (2, 5, 3, 4))
    finite_difference_check(lambda a_, v_: ca_map(a_, v_, impl=impl), [a, v], rng)


# ------------------------------------------------------------------------------------------------
# The module
# ------------------------------------------------------------------------------------------------

def _module(channels, impl, gamma=0.7, seed=0, dtype="float64"):
    jt.set_global_seed(seed)
    module = CrissCrossAttention(channels, impl=impl)
    for p in module.parameters():
        p.assign(p.astype(dtype))
    module.gamma.assign(jt.array(np.array([gamma], dtype=dtype)))
    return module


def test_module_contract():
    module = CrissCrossAttention(16)
    assert module.gamma.shape == [1] and float(module.gamma.numpy()[0]) == 0.0
    assert module.query_conv.weight.shape == [2, 16, 1, 1] and module.key_conv.weight.shape == [2, 16, 1, 1]
    assert module.value_conv.weight.shape == [16, 16, 1, 1]
    assert {"query_conv.bias", "key_conv.bias", "value_conv.bias", "gamma"} <= set(module.state_dict())
    x = jt.array(np.random.default_rng(3).standard_normal((2, 16, 5, 3)))
    np.testing.assert_array_equal(module(x).numpy(), x.numpy())      # gamma = 0: identity


def test_gamma_init_sets_the_starting_residual_scale():
    x = jt.array(np.random.default_rng(4).standard_normal((1, 16, 4, 6)).astype("float32"))
    jt.set_global_seed(1)
    started = CrissCrossAttention(16, gamma_init=0.5)
    jt.sync(started.parameters())          # weights are drawn lazily: draw them before reseeding
    jt.set_global_seed(1)
    assigned = CrissCrossAttention(16)
    assigned.gamma.assign(jt.array([0.5]).float32())
    assert started.gamma.dtype == "float32" and started.gamma.shape == [1]
    np.testing.assert_array_equal(started(x).numpy(), assigned(x).numpy())
    assert not np.allclose(started(x).numpy(), x.numpy())


def _module_grads(module, x, g):
    params = [module.query_conv.weight, module.query_conv.bias, module.key_conv.weight, module.key_conv.bias,
              module.value_conv.weight, module.value_conv.bias, module.gamma]
    out = module(module(x))                                          # R = 2, shared weights
    grads = jt.grad((out * g).sum(), [x] + params)
    return out.numpy(), [gr.numpy() for gr in grads]


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_module_matches_reference_and_finite_differences(impl):
    rng = np.random.default_rng(4)
    x, g = random_var(rng, (2, 16, 5, 3)), random_var(rng, (2, 16, 5, 3))
    out, grads = _module_grads(_module(16, impl), x, g)
    ref_out, ref_grads = _module_grads(_module(16, "reference"), x, g)
    assert rel_err(out, ref_out) <= 1e-12
    for grad, ref in zip(grads, ref_grads):
        assert rel_err(grad, ref, floor=1.0) <= 1e-10
    # finite differences on x, every parameter and gamma
    module = _module(16, impl)
    inputs = [x] + [module.query_conv.weight, module.query_conv.bias, module.key_conv.weight,
                    module.key_conv.bias, module.value_conv.weight, module.value_conv.bias, module.gamma]
    finite_difference_check(lambda x_, *params: module(module(x_)), inputs, rng, coords=3)


@pytest.mark.parametrize("batch", [2, 1])
def test_module_float32_agreement_targets(batch):
    """float32 targets: fused vs reference <= 1e-5 forward, <= 1e-4 gradients (in float32 the CPU
    projections run as one matrix product per image)."""
    rng = np.random.default_rng(5)
    x, g = random_var(rng, (batch, 32, 13, 11), "float32"), random_var(rng, (batch, 32, 13, 11), "float32")
    out, grads = _module_grads(_module(32, "fused", dtype="float32"), x, g)
    ref_out, ref_grads = _module_grads(_module(32, "reference", dtype="float32"), x, g)
    assert rel_err(out, ref_out) <= 1e-5
    for grad, ref in zip(grads, ref_grads):
        assert rel_err(grad, ref, floor=1.0) <= 1e-4


@pytest.mark.parametrize("impl", cca.IMPLS)
def test_keep_attention(impl):
    rng = np.random.default_rng(6)
    module = _module(16, impl)
    x = random_var(rng, (2, 16, 4, 6))
    assert module.last_attention is None
    module.keep_attention = True
    module(x)
    attention = module.last_attention.numpy()
    assert attention.shape == (2, 4 + 6 - 1, 4, 6)
    np.testing.assert_allclose(attention.sum(1), 1.0, rtol=1e-12)
    q, k = module.query_conv(x).numpy(), module.key_conv(x).numpy()
    energy = numpy_ca_weight(q, k)
    expected = np.exp(energy - energy.max(1, keepdims=True))
    np.testing.assert_allclose(attention, expected / expected.sum(1, keepdims=True), rtol=1e-10, atol=1e-14)


def test_default_impl_switch():
    assert cca._resolve_impl(None) == "fused"
    cca.set_default_impl("reference")
    try:
        assert cca._resolve_impl(None) == "reference"
    finally:
        cca.set_default_impl("fused")
    with pytest.raises(ValueError, match="unknown criss-cross attention impl 'magic'"):
        cca.set_default_impl("magic")
    with pytest.raises(ValueError, match="valid: fused, elementwise, reference"):
        CrissCrossAttention(16, impl="cuda")


# ------------------------------------------------------------------------------------------------
# Bad input: ValueErrors naming the shapes, never a compiler error
# ------------------------------------------------------------------------------------------------

def _zeros(*shape, dtype="float32"):
    return jt.zeros(shape, dtype=dtype)


@pytest.mark.parametrize("call, message", [
    (lambda: ca_weight(_zeros(1, 2, 3), _zeros(1, 2, 3)), r"query must be 4-D \[B, C, H, W\], got shape \[1, 2, 3\]"),
    (lambda: ca_weight(_zeros(1, 2, 3, 4), _zeros(2, 2, 3, 4)), r"query \[1, 2, 3, 4\] and key \[2, 2, 3, 4\]"),
    (lambda: ca_weight(_zeros(1, 2, 3, 4), _zeros(1, 2, 3, 5)), r"same batch size and spatial size"),
    (lambda: ca_weight(_zeros(1, 2, 3, 4), _zeros(1, 3, 3, 4)), r"\[1, 2, 3, 4\] and key \[1, 3, 3, 4\] must have the same number of channels"),
    (lambda: ca_map(_zeros(1, 5, 3, 4), _zeros(1, 8, 3, 4)), r"attention \[1, 5, 3, 4\] must have 6 channels"),
    (lambda: ca_map(_zeros(1, 6, 3, 4), _zeros(1, 8, 4, 3)), r"attention \[1, 6, 3, 4\] and value \[1, 8, 4, 3\]"),
    (lambda: ca_map(_zeros(1, 6, 3, 4, 1), _zeros(1, 8, 3, 4)), r"attention must be 4-D"),
    (lambda: ca_weight(_zeros(1, 2, 3, 4), _zeros(1, 2, 3, 4, dtype="float64")), r"share one dtype"),
    (lambda: ca_weight(_zeros(1, 2, 3, 4, dtype="int32"), _zeros(1, 2, 3, 4, dtype="int32")), r"dtype int32 not supported"),
    (lambda: CrissCrossAttention(4), r"in_channels=4 gives no query/key channels"),
    (lambda: CrissCrossAttention(16)(_zeros(1, 8, 3, 3)), r"input must be \[B, C, H, W\] with C = 16, got shape \[1, 8, 3, 3\]"),
    (lambda: CrissCrossAttention(16)(_zeros(16, 3, 3)), r"got shape \[16, 3, 3\]"),
])
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_float16_needs_cuda():
    if jt.flags.use_cuda:
        pytest.skip("float16 is supported on CUDA")
    with pytest.raises(ValueError, match="float16 needs CUDA"):
        ca_weight(_zeros(1, 2, 3, 4, dtype="float16"), _zeros(1, 2, 3, 4, dtype="float16"))


# ------------------------------------------------------------------------------------------------
# Generated sources: the CUDA kernels run the arithmetic the CPU elementwise tests exercise
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["energy", "gather", "scatter"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_cuda_source_shares_arithmetic(kind, dtype):
    cpu_header, cpu_src, cuda_header, cuda_src = cca.generate_sources(kind, dtype, "elementwise")
    element_fn = cca._ELEMENT_FN[kind]
    acc = "double" if dtype == "float64" else "float"       # half accumulates in float
    assert cca._COMMON_SRC in cuda_header and cca._COMMON_SRC in cpu_header
    kind_id = cca._KIND_ID[kind]
    # both launch the same template instance, which calls the shared per-element function
    assert f"cca_elementwise_kernel<in0_type, {acc}, {kind_id}><<<" in cuda_src
    assert f"cca_cpu_elementwise<in0_type, {acc}, {kind_id}>(" in cpu_src
    for source in (cuda_header, cpu_header):
        assert f"if (KIND == {kind_id}) {element_fn}<T, Acc>(idx, a, b, out, C, TT, H, W);" in source \
            or f"else {element_fn}<T, Acc>(idx, a, b, out, C, TT, H, W);" in source
    assert "__global__" in cuda_header and "__global__" not in cpu_header
    # the fused CPU kernels use the same path helpers
    fused_header = cca.generate_sources(kind, dtype, "fused")[0]
    assert cca._COMMON_SRC in fused_header and "cca_line_channel(" in fused_header.replace(cca._COMMON_SRC, "")


# ------------------------------------------------------------------------------------------------
# CUDA (only with a GPU)
# ------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not (jt.has_cuda and jt.flags.use_cuda),
                                reason="no CUDA device: Jittor runs on CPU here (jt.has_cuda / use_cuda off)")


@needs_cuda
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float16", 2e-2)])
def test_cuda_kernels_match_reference(dtype, tol):
    rng = np.random.default_rng(7)
    shape = (2, 8, 9, 6)
    q, k = random_var(rng, shape, dtype), random_var(rng, shape, dtype)
    v, g = random_var(rng, (2, 12, 9, 6), dtype), random_var(rng, (2, 12, 9, 6), dtype)
    ref = _op_outputs("reference", *(t.float32() for t in (q, k, v, g)))
    for actual, expected in zip(_op_outputs("fused", q, k, v, g), ref):
        assert rel_err(actual, expected) <= tol


_CUDA_STUBS = r"""
#define __CUDACC__ 1
#define __global__
#define __host__
#define __device__
#define __forceinline__ inline
struct CcaStubDim { unsigned x; };
static CcaStubDim blockIdx, blockDim, threadIdx, gridDim;
"""


@pytest.mark.parametrize("kind", ["energy", "gather", "scatter"])
def test_cuda_source_compiles_as_cpp_with_stubs(kind, tmp_path):
    """No GPU here: at least check that the CUDA kernels and launch are valid C++ when CUDA's
    keywords are stubbed and the launch brackets dropped (catches typos before a GPU run does)."""
    import re
    import shutil
    import subprocess
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ not found")
    _, _, cuda_header, cuda_src = cca.generate_sources(kind, "float32")
    launch = re.sub(r"<<<.*?>>>", "", cuda_src)
    dims = "".join(f"const int in1_shape{i} = 2; const int out0_shape{i} = 2;\n" for i in range(5))
    body = (f"typedef float in0_type;\nvoid launch(const float* in0_p, const float* in1_p, float* out0_p) {{\n"
            f"{dims}{launch}}}\n")
    source = tmp_path / "cuda_check.cc"
    source.write_text(_CUDA_STUBS + cuda_header + body)
    result = subprocess.run([compiler, "-std=c++14", "-fsyntax-only", "-Wall", str(source)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# criss_cross_attention: the module's attention after its projections (on CPU one fused kernel
# each way, with the softmax and the residual inside)
# ------------------------------------------------------------------------------------------------

def _attention_outputs(impl, qkv, x, gamma, g):
    out, _ = criss_cross_attention(qkv, x, gamma, impl=impl)
    grads = jt.grad((out * g).sum(), [qkv, x, gamma])
    return [out.numpy()] + [gr.numpy() for gr in grads]


def _attention_inputs(rng, shape, inner, dtype, gamma=0.6):
    b, c = shape[:2]
    qkv = random_var(rng, (b, 2 * inner + c) + tuple(shape[2:]), dtype)
    x, g = random_var(rng, shape, dtype), random_var(rng, shape, dtype)
    return qkv, x, jt.array(np.array([gamma], dtype=dtype)), g


# odd sizes, H = 1, W = 1, one position, and sizes past the kernels' internal chunks (channels
# beyond one strip chunk and one row product chunk, rows longer than one row product chunk)
ATTENTION_SHAPES = [((2, 5, 4, 7), 2), ((1, 3, 1, 6), 1), ((1, 3, 5, 1), 3), ((1, 2, 1, 1), 1),
                    ((3, 17, 9, 6), 4), ((1, 130, 40, 7), 9), ((1, 9, 3, 130), 2)]


@pytest.mark.parametrize("shape, inner", ATTENTION_SHAPES)
def test_criss_cross_attention_matches_reference(shape, inner):
    rng = np.random.default_rng(8)
    inputs = _attention_inputs(rng, shape, inner, "float64")
    expected = _attention_outputs("reference", *inputs)
    for impl in KERNEL_IMPLS:
        for name, actual, wanted in zip(["out", "dqkv", "dx", "dgamma"], _attention_outputs(impl, *inputs), expected):
            assert rel_err(actual, wanted) <= 1e-12, (impl, name, rel_err(actual, wanted))


def test_criss_cross_attention_float32_targets():
    rng = np.random.default_rng(9)
    inputs = _attention_inputs(rng, (2, 40, 13, 11), 5, "float32")
    expected = _attention_outputs("reference", *inputs)
    for name, actual, wanted, tol in zip(["out", "dqkv", "dx", "dgamma"], _attention_outputs("fused", *inputs),
                                         expected, [1e-5, 1e-4, 1e-4, 1e-4]):
        assert actual.dtype == np.float32
        assert rel_err(actual, wanted) <= tol, (name, rel_err(actual, wanted))


def test_criss_cross_attention_finite_differences():
    rng = np.random.default_rng(10)
    qkv, x, gamma, _ = _attention_inputs(rng, (2, 4, 3, 5), 2, "float64")
    finite_difference_check(lambda q_, x_, g_: criss_cross_attention(q_, x_, g_)[0], [qkv, x, gamma], rng, coords=5)


def test_criss_cross_attention_gamma_zero():
    """gamma = 0: the output is x and Q, K get no gradient, but gamma does (the aggregation)."""
    rng = np.random.default_rng(11)
    qkv, x, gamma, g = _attention_inputs(rng, (1, 6, 5, 4), 2, "float64", gamma=0.0)
    out, dqkv, dx, dgamma = _attention_outputs("fused", qkv, x, gamma, g)
    np.testing.assert_array_equal(out, x.numpy())
    np.testing.assert_array_equal(dqkv[:, :4], 0.0)
    np.testing.assert_array_equal(dx, g.numpy())
    expected = _attention_outputs("reference", qkv, x, gamma, g)
    assert abs(dgamma[0]) > 0.1 and rel_err(dgamma, expected[3]) <= 1e-12
    assert rel_err(dqkv, expected[1]) <= 1e-12          # the V part: gamma * scatter = 0 too


def test_criss_cross_attention_returns_the_attention():
    rng = np.random.default_rng(12)
    qkv, x, gamma, _ = _attention_inputs(rng, (2, 8, 4, 6), 1, "float64")
    _, attention = criss_cross_attention(qkv, x, gamma, return_attention=True)
    energy = numpy_ca_weight(qkv.numpy()[:, :1], qkv.numpy()[:, 1:2])
    expected = np.exp(energy - energy.max(1, keepdims=True))
    np.testing.assert_allclose(attention.numpy(), expected / expected.sum(1, keepdims=True), rtol=1e-12, atol=1e-15)


def test_criss_cross_attention_unfused_paths_promote_a_mixed_residual():
    """Under mixed precision on CUDA the projections hand float16 Q, K, V while x stays float32; the
    unfused paths (the ones CUDA runs) then promote in the residual instead of refusing. Checked
    here with float32 projections and a float64 x against the all-float64 result."""
    rng = np.random.default_rng(14)
    qkv, x, gamma, _ = _attention_inputs(rng, (1, 6, 5, 4), 2, "float64")
    expected, _ = criss_cross_attention(qkv, x, gamma, impl="reference")
    for impl in ("elementwise", "reference"):
        out, _ = criss_cross_attention(qkv.float32(), x, gamma.float32(), impl=impl)
        assert str(out.dtype) == "float64"
        assert rel_err(out.numpy(), expected.numpy()) <= 1e-6, impl


def test_fused_module_is_deterministic():
    """Same inputs, same bits: the kernels' reductions do not depend on the thread schedule."""
    rng = np.random.default_rng(13)
    module = _module(32, "fused", dtype="float32")
    x, g = random_var(rng, (2, 32, 21, 17), "float32"), random_var(rng, (2, 32, 21, 17), "float32")
    first, second = _module_grads(module, x, g), _module_grads(module, x, g)
    np.testing.assert_array_equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("call, message", [
    (lambda: criss_cross_attention(_zeros(1, 12, 3, 4), _zeros(1, 8, 3), _zeros(1)), r"x must be \[B, C, H, W\]"),
    (lambda: criss_cross_attention(_zeros(1, 11, 3, 4), _zeros(1, 8, 3, 4), _zeros(1)), r"qkv \[1, 11, 3, 4\] must hold 2C' \+ C channels \(C = 8"),
    (lambda: criss_cross_attention(_zeros(1, 8, 3, 4), _zeros(1, 8, 3, 4), _zeros(1)), r"must hold 2C' \+ C channels"),
    (lambda: criss_cross_attention(_zeros(1, 12, 3, 5), _zeros(1, 8, 3, 4), _zeros(1)), r"with x's batch and spatial size"),
    (lambda: criss_cross_attention(_zeros(2, 12, 3, 4), _zeros(1, 8, 3, 4), _zeros(1)), r"with x's batch and spatial size"),
    (lambda: criss_cross_attention(_zeros(1, 12, 3, 4), _zeros(1, 8, 3, 4), _zeros(2)), r"gamma must have shape \[1\], got \[2\]"),
    (lambda: criss_cross_attention(_zeros(1, 12, 3, 4), _zeros(1, 8, 3, 4, dtype="float64"), _zeros(1)), r"share one dtype"),
    (lambda: criss_cross_attention(_zeros(1, 12, 0, 4), _zeros(1, 8, 0, 4), _zeros(1)), r"empty input"),
    (lambda: CrissCrossAttention(16)(_zeros(1, 16, 0, 3)), r"empty input, shape \[1, 16, 0, 3\]"),
])
def test_criss_cross_attention_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ------------------------------------------------------------------------------------------------
# Kernel source files
# ------------------------------------------------------------------------------------------------

def test_kernel_sources_are_read_from_the_package(tmp_path):
    """The headers live next to the op and are found from any working directory."""
    import os
    import subprocess
    import sys
    for name in ("cc_attention_common.h", "cc_attention_cuda.h", "cc_attention_cpu.h", "cc_attention_cpu_elementwise.h"):
        assert (cca.KERNEL_DIR / name).read_text() in cca.generate_sources("energy", "float32")[0] + \
            cca.generate_sources("energy", "float32")[2] + cca.generate_sources("energy", "float32", "elementwise")[0]
    root = str(cca.KERNEL_DIR.parent.parent)
    code = "import models.cc_attention as m; print(len(m.generate_sources('gather', 'float64')[0]))"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=root, CCNET_QUIET="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.strip().splitlines()[-1]) > 1000


@pytest.mark.parametrize("arch", ["-mavx2 -mfma", "-mavx512f -mavx512dq"])
def test_cpu_kernels_compile_for_both_vector_widths(arch, tmp_path):
    """The blocked CPU kernels pick 32- or 64-byte vectors from the compiler's target; this machine
    runs one width, so at least compile every entry point for both (float and double)."""
    import shutil
    import subprocess
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ not found")
    calls = "".join(
        f"template void cca_cpu_energy<{t}>({t}*, {t}*, {t}*, int, int, int, int, int);\n"
        f"template void cca_cpu_aggregate<{t}>({t}*, {t}*, {t}*, int, int, int, int, int, bool);\n"
        f"template void cca_cpu_attention_forward<{t}>({t}*, {t}*, {t}, {t}*, {t}*, int, int, int, int, int, int);\n"
        f"template void cca_cpu_attention_backward<{t}>({t}*, {t}*, {t}*, {t}, {t}*, double*, int, int, int, int, int, int);\n"
        for t in ("float", "double"))
    source = tmp_path / "cpu_kernels.cc"
    source.write_text(cca.generate_sources("energy", "float32")[0] + calls)
    result = subprocess.run([compiler, "-std=c++14", "-fopenmp", "-Ofast", *arch.split(), "-fsyntax-only", "-Wall",
                             "-Werror", str(source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
