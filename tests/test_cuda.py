"""CUDA: the fused criss-cross attention kernels, BatchNormAct, the upsampled cross-entropy and
CCNet on a GPU.

Skipped with a reason without a CUDA device; with ``CCNET_REQUIRE_CUDA=1`` (benchmarks/gpu_check.sh)
a missing device fails instead. References run on the CPU in float64, so they share no code path
with the CUDA kernels. Every comparison prints its measured error (run pytest with -s to see them).

Tolerances (max error relative to the reference's largest magnitude):
  float64 1e-12, float32 1e-5; float16 2e-3 against the float64 result of the same float16-rounded
  inputs (the kernels accumulate in float32 and round once, 2^-11 = 4.9e-4); AMP module 3e-2
  against float32 (float16 convolutions and softmax); CCNet on CUDA vs CPU: 1e-4 outputs, 1e-3
  gradients with TF32 off (NVIDIA_TF32_OVERRIDE=0), 2e-2 with TF32 (cuDNN's default on sm_80+).
  BatchNormAct and the upsampled cross-entropy (Jittor ops on CUDA) against their CPU kernels in
  float64: 1e-10.
"""
import os

import numpy as np
import pytest

import jittor as jt
from cca_testing import finite_difference_check, keep_float64, random_var, rel_err  # noqa: F401
from models import build_model
from models import cc_attention as cca
from models.norm_act import BatchNormAct
from models.upsampled_ce import upsampled_nll

ON_CUDA = bool(jt.has_cuda and jt.flags.use_cuda)
# Gradient errors are relative to the gradient's magnitude, but at least to this fraction of the
# largest gradient: the key bias has a zero gradient in exact arithmetic (it shifts all energies
# of a position equally), so its computed gradient is round-off only.
GRADIENT_FLOOR = 1e-2
TF32_OFF = os.environ.get("NVIDIA_TF32_OVERRIDE") == "0"


@pytest.fixture
def cuda_device():
    if not ON_CUDA:
        if os.environ.get("CCNET_REQUIRE_CUDA", "0") == "1":
            pytest.fail("CCNET_REQUIRE_CUDA=1 but Jittor runs on CPU (see the ccnet-jittor: line)")
        pytest.skip("no CUDA device: Jittor runs on CPU here")


def check(name, actual, expected, tol, floor=1e-30):
    err = rel_err(actual, expected, floor)
    print(f"  {name}: max rel err {err:.3g} (tol {tol:g})")
    assert err <= tol, (name, err, tol)


# 2D: query/key [B, C8, H, W], value [B, C, H, W]; 3D adds T.
SHAPES = {"2d": ((2, 8, 9, 6), (2, 12, 9, 6)), "3d": ((2, 8, 3, 5, 4), (2, 12, 3, 5, 4))}
OPS = {"2d": (cca.ca_weight, cca.ca_map), "3d": (cca.ca_weight_3d, cca.ca_map_3d)}


def primitive_results(case, arrays, dtype, impl, use_cuda):
    """Energy, ca_map output and the gradients of both (against fixed random output gradients)."""
    weight, aggregate = OPS[case]
    with jt.flag_scope(use_cuda=use_cuda):
        q, k, a, v, g_energy, g_out = (jt.array(x.astype(dtype)) for x in arrays)
        energy = weight(q, k, impl=impl)
        out = aggregate(a, v, impl=impl)
        dq, dk = jt.grad((energy * g_energy).sum(), [q, k])
        da, dv = jt.grad((out * g_out).sum(), [a, v])
        return {name: t.numpy().astype(np.float64) for name, t in
                dict(energy=energy, dq=dq, dk=dk, out=out, d_attention=da, dv=dv).items()}


def attention_shape(qk_shape):
    """[B, L, (T,) H, W] with L the criss-cross path length."""
    spatial = qk_shape[2:]
    return (qk_shape[0], sum(spatial) - len(spatial) + 1) + tuple(spatial)


