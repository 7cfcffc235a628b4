"""utils.runtime: device choice, oneDNN wiring, user env wins, loud warning without oneDNN."""
import os
import subprocess
import sys
import sysconfig
import warnings

import pytest

from utils import cuda_setup, runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unset(monkeypatch, var):
    """Remove ``var`` for this test and restore it afterwards, also when it was unset to begin with
    (monkeypatch.delenv of an absent variable records nothing, so a value configure() writes would
    leak into later tests)."""
    monkeypatch.setenv(var, "")
    monkeypatch.delenv(var)


@pytest.fixture
def fresh_state(monkeypatch):
    """Run configure() again as if in a new process; restore the real state afterwards."""
    saved = dict(runtime._state)
    runtime._state.clear()
    for var in ("nvcc_path", "use_mkl", "log_silent", "FIX_TORCH_ERROR", "CCNET_REQUIRE_CUDA",
                *runtime.CUDA_DOWNLOADS_OFF):
        unset(monkeypatch, var)
    monkeypatch.setattr(sys, "path", list(sys.path))
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


@pytest.mark.parametrize("release", ["12.4", "11.8"])
def test_gpu_with_cuda12_or_older_uses_jittor_as_installed(monkeypatch, tmp_path, fresh_state, release):
    monkeypatch.setattr(runtime, "_cuda_device_count", lambda: 1)
    monkeypatch.setattr(runtime, "_find_nvcc", lambda: fake_nvcc(tmp_path, release))
    monkeypatch.setattr(cuda_setup, "setup", lambda *a: pytest.fail("CUDA <= 12 must not be patched"))
    choice = runtime._choose_device()
    assert choice.use_cuda and choice.cuda_setup is None
    assert f"CUDA {release.split('.')[0]}" in choice.reason


def test_gpu_with_cuda13_runs_the_patched_copy(monkeypatch, tmp_path, fresh_state):
    nvcc = fake_nvcc(tmp_path, "13.0")
    prepared = cuda_setup.CudaSetup(str(tmp_path / "home" / "bin" / "nvcc"), str(tmp_path / "copy"),
                                    {"cublas": True, "cudnn": False, "curand": True})
    calls = []
    monkeypatch.setattr(runtime, "_cuda_device_count", lambda: 1)
    monkeypatch.setattr(runtime, "_find_nvcc", lambda: nvcc)
    monkeypatch.setattr(cuda_setup, "setup", lambda *args: calls.append(args) or prepared)
    state = runtime.configure()
    assert calls and calls[0][0] == nvcc
    assert state["use_cuda"] and "CUDA 13, patched Jittor" in state["device_reason"]
    assert "without nvidia-cudnn-cu13" in state["device_reason"]      # says what to install
    # Jittor will read the CUDA home and import the patched copy; its downloads are off
    assert os.environ["nvcc_path"] == prepared.nvcc_path and sys.path[0] == prepared.jittor_root
    assert all(os.environ[name] == "0" for name in ("use_nccl", "use_cutt", "use_cutlass"))


def test_gpu_that_cannot_be_set_up_warns_or_fails(monkeypatch, tmp_path, fresh_state):
    def refuse(*args):
        raise cuda_setup.CudaSetupError("libcudart.so not found")
    monkeypatch.setattr(runtime, "_cuda_device_count", lambda: 2)
    monkeypatch.setattr(runtime, "_find_nvcc", lambda: fake_nvcc(tmp_path, "13.0"))
    monkeypatch.setattr(cuda_setup, "setup", refuse)
    with pytest.warns(RuntimeWarning, match="CUDA not used, running on CPU: 2 GPU.*libcudart.so not found"):
        state = runtime.configure()
    assert not state["use_cuda"] and os.environ["nvcc_path"] == ""
    runtime._state.clear()
    monkeypatch.delenv("nvcc_path")
    monkeypatch.setenv("CCNET_REQUIRE_CUDA", "1")
    with pytest.raises(RuntimeError, match="2 GPU.*cannot be set up: libcudart.so not found"):
        runtime.configure()


def test_cuda14_is_not_guessed(monkeypatch, tmp_path, fresh_state):
    monkeypatch.setattr(runtime, "_cuda_device_count", lambda: 1)
    monkeypatch.setattr(runtime, "_find_nvcc", lambda: fake_nvcc(tmp_path, "14.0"))
    choice = runtime._choose_device()
    assert not choice.use_cuda and choice.gpu_unused and "is CUDA 14" in choice.reason


def test_require_cuda_fails_on_a_machine_without_gpu(monkeypatch, fresh_state):
    monkeypatch.setattr(runtime, "_cuda_device_count", lambda: 0)
    monkeypatch.setenv("CCNET_REQUIRE_CUDA", "1")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        runtime.configure()


def test_python_config_stand_in(monkeypatch, tmp_path):
    """Jittor needs python3.X-config; a virtual environment without one gets a working stand-in."""
    monkeypatch.setenv("JITTOR_HOME", str(tmp_path))
    unset(monkeypatch, "python_config_path")
    monkeypatch.setattr(runtime, "_python_config_candidates", lambda: ())
    runtime._wire_python_config()
    script = os.environ["python_config_path"]
    assert script.startswith(str(tmp_path))
    def ask(*flags):
        return subprocess.run([script, *flags], capture_output=True, text=True, check=True).stdout.split()
    include = ask("--includes")[0]
    assert include.startswith("-I") and os.path.isfile(os.path.join(include[2:], "Python.h"))
    assert ask("--extension-suffix") == [sysconfig.get_config_var("EXT_SUFFIX")]
    monkeypatch.setenv("python_config_path", "/mine")    # the user's choice wins
    runtime._wire_python_config()
    assert os.environ["python_config_path"] == "/mine"


def test_user_environment_wins(monkeypatch, fresh_state):
    monkeypatch.setattr(runtime, "_cuda_device_count", lambda: 0)
    monkeypatch.setenv("nvcc_path", "/opt/my/nvcc")
    monkeypatch.setenv("log_silent", "0")
    monkeypatch.setenv("use_mkl", "0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = runtime.configure()
    assert state["use_cuda"] is True and state["device_reason"] == "nvcc_path set by the user"
    assert os.environ["use_nccl"] == "0"                     # CUDA chosen: no NCCL download
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
