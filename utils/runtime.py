"""Configure Jittor *before* it is imported.

Every entry point and package of ccnet-jittor imports this module first (``utils/__init__.py``
does it), so ``import jittor`` anywhere in the project sees the environment chosen here.
What it decides:

* device: CUDA when a GPU answers through ``libcuda.so.1`` and an nvcc is found: CUDA <= 12 as
  Jittor finds it, CUDA 13 through ``utils.cuda_setup`` (a patched copy of Jittor and a CUDA home
  with the cuBLAS / cuDNN / cuRAND wheels); otherwise CPU (``nvcc_path=""``), because a plain
  ``import jittor`` crashes on machines with nvcc but no CUDA runtime. A GPU that cannot be used
  gets a loud warning with the reason; with ``CCNET_REQUIRE_CUDA=1`` it is an error instead.
  On CUDA, Jittor's downloads of NCCL, cuTT and CUTLASS (unreachable offline) are switched off.
* python3.X-config: Jittor asks it for Python's include flags; a virtual environment often has
  none, so a stand-in that reads ``sysconfig`` is written into Jittor's cache.
* oneDNN: Jittor would download oneDNN 2.2 from a server we cannot reach; instead we point its
  cache folder at the ``onednn-cpu-gomp`` wheels (or Debian's libdnnl). Without oneDNN, CPU
  convolutions are ~250x slower, so that case gets a loud warning.
* quiet start-up (``log_silent=1``) and no torch import at start-up (``FIX_TORCH_ERROR=0``).
* operators compiled one after another (``use_parallel_op_compiler=0``; see ``configure``).

Any of these environment variables that the user set already wins: we only fill in defaults.
"""
import ctypes
import json
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from utils import cuda_setup

MAX_UNPATCHED_CUDA_MAJOR = 12   # Jittor 1.3.11 builds as it is up to CUDA 12; 13 needs cuda_setup
# Jittor downloads these from servers we cannot reach when CUDA is on; off unless the user says so
CUDA_DOWNLOADS_OFF = {"use_nccl": "0", "use_cutt": "0", "use_cutlass": "0"}
DNNL_DIR_NAME = "dnnl_lnx_2.2.0_cpu_gomp"   # the folder name Jittor looks for in its cache

_state = {}                  # filled once by configure(); read by describe()