def random_arrays(case, rng, round_to=None):
    qk_shape, v_shape = SHAPES[case]
    a_shape = attention_shape(qk_shape)
    arrays = [rng.standard_normal(s) for s in (qk_shape, qk_shape, a_shape, v_shape, a_shape, v_shape)]
    return [x.astype(round_to).astype(np.float64) if round_to else x for x in arrays]


@pytest.mark.usefixtures("cuda_device")
@pytest.mark.parametrize("case", ["2d", "3d"])
@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 1e-5), ("float16", 2e-3)])
def test_fused_cuda_kernels_match_float64_reference_on_cpu(case, dtype, tol):
    arrays = random_arrays(case, np.random.default_rng(3), round_to=dtype if dtype == "float16" else None)
    reference = primitive_results(case, arrays, "float64", "reference", use_cuda=0)
    fused = primitive_results(case, arrays, dtype, "fused", use_cuda=1)
    for name in reference:
        check(f"{case} {dtype} {name}", fused[name], reference[name], tol)


@pytest.mark.usefixtures("cuda_device")
@pytest.mark.parametrize("case", ["2d", "3d"])
def test_fused_cuda_gradients_match_finite_differences(case):
    rng = np.random.default_rng(5)
    qk_shape, v_shape = SHAPES[case]
    weight, aggregate = OPS[case]
    q, k, v = random_var(rng, qk_shape), random_var(rng, qk_shape), random_var(rng, v_shape)
    finite_difference_check(lambda q, k: weight(q, k, impl="fused"), [q, k], rng)
    attention = jt.array(rng.standard_normal(attention_shape(qk_shape)))
    finite_difference_check(lambda a, v: aggregate(a, v, impl="fused"), [attention, v], rng)


def module_results(module, x, amp_level):
    with jt.flag_scope(auto_mixed_precision_level=amp_level):
        out = module(x)
        params = module.parameters()
        grads = jt.grad((out.float32() * out.float32()).sum(), params)
        return str(module.last_attention.dtype), out.numpy().astype(np.float64), [g.numpy().astype(np.float64) for g in grads]


@pytest.mark.usefixtures("cuda_device")
@pytest.mark.parametrize("module_class, shape", [(cca.CrissCrossAttention, (2, 32, 12, 10)),
                                                 (cca.CrissCrossAttention3D, (1, 32, 3, 8, 6))])
def test_amp_runs_the_float16_kernels(module_class, shape):
    """train.py --amp sets auto_mixed_precision_level=4: the 1x1 convs then give float16 Q, K, V,
    so the attention runs its float16 kernels, forward and backward."""
    jt.set_global_seed(0)
    module = module_class(32, gamma_init=1.0, keep_attention=True)
    x = jt.array(np.random.default_rng(1).standard_normal(shape).astype("float32"))
    dtype32, out32, grads32 = module_results(module, x, 0)
    dtype16, out16, grads16 = module_results(module, x, 4)
    assert (dtype32, dtype16) == ("float32", "float16")
    check(f"{module_class.__name__} AMP output", out16, out32, 3e-2)
    floor = GRADIENT_FLOOR * max(np.abs(g).max() for g in grads32)
    for param, g16, g32 in zip(module.parameters(), grads16, grads32):
        assert np.isfinite(g16).all(), param.name()
        check(f"{module_class.__name__} AMP grad {param.name()}", g16, g32, 3e-2, floor)


