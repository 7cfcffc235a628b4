"""Configure Jittor *before* it is imported.

Every entry point and package of ccnet-jittor imports this module first (``utils/__init__.py``
does it), so ``import jittor`` anywhere in the project sees the environment chosen here.
What it decides, following ../shared/JITTOR.md:

* device: CUDA only when a GPU answers through ``libcuda.so.1`` *and* an nvcc of CUDA <= 12 is
  found (Jittor 1.3.11 cannot build against CUDA 13); otherwise CPU (``nvcc_path=""``), because a
  plain ``import jittor`` crashes on machines with nvcc but no CUDA runtime.
* oneDNN: Jittor would download oneDNN 2.2 from a server we cannot reach; instead we point its
  cache folder at the ``onednn-cpu-gomp`` wheels (or Debian's libdnnl). Without oneDNN, CPU
  convolutions are ~250x slower, so that case gets a loud warning.
* quiet start-up (``log_silent=1``) and no torch import at start-up (``FIX_TORCH_ERROR=0``).

Any of these environment variables that the user set already wins: we only fill in defaults.
"""
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

MAX_CUDA_MAJOR = 12          # Jittor 1.3.11 does not compile against CUDA 13 headers
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


def _nvcc_major(nvcc):
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.", out)
    return int(match.group(1)) if match else None


def _choose_device():
    """Return (use_cuda, reason). Never raises."""
    if "nvcc_path" in os.environ:                       # the user decided
        return bool(os.environ["nvcc_path"]), "nvcc_path set by the user"
    gpus = _cuda_device_count()
    if gpus == 0:
        return False, "no CUDA GPU"
    nvcc = _find_nvcc()
    if nvcc is None:
        return False, f"{gpus} GPU(s) but no nvcc found"
    major = _nvcc_major(nvcc)
    if major is None or major > MAX_CUDA_MAJOR:
        return False, f"{gpus} GPU(s) but {nvcc} is CUDA {major}; Jittor 1.3.11 needs CUDA <= {MAX_CUDA_MAJOR}"
    return True, f"{gpus} GPU(s), {nvcc} (CUDA {major})"


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


def configure():
    """Set Jittor's environment once per process (idempotent). Must run before ``import jittor``."""
    if _state:
        return _state
    if "jittor" in sys.modules:
        warnings.warn("jittor was imported before utils.runtime: its device/oneDNN setup may be wrong")
    use_cuda, device_reason = _choose_device()
    if not use_cuda:
        os.environ.setdefault("nvcc_path", "")
    os.environ.setdefault("log_silent", "1")
    os.environ.setdefault("FIX_TORCH_ERROR", "0")

    onednn = False
    if os.environ.get("use_mkl", "1") == "1":
        onednn = _wire_onednn()
        if not onednn:
            os.environ["use_mkl"] = "0"     # otherwise Jittor tries an unreachable download
            warnings.warn(
                "oneDNN not found: CPU convolutions will be ~250x slower. "
                "Install it with: pip install onednn-cpu-gomp==2021.2.0 onednn-devel-cpu-gomp==2021.2.0",
                RuntimeWarning, stacklevel=2)
    _state.update(use_cuda=use_cuda, device_reason=device_reason, onednn_wired=onednn)
    return _state


def describe():
    """One short line: which device Jittor runs on and whether oneDNN is active."""
    import jittor as jt
    from jittor import compile_extern
    device = "cuda" if jt.flags.use_cuda else "cpu"
    onednn = "on" if compile_extern.mkl_ops is not None else "OFF (CPU convs ~250x slower)"
    return f"ccnet-jittor: device={device} ({_state.get('device_reason', '?')}), oneDNN {onednn}"


def activate(verbose=True):
    """Import Jittor with the configured environment, enable CUDA when chosen, report once."""
    configure()
    import jittor as jt
    if _state["use_cuda"] and jt.has_cuda:
        jt.flags.use_cuda = 1
    if verbose and not _state.get("reported") and os.environ.get("CCNET_QUIET", "0") != "1":
        print(describe(), file=sys.stderr)
        _state["reported"] = True
    return jt


configure()