def _cuda_device_count():
    """Number of CUDA devices the driver reports, 0 when there is no usable driver."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def _find_nvcc():
    for candidate in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc", "/usr/bin/nvcc", "/opt/cuda/bin/nvcc"):
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


@dataclass(frozen=True)
class DeviceChoice:
    use_cuda: bool
    reason: str                 # for the stderr line
    gpu_unused: bool = False    # a GPU is there but CUDA cannot be used: say so loudly
    cuda_setup: object = None   # cuda_setup.CudaSetup for CUDA 13


def _choose_device():
    """Decide CPU or CUDA (and prepare CUDA 13). Never raises."""
    if "nvcc_path" in os.environ:                       # the user decided
        return DeviceChoice(bool(os.environ["nvcc_path"]), "nvcc_path set by the user")
    gpus = _cuda_device_count()
    if gpus == 0:
        return DeviceChoice(False, "no CUDA GPU")
    nvcc = _find_nvcc()
    if nvcc is None:
        return DeviceChoice(False, f"{gpus} GPU(s) but no nvcc found", gpu_unused=True)
    release = cuda_setup.nvcc_release(nvcc)
    if release is None:
        return DeviceChoice(False, f"{gpus} GPU(s) but `{nvcc} --version` does not answer", gpu_unused=True)
    if release[0] <= MAX_UNPATCHED_CUDA_MAJOR:
        return DeviceChoice(True, f"{gpus} GPU(s), {nvcc} (CUDA {release[0]})")
    try:
        prepared = cuda_setup.setup(nvcc, _jittor_home() / ".cache" / "jittor" / "ccnet-cuda13")
    except (cuda_setup.CudaSetupError, OSError) as err:
        return DeviceChoice(False, f"{gpus} GPU(s) but CUDA {release[0]} cannot be set up: {err}",
                            gpu_unused=True)
    missing = [cuda_setup.CUDA_LIBRARIES[name] for name, found in prepared.libraries.items() if not found]
    hint = f"; without {', '.join(missing)} Jittor uses its own slower kernels" if missing else ""
    return DeviceChoice(True, f"{gpus} GPU(s), {nvcc} (CUDA {release[0]}, patched Jittor{hint})",
                        cuda_setup=prepared)


def _jittor_home():
    """Where Jittor keeps its cache, resolved the way jittor_utils.home() does."""
    if "JITTOR_HOME" in os.environ:
        return Path(os.environ["JITTOR_HOME"])
    config = Path.home() / ".cache" / "jittor" / "config.json"
    try:
        return Path(json.loads(config.read_text()).get("JITTOR_HOME", str(Path.home())))
    except (OSError, ValueError):
        return Path.home()


def _onednn_sources():
    """(lib_dir, include_dir, library_file) candidates holding oneDNN 2.x, best first."""
    prefix = Path(sys.prefix)
    yield prefix / "lib", prefix / "include", prefix / "lib" / "libmkldnn.so"       # pip wheels
    debian_lib = Path("/usr/lib/x86_64-linux-gnu")
    yield debian_lib, Path("/usr/include"), debian_lib / "libdnnl.so"                # libdnnl-dev


def _wire_onednn():
    """Make Jittor's oneDNN cache folder point at an installed oneDNN. Returns True on success."""
    target = _jittor_home() / ".cache" / "jittor" / "mkl" / DNNL_DIR_NAME
    if (target / "lib" / "libmkldnn.so").exists() and (target / "include" / "dnnl.h").exists():
        return True
    for lib_dir, include_dir, library in _onednn_sources():
        if not (library.exists() and (include_dir / "dnnl.h").exists()):
            continue
        try:
            (target / "lib").mkdir(parents=True, exist_ok=True)
            # libmkldnn.so needs its siblings (libdnnl.so.2, ...) next to it at load time.
            links = {f.name: f for f in lib_dir.glob("lib*dnnl*.so*")}
            links["libmkldnn.so"] = library
            for name, source in links.items():
                link = target / "lib" / name
                if link.is_symlink() or link.exists():
                    link.unlink()
                link.symlink_to(source)
            include = target / "include"
            if include.is_symlink():
                include.unlink()
            if not include.exists():
                include.symlink_to(include_dir)
            return True
        except OSError as err:
            warnings.warn(f"could not link oneDNN from {lib_dir} into {target}: {err}")
    return False


_PYTHON_CONFIG = """#!{python}
import sys, sysconfig
answers = {{"--includes": "-I" + sysconfig.get_paths()["include"],
           "--extension-suffix": sysconfig.get_config_var("EXT_SUFFIX"),
           "--ldflags": "-L" + (sysconfig.get_config_var("LIBDIR") or "")}}
print(" ".join(answers[arg] for arg in sys.argv[1:]))
"""


def _python_config_candidates():
    """Where Jittor 1.3.11 looks for python3.X-config (jittor_utils.get_py3_config_path)."""
    exe_dir = Path(sys.executable).parent
    name = f"python3.{sys.version_info.minor}-config"
    return (exe_dir / name, Path(sys.executable + "-config"), Path("/usr/bin") / name,
            Path("/usr/local/bin") / name, exe_dir / "python3-config")


def _wire_python_config():
    """Point Jittor at a python3.X-config when none sits where it looks (virtual environments)."""
    if "python_config_path" in os.environ or any(c.is_file() for c in _python_config_candidates()):
        return
    script = (_jittor_home() / ".cache" / "jittor" / "ccnet-python-config"
              / f"python3.{sys.version_info.minor}-config")
    try:
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(_PYTHON_CONFIG.format(python=sys.executable))
        script.chmod(0o755)
    except OSError as err:
        warnings.warn(f"no {script.name} for Jittor and none could be written to {script}: {err}")
        return
    os.environ["python_config_path"] = str(script)


