"""BatchNormAct and relu (models/norm_act.py): outputs, gradients and running statistics equal
Jittor's nn.BatchNorm2d + activation (op-by-op autodiff), gradients match finite differences in
float64, eval mode uses the running statistics, with the CPU kernels and with the Jittor-op
version (what runs on CUDA), 2 MPI ranks equal one process on the whole batch,
bad activation names are reported."""
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import jittor as jt
from jittor import nn

from models import norm_act
from models.norm_act import BatchNormAct, relu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAIN_ACT = {"relu": nn.relu, "leaky_relu": lambda x: nn.leaky_relu(x, 0.01), "identity": lambda x: x}


@pytest.fixture(params=["cpu kernels", "jittor ops"])
def implementation(request, monkeypatch):
    """Both ways the passes run: the OpenMP kernels (CPU) and the Jittor ops (the CUDA path)."""
    monkeypatch.setattr(norm_act, "use_cpu_kernels", request.param == "cpu kernels")
    return request.param


def make_pair(activation, channels=3, seed=0):
    rng = np.random.RandomState(seed)
    weight, bias = rng.randn(channels).astype(np.float32), rng.randn(channels).astype(np.float32)
    ours, plain = BatchNormAct(channels, activation), nn.BatchNorm2d(channels)
    for bn in (ours, plain):
        bn.weight.update(jt.array(weight))
        bn.bias.update(jt.array(bias))
    return ours, plain


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "identity"])
def test_training_step_equals_batchnorm_then_activation(activation, implementation):
    rng = np.random.RandomState(1)
    x_np = (rng.randn(2, 3, 5, 7) * 2 + 1).astype(np.float32)
    upstream = jt.array(rng.randn(2, 3, 5, 7).astype(np.float32))
    ours, plain = make_pair(activation)
    results = []
    for module, act in ((ours, lambda y: y), (plain, PLAIN_ACT[activation])):
        x = jt.array(x_np)
        out = act(module(x))
        grads = jt.grad((out * upstream).sum(), [x, module.weight, module.bias])
        results.append([out.numpy()] + [g.numpy() for g in grads]
                       + [module.running_mean.numpy(), module.running_var.numpy()])
    for name, a, b in zip(["out", "grad x", "grad weight", "grad bias", "running mean", "running var"], *results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
    assert np.abs(results[0][4] - 0).max() > 0.01          # the running statistics really moved


@pytest.mark.parametrize("activation", ["leaky_relu", "identity"])
def test_gradient_matches_finite_differences_float64(activation, implementation):
    rng = np.random.RandomState(2)
    x_np = rng.randn(2, 2, 3, 3)
    upstream = rng.randn(2, 2, 3, 3)
    module, _ = make_pair(activation, channels=2)
    module.weight.assign(module.weight.float64())
    module.bias.assign(module.bias.float64())

    def as_var(array):
        with jt.flag_scope(auto_convert_64_to_32=0):     # keep the finite-difference steps exact
            return jt.array(array)

    def loss(array):
        return float((module(as_var(array)) * as_var(upstream)).sum().item())

    x = as_var(x_np)
    grad = jt.grad((module(x) * as_var(upstream)).sum(), x).numpy()
    numeric = np.zeros_like(x_np)
    for idx in np.ndindex(x_np.shape):
        step = np.zeros_like(x_np)
        step[idx] = 1e-6
        numeric[idx] = (loss(x_np + step) - loss(x_np - step)) / 2e-6
    np.testing.assert_allclose(grad, numeric, atol=1e-6)


def test_eval_mode_uses_running_statistics(implementation):
    ours, plain = make_pair("leaky_relu")
    for module in (ours, plain):
        module.running_mean.update(jt.array(np.array([0.5, -1.0, 2.0], np.float32)))
        module.running_var.update(jt.array(np.array([4.0, 0.25, 1.0], np.float32)))
        module.eval()
    x = jt.array(np.random.RandomState(3).randn(1, 3, 4, 4).astype(np.float32))
    np.testing.assert_allclose(ours(x).numpy(), nn.leaky_relu(plain(x), 0.01).numpy(), rtol=1e-6, atol=1e-6)


def test_relu_value_and_gradient():
    x = jt.array(np.array([-2.0, -0.5, 0.0, 0.5, 3.0], np.float32))
    upstream = jt.array(np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32))
    out = relu(x)
    np.testing.assert_array_equal(out.numpy(), [0, 0, 0, 0.5, 3.0])
    np.testing.assert_array_equal(jt.grad((out * upstream).sum(), x).numpy(), [0, 0, 0, 4.0, 5.0])


def test_unknown_activation_is_reported():
    with pytest.raises(ValueError, match=r"unknown activation 'gelu'; expected one of \['identity', 'leaky_relu', 'relu'\]"):
        BatchNormAct(4, "gelu")


MPI_HARNESS = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import numpy as np
    from utils import runtime
    jt = runtime.activate(verbose=False)
    from models.norm_act import BatchNormAct
    rng = np.random.RandomState(0)
    x_all, upstream_all = rng.randn(4, 3, 5, 5).astype(np.float32), rng.randn(4, 3, 5, 5).astype(np.float32)
    rank, world = (jt.rank, jt.world_size) if jt.in_mpi else (0, 1)
    rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
    module = BatchNormAct(3, "leaky_relu")
    module.weight.update(jt.array(np.array([1.5, 0.5, -1.0], np.float32)))
    x = jt.array(x_all[rows])
    grad_x, grad_w = jt.grad((module(x) * jt.array(upstream_all[rows])).sum(), [x, module.weight])
    if jt.in_mpi:                        # what the optimizer does with parameter gradients
        grad_w = grad_w.mpi_all_reduce("mean") * world
    np.savez(sys.argv[1] + f"/bn_{{world}}_{{rank}}.npz", grad_x=grad_x.numpy(), grad_w=grad_w.numpy(),
             running_var=module.running_var.numpy())
""")


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not found (Debian: apt-get install openmpi-bin libopenmpi-dev)")
def test_two_ranks_normalise_and_differentiate_as_one_batch(tmp_path):
    script = tmp_path / "bn.py"
    script.write_text(MPI_HARNESS.format(root=ROOT))
    env = dict(os.environ, CCNET_QUIET="1", OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    for cmd in ([sys.executable], [shutil.which("mpirun"), "-np", "2", "--oversubscribe", sys.executable]):
        done = subprocess.run(cmd + [str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    one = np.load(tmp_path / "bn_1_0.npz")
    ranks = [np.load(tmp_path / f"bn_2_{r}.npz") for r in range(2)]
    np.testing.assert_allclose(np.concatenate([r["grad_x"] for r in ranks]), one["grad_x"], atol=1e-6)
    for r in ranks:
        np.testing.assert_allclose(r["grad_w"], one["grad_w"], atol=1e-5)
        np.testing.assert_allclose(r["running_var"], one["running_var"], atol=1e-6)
