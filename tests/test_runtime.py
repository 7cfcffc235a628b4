"""utils.runtime: device choice, oneDNN wiring, user env wins, loud warning without oneDNN."""
import os
import subprocess
import sys
import warnings

import pytest

from utils import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fresh_state(monkeypatch):
    """Run configure() again as if in a new process; restore the real state afterwards."""
    saved = dict(runtime._state)
    runtime._state.clear()
    for var in ("nvcc_path", "use_mkl", "log_silent", "FIX_TORCH_ERROR"):
        monkeypatch.delenv(var, raising=False)
    yield
    runtime._state.clear()
    runtime._state.update(saved)


def fake_nvcc(tmp_path, release):
    nvcc = tmp_path / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    return str(nvcc)


def test_no_gpu_means_cpu(monkeypatch, fresh_state):
    monkeypatch.setattr(runtime, "_cuda_device_count", lambda: 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = runtime.configure()
    assert state["use_cuda"] is False and "no CUDA GPU" in state["device_reason"]
    assert os.environ["nvcc_path"] == ""


@pytest.mark.parametrize("release,expect_cuda", [("13.0", False), ("12.4", True), ("11.8", True)])
def test_gpu_needs_cuda12_or_older(monkeypatch, tmp_path, fresh_state, release, expect_cuda):
    monkeypatch.setattr(runtime, "_cuda_device_count", lambda: 1)
    monkeypatch.setattr(runtime, "_find_nvcc", lambda: fake_nvcc(tmp_path, release))
    use_cuda, reason = runtime._choose_device()
    assert use_cuda is expect_cuda
    assert f"CUDA {release.split('.')[0]}" in reason


def test_user_environment_wins(monkeypatch, fresh_state):
    monkeypatch.setattr(runtime, "_cuda_device_count", lambda: 0)
    monkeypatch.setenv("nvcc_path", "/opt/my/nvcc")
    monkeypatch.setenv("log_silent", "0")
    monkeypatch.setenv("use_mkl", "0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = runtime.configure()
    assert state["use_cuda"] is True and state["device_reason"] == "nvcc_path set by the user"
    assert os.environ["nvcc_path"] == "/opt/my/nvcc" and os.environ["log_silent"] == "0"
    assert not any("250x" in str(w.message) for w in caught)   # use_mkl=0 is a choice, not an accident


def test_onednn_is_linked_into_jittor_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("JITTOR_HOME", str(tmp_path))
    assert runtime._wire_onednn()
    lib = tmp_path / ".cache" / "jittor" / "mkl" / runtime.DNNL_DIR_NAME / "lib"
    assert (lib / "libmkldnn.so").resolve().is_file()
    # libmkldnn.so loads libdnnl.so.2 from its own folder: the sibling must be linked too
    assert (lib / "libdnnl.so.2").resolve().is_file()
    assert (lib.parent / "include" / "dnnl.h").is_file()


def test_missing_onednn_warns_loudly(monkeypatch, tmp_path, fresh_state):
    monkeypatch.setenv("JITTOR_HOME", str(tmp_path))
    monkeypatch.setattr(runtime, "_cuda_device_count", lambda: 0)
    monkeypatch.setattr(runtime, "_onednn_sources", lambda: iter(()))
    with pytest.warns(RuntimeWarning, match="250x slower"):
        runtime.configure()
    assert os.environ["use_mkl"] == "0"   # no attempt at Jittor's unreachable download


def test_entry_point_reports_device_and_onednn():
    env = {k: v for k, v in os.environ.items() if k not in ("CCNET_QUIET", "use_mkl", "nvcc_path")}
    result = subprocess.run([sys.executable, "-m", "utils.env_check"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    line = [l for l in result.stderr.splitlines() if l.startswith("ccnet-jittor:")]
    assert line == ["ccnet-jittor: device=cpu (no CUDA GPU), oneDNN on"], result.stderr