def _cuda_refused(reason):
    """CUDA will not be used although a GPU is there (or CUDA is required): a loud warning, or an
    error under CCNET_REQUIRE_CUDA=1."""
    message = f"CUDA not used, running on CPU: {reason}"
    if os.environ.get("CCNET_REQUIRE_CUDA", "0") == "1":
        raise RuntimeError(message + " (CCNET_REQUIRE_CUDA=1)")
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def configure():
    """Set Jittor's environment once per process (idempotent). Must run before ``import jittor``."""
    if _state:
        return _state
    if "jittor" in sys.modules:
        warnings.warn("jittor was imported before utils.runtime: its device/oneDNN setup may be wrong")
    choice = _choose_device()
    if not choice.use_cuda:
        if choice.gpu_unused or os.environ.get("CCNET_REQUIRE_CUDA", "0") == "1":
            _cuda_refused(choice.reason)
        os.environ.setdefault("nvcc_path", "")
    else:
        for name, value in CUDA_DOWNLOADS_OFF.items():
            os.environ.setdefault(name, value)
    if choice.cuda_setup is not None:
        os.environ["nvcc_path"] = choice.cuda_setup.nvcc_path
        sys.path.insert(0, choice.cuda_setup.jittor_root)
    _wire_python_config()
    os.environ.setdefault("log_silent", "1")
    os.environ.setdefault("FIX_TORCH_ERROR", "0")
    # Jittor's threaded operator compiler (each process runs it to compile or load its operators)
    # now and then crashed or hung a fresh run of the test suite here, always inside
    # parallel_compile_all_ops; compiling them one after another in the main thread never did.
    os.environ.setdefault("use_parallel_op_compiler", "0")

    onednn = False
    if os.environ.get("use_mkl", "1") == "1":
        onednn = _wire_onednn()
        if not onednn:
            os.environ["use_mkl"] = "0"     # otherwise Jittor tries an unreachable download
            warnings.warn(
                "oneDNN not found: CPU convolutions will be ~250x slower. "
                "Install it with: pip install onednn-cpu-gomp==2021.2.0 onednn-devel-cpu-gomp==2021.2.0",
                RuntimeWarning, stacklevel=2)
    _state.update(use_cuda=choice.use_cuda, device_reason=choice.reason, onednn_wired=onednn,
                  cuda_setup=choice.cuda_setup)
    return _state


def describe():
    """One short line: which device Jittor runs on, whether oneDNN (and on CUDA cuDNN / cuBLAS)
    are active."""
    import jittor as jt
    from jittor import compile_extern
    device = "cuda" if jt.flags.use_cuda else "cpu"
    onednn = "on" if compile_extern.mkl_ops is not None else "OFF (CPU convs ~250x slower)"
    line = f"ccnet-jittor: device={device} ({_state.get('device_reason', '?')}), oneDNN {onednn}"
    if jt.flags.use_cuda:
        for name in ("cudnn", "cublas"):
            line += f", {name} {'on' if getattr(compile_extern, name, None) is not None else 'OFF'}"
    return line


def activate(verbose=True):
    """Import Jittor with the configured environment, enable CUDA when chosen, report once."""
    configure()
    import jittor as jt
    if _state["use_cuda"]:
        if jt.has_cuda:
            jt.flags.use_cuda = 1
        elif not _state.get("refused"):
            _state["refused"] = True
            _cuda_refused(f"{_state['device_reason']}, but Jittor found no usable CUDA (see its log above)")
    if verbose and not _state.get("reported") and os.environ.get("CCNET_QUIET", "0") != "1":
        print(describe(), file=sys.stderr)
        _state["reported"] = True
    return jt


configure()

