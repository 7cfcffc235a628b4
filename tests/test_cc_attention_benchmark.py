"""benchmarks/cca.py: its arguments, its PyTorch formulations, its CUDA code paths (import- and
argument-checked here, without a GPU), its rows and JSON. No timing is asserted: speed is measured
by running the benchmark, not by tests."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import jittor as jt

from cca_testing import keep_float64, rel_err  # noqa: F401 (autouse fixture)
from models.cc_attention import criss_cross_reference
from scripts import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "cca.py")


cca_bench = load_script("benchmarks/cca.py")


def test_defaults():
    args = cca_bench.parse_args([])
    assert args.section_list == ["module", "kernels", "rcca"] and args.device == "cpu"
    assert args.shape_list == [(1, 512, 97, 97), (2, 512, 64, 64), (1, 512, 33, 33)]
    assert args.repeats == 5 and args.rcca_repeats is None and args.json is None
    args = cca_bench.parse_args(["--device", "cuda", "--json", "rows.json", "--sections", "module,kernels"])
    assert args.device == "cuda" and args.json == "rows.json" and args.section_list == ["module", "kernels"]


@pytest.mark.parametrize("argv, message", [
    (["--sections", "module,speed"], r"--sections: unknown \['speed'\]; valid: module, kernels, rcca"),
    (["--shapes", "1,512,97"], r"--shapes: '1,512,97' must be 4 comma-separated positive ints"),
    (["--shapes", "1,a,2,2"], r"--shapes: '1,a,2,2' must be 4"),
    (["--shapes3d", "1,8,0,4,4"], r"--shapes3d: '1,8,0,4,4' must be 5 comma-separated positive ints"),
    (["--impls", "fused,magic"], r"--impls: unknown \['magic'\]"),
    (["--repeats", "0"], r"--repeats: must be at least 1, got 0"),
    (["--rcca-repeats", "0"], r"--rcca-repeats: must be at least 1"),
    (["--json", "/no/such/folder/rows.json"], r"--json: folder /no/such/folder does not exist"),
])
def test_bad_arguments(argv, message):
    with pytest.raises(SystemExit, match=message):
        cca_bench.parse_args(argv)


def test_bad_device_choice():
    with pytest.raises(SystemExit):
        cca_bench.parse_args(["--device", "tpu"])


@pytest.mark.skipif(jt.flags.use_cuda, reason="this machine has CUDA")
def test_cuda_without_a_gpu_fails_in_one_line(tmp_path):
    """--device cuda must not fall back to CPU: one clear line, non-zero exit, no JSON written."""
    out = tmp_path / "cca_cuda.json"
    with pytest.raises(cca_bench.DeviceUnavailable, match=r"--device cuda: no usable CUDA device"):
        cca_bench.main(["--device", "cuda", "--json", str(out)])
    result = subprocess.run([sys.executable, SCRIPT, "--device", "cuda", "--json", str(out)], capture_output=True,
                            text=True, env=dict(os.environ, CCNET_QUIET="1"))
    assert result.returncode != 0 and not out.exists()
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and "--device cuda" in message[0], result.stderr


def test_rcca_section_refuses_cuda():
    args = cca_bench.parse_args(["--sections", "rcca"])
    with pytest.raises(SystemExit, match="rcca section .* is CPU only"):
        cca_bench.run_rcca_section(args, [], "cuda")


def test_cuda_code_paths_exist():
    """The CUDA-only helpers are importable and take the arguments main() gives them."""
    import inspect
    assert list(inspect.signature(cca_bench.measure_gpu_memory_child).parameters) == ["section", "impl", "shape", "dtype"]
    assert list(inspect.signature(cca_bench.torch_step_peak_bytes).parameters) == ["step"]
    args = cca_bench.parse_args(["--device", "cuda", "--gpu-memory-child", "kernels:torch_bmm:float16",
                                 "--shapes", "1,64,8,8"])
    section, impl, dtype = args.gpu_memory_child.split(":")
    assert section in cca_bench.SECTIONS and impl in cca_bench.KERNEL_IMPLS and dtype == "float16"


def test_jittor_peak_memory_accounting_on_cpu():
    """The Jittor peak-memory reader (used per CUDA row) also works on CPU vars: the attention
    step holds at least its output and its attention beyond the inputs."""
    step, live = cca_bench.make_step("kernels", "ours", (1, 16, 5, 6), "float32", "cpu")
    peak = cca_bench.jittor_step_peak_bytes(jt, step, live)
    assert peak >= (16 + 10) * 5 * 6 * 4


def test_min_bytes_by_hand():
    # [1, 16, 3, 4]: 12 positions, path 6, Q/K 2 channels; forward 2+2+16+16 in, 16+6 out;
    # backward 2+2+16+6+16 in, 2+2+16 out -> 12 * (58 + 62) values
    assert cca_bench.attention_min_bytes((1, 16, 3, 4), 4) == 12 * 120 * 4


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 2, 6, 3), (1, 3, 1, 4)])
@pytest.mark.parametrize("formulation", ["torch_einsum", "torch_bmm"])
def test_torch_formulations_compute_the_criss_cross_attention(formulation, shape):
    """The PyTorch rows measure the same function as ours: each formulation against the
    plain-Jittor reference (float64), H != W and H = 1 included."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    b, c, h, w = shape
    q, k, v = (rng.standard_normal((b, ch, h, w)) for ch in (c, c, c + 2))
    expected = criss_cross_reference(jt.array(q), jt.array(k), jt.array(v)).numpy()
    actual = cca_bench.TORCH_ATTENTION[formulation](*(torch.tensor(a) for a in (q, k, v))).numpy()
    assert rel_err(actual, expected) <= 1e-12


def test_alternating_rounds():
    calls = []
    steps = {name: (lambda n=name: calls.append(n)) for name in ("a", "b")}
    medians = cca_bench.time_alternating(steps, repeats=3, warmup=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert set(medians) == {"a", "b"} and all(m >= 0 for m in medians.values())


def test_module_and_kernel_rows_and_json(tmp_path):
    """A tiny CPU run of the two versus-PyTorch sections end to end, rows written as JSON."""
    pytest.importorskip("torch")
    out = tmp_path / "rows.json"
    cca_bench.main(["--sections", "module,kernels", "--shapes", "1,16,5,6", "--repeats", "1", "--json", str(out)])
    payload = json.loads(out.read_text())
    rows = payload["rows"]
    assert payload["device"] == "cpu" and payload["threads"] == 2
    assert [(r["section"], r["impl"]) for r in rows] == \
        [("module", i) for i in cca_bench.MODULE_IMPLS] + [("kernels", i) for i in cca_bench.KERNEL_IMPLS]
    for row in rows:
        assert row["shape"] == [1, 16, 5, 6] and row["dtype"] == "float32" and row["seconds"] > 0
        assert "bandwidth_tbs" not in row           # the bandwidth column is a CUDA number


@pytest.mark.parametrize("shape", [(1, 64, 40, 40), (1, 32, 3, 24, 24)])
def test_rcca_memory_child_takes_2d_and_3d_shapes(shape):
    """The memory child gets its shape back from its own command line (3D through --shapes3d) and
    sees the step's tensors (large enough to be mapped, so they show in the resident set)."""
    argv = cca_bench.memory_child_args("fused3d" if len(shape) == 5 else "fused", shape, 2, 1)
    args = cca_bench.parse_args(argv)
    assert (args.shape3d_list[0] if args.shape3d_list else args.shape_list[0]) == shape
    child = cca_bench.run_child(argv, cca_bench.UNCACHED_ALLOCATORS)
    assert child is not None and child["peak_mib"] > 0