@pytest.mark.usefixtures("cuda_device")
def test_ccnet_r2_forward_backward_on_cuda_equals_cpu():
    jt.set_global_seed(0)
    model = build_model("resnet10", 5, recurrence=2, base_channels=16, head_channels=64, aux_channels=64,
                        cca_gamma_init=1.0, dropout=0.0)
    model.train()
    rng = np.random.default_rng(2)
    image = rng.standard_normal((2, 3, 64, 64)).astype("float32")
    params = model.parameters()

    def step(use_cuda):
        with jt.flag_scope(use_cuda=use_cuda):
            main, aux = model(jt.array(image))
            probe = [jt.array(np.random.default_rng(7 + i).standard_normal(o.shape).astype("float32"))
                     for i, o in enumerate((main, aux))]
            loss = (main * probe[0]).sum() + (aux * probe[1]).sum()
            grads = jt.grad(loss, params)
            return [main.numpy(), aux.numpy()], [g.numpy() for g in grads]

    outs_cuda, grads_cuda = step(1)
    outs_cpu, grads_cpu = step(0)
    out_tol, grad_tol = (1e-4, 1e-3) if TF32_OFF else (2e-2, 2e-2)
    for name, a, b in zip(("main", "aux"), outs_cuda, outs_cpu):
        check(f"CCNet {name} logits", a, b, out_tol)
    floor = GRADIENT_FLOOR * max(np.abs(g).max() for g in grads_cpu)
    worst = max((rel_err(a, b, floor), p.name()) for p, a, b in zip(params, grads_cuda, grads_cpu))
    print(f"  CCNet gradients: worst {worst[1]} max rel err {worst[0]:.3g} (tol {grad_tol:g})")
    assert worst[0] <= grad_tol, worst
    cca_grads = [(p.name(), a, b) for p, a, b in zip(params, grads_cuda, grads_cpu) if ".cca." in p.name()]
    assert cca_grads, "the attention's parameters got no gradients"


def test_amp_on_cpu_hands_the_attention_float16():
    """What --amp does to the attention, checked where there is no GPU: under
    auto_mixed_precision_level=4 its 1x1 convs hand it float16 Q, K, V (so on CUDA the float16
    kernels run), which the CPU path refuses by name instead of computing in it."""
    if ON_CUDA:
        pytest.skip("on CUDA, test_amp_runs_the_float16_kernels runs the float16 kernels")
    module = cca.CrissCrossAttention(16, gamma_init=1.0)
    x = jt.array(np.random.default_rng(0).standard_normal((1, 16, 5, 6)).astype("float32"))
    with jt.flag_scope(auto_mixed_precision_level=4):
        with pytest.raises(ValueError, match="dtype float16 not supported here.*float16 needs CUDA"):
            module(x).sync()


@pytest.mark.usefixtures("cuda_device")
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "identity"])
def test_batchnorm_act_on_cuda_equals_the_cpu_kernels(activation):
    rng = np.random.default_rng(3)
    x_np = rng.standard_normal((2, 5, 7, 9)) * 2 + 1
    upstream = rng.standard_normal(x_np.shape)

    def step(use_cuda):
        with jt.flag_scope(use_cuda=use_cuda):
            module = BatchNormAct(5, activation)
            module.weight.update(jt.array(np.linspace(0.5, 1.5, 5)).float64())
            module.bias.update(jt.array(np.linspace(-1, 1, 5)).float64())
            x = jt.array(x_np).float64()
            out = module(x)
            grads = jt.grad((out * jt.array(upstream).float64()).sum(), [x, module.weight, module.bias])
            return [out.numpy()] + [g.numpy() for g in grads] + [module.running_mean.numpy(),
                                                                 module.running_var.numpy()]

    for name, a, b in zip(["out", "grad x", "grad weight", "grad bias", "running mean", "running var"],
                          step(1), step(0)):
        check(f"BatchNormAct {activation} {name}", a, b, 1e-10)


@pytest.mark.usefixtures("cuda_device")
@pytest.mark.parametrize("align_corners", [False, True])
def test_upsampled_nll_on_cuda_equals_the_cpu_kernel(align_corners):
    rng = np.random.default_rng(4)
    logits_np = rng.standard_normal((2, 7, 5, 6)) * 3
    label = rng.integers(0, 7, (2, 37, 45))
    weight = rng.random(label.shape)

    def loss_and_grad(use_cuda):
        with jt.flag_scope(use_cuda=use_cuda):
            logits = jt.array(logits_np).float64()
            nll = upsampled_nll(logits, label, align_corners)
            grad = jt.grad((nll * jt.array(weight).float64()).sum(), logits)
            return nll.numpy(), grad.numpy()

    for name, a, b in zip(["nll", "grad"], loss_and_grad(1), loss_and_grad(0)):
        check(f"upsampled_nll {name} align_corners={align_corners}", a, b, 1e-10)
