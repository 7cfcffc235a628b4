"""CUDA for Jittor 1.3.11 where the only toolkit is CUDA 13.

Jittor 1.3.11 was written for CUDA <= 12; with a CUDA 13 toolkit its build breaks in the places
``PATCHES`` lists (each entry says why). The installed Jittor is never edited: ``prepare_jittor``
copies the installed ``jittor`` and ``jittor_utils`` packages into Jittor's cache folder once,
applies the patches to that copy (each marked, checked, idempotent) and returns the folder to put
first on ``sys.path``. Jittor keys its compile cache on the path of its own sources, so the copy
compiles into a cache of its own and the installed copy (used on CPU) is untouched.

Jittor also wants one CUDA home: nvcc as a file in ``bin/``, the headers in ``include/``,
``libcudart.so`` and the libraries in ``lib64/``. A toolkit assembled from pip wheels and the
cuBLAS / cuDNN / cuRAND wheels (nvidia-cublas, nvidia-cudnn-cu13, nvidia-curand) spread these over
several folders, so ``cuda_home`` builds one from symbolic links, with a ``bin/nvcc`` script that
runs the real nvcc (Jittor follows a symbolic link back to the real toolkit, a script it cannot).

Nothing here imports Jittor: ``utils.runtime`` calls ``setup`` before the first ``import jittor``.
"""
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

JITTOR_VERSION = "1.3.11"
PATCHED_CUDA_MAJOR = 13                # the CUDA major version the patches are written for
MARKER = "ccnet-jittor cuda13"         # every patched spot carries "<MARKER>: <patch name>"
# The libraries Jittor's CUDA ops link (matmul, convolution, random numbers) and their pip wheels.
CUDA_LIBRARIES = {"cublas": "nvidia-cublas", "cudnn": "nvidia-cudnn-cu13", "curand": "nvidia-curand"}


class CudaSetupError(RuntimeError):
    """CUDA cannot be set up; the message says why and what to install."""


@dataclass(frozen=True)
class Patch:
    """Replace ``old`` (exactly once each) by ``new`` in ``path`` (relative to site-packages)."""
    name: str
    path: str
    edits: tuple          # ((old, new), ...); the first new text carries the marker
    why: str


def _c_marker(name):
    return f"// {MARKER}: {name}\n"


def _py_marker(name):
    return f"  # {MARKER}: {name}"


PATCHES = (
    Patch(
        "device-attributes", "jittor/extern/cuda/inc/helper_cuda.h",
        (("#ifdef __CUDA_RUNTIME_H__\n// General GPU Device CUDA Initialization\n",
          "#ifdef __CUDA_RUNTIME_H__\n" + _c_marker("device-attributes")
          + "inline int jt_device_attribute(cudaDeviceAttr attr, int device) {\n"
            "  int value = 0;\n  cudaDeviceGetAttribute(&value, attr, device);\n  return value;\n}\n"
            "// General GPU Device CUDA Initialization\n"),
         ("if (deviceProp.computeMode == cudaComputeModeProhibited) {",
          "if (jt_device_attribute(cudaDevAttrComputeMode, devID) == cudaComputeModeProhibited) {"),
         ("if (deviceProp.computeMode != cudaComputeModeProhibited) {",
          "if (jt_device_attribute(cudaDevAttrComputeMode, current_device) != cudaComputeModeProhibited) {"),
         ("sm_per_multiproc * deviceProp.clockRate;",
          "sm_per_multiproc * jt_device_attribute(cudaDevAttrClockRate, current_device);"),
         ("(deviceProp.computeMode != cudaComputeModeProhibited)) {",
          "(jt_device_attribute(cudaDevAttrComputeMode, current_device) != cudaComputeModeProhibited)) {")),
        "CUDA 13 removed cudaDeviceProp::computeMode and ::clockRate; cudaDeviceGetAttribute "
        "returns the same values (and exists since CUDA 5)."),
    Patch(
        "nvcc-cxx17", "jittor/compiler.py",
        (('        nvcc_flags = nvcc_flags.replace("-Wall", "")\n',
          '        nvcc_flags = nvcc_flags.replace("-Wall", "")\n'
          '        nvcc_flags = nvcc_flags.replace("-std=c++14", "-std=c++17")' + _py_marker("nvcc-cxx17")
          + "\n"),),
        "CUB / Thrust / libcu++ of CUDA 13 (CCCL 3) refuse C++14, and Jittor hands its host "
        "-std=c++14 to nvcc too; host files compiled by g++ stay C++14."),
    Patch(
        "cub-where-iterators", "jittor/extern/cuda/cub/ops/cub_where_op.cc",
        (("    cub::CountingInputIterator<To> counting_itr(0);\n"
          "    cub::TransformInputIterator<bool, NonZeroOp<Ti>, Ti*> itr(cond->ptr<Ti>(), NonZeroOp<Ti>());\n",
          "    " + _c_marker("cub-where-iterators")
          + "    thrust::counting_iterator<To> counting_itr(0);\n"
            "    thrust::transform_iterator<NonZeroOp<Ti>, Ti*, bool> itr(cond->ptr<Ti>(), NonZeroOp<Ti>());\n"),
         ('#include <cub/cub.cuh>\n',
          '#include <cub/cub.cuh>\n#include <thrust/iterator/counting_iterator.h>\n'
          '#include <thrust/iterator/transform_iterator.h>\n')),
        "CCCL 3 removed cub::CountingInputIterator and cub::TransformInputIterator (jt.where and "
        "nonzero on CUDA); Thrust's iterators replace them (also in CUDA 11 / 12)."),
    Patch(
        "softmax-max-functor", "jittor/other/code_softmax.py",
        (("#include <type/fp16_compute.h>\n''', cuda_src=f'''\n",
          "#include <type/fp16_compute.h>\n" + _c_marker("softmax-max-functor")
          + "struct JtMaxOp {{ template <typename T> __device__ __forceinline__ T operator()(const T& a, "
            "const T& b) const {{ return a < b ? b : a; }} }};\n''', cuda_src=f'''\n"),
         ("Reduce(v1, cub::Max())", "Reduce(v1, JtMaxOp())")),
        "CCCL 3 removed cub::Max (softmax / log_softmax over the last dimension on CUDA, used by "
        "the cross-entropy loss); a local max functor works with any CUB."),
    Patch(
        "optional-cuda-libraries", "jittor/compile_extern.py",
        (("            LOG.f(msg)\n", "            LOG.w(msg)" + _py_marker("optional-cuda-libraries") + "\n"),),
        "A missing cuBLAS / cuDNN / cuRAND / cuFFT / cuSPARSE made `import jittor` fatal; as a "
        "warning Jittor runs its own CUDA kernels instead (utils.runtime reports which are on)."),
    Patch(
        "cudnn9-libraries", "jittor/compile_extern.py",
        (('                libs = ["libcudnn_ops_infer.so", "libcudnn_ops_train.so", '
          '"libcudnn_cnn_infer.so", "libcudnn_cnn_train.so"]\n',
          '                libs = ["libcudnn_graph.so", "libcudnn_ops.so", "libcudnn_cnn.so"]'
          + _py_marker("cudnn9-libraries") + "\n"),
         ("        for fname in f:\n            culib_src_files.append(os.path.join(r, fname))\n",
          "        for fname in f:\n"
          '            if not (lib_name == "cudnn" and "rnn" in fname):  # cuDNN 9: no legacy RNN API\n'
          "                culib_src_files.append(os.path.join(r, fname))\n")),
        "cuDNN 9 (the only cuDNN for CUDA 13) renamed its libraries (libcudnn_ops / cnn / graph "
        "instead of *_infer / *_train) and removed the legacy RNN API of Jittor's cudnn_rnn ops, "
        "which would fail the whole cuDNN module; convolutions keep the v7 API, which cuDNN 9 has."),
    Patch(
        "no-npp", "jittor/src/misc/cuda_limits.h",
        (("#ifdef IS_CUDA\n#include <npp.h>\n#include <math_constants.h>\n#else\n",
          "#ifdef IS_CUDA\n" + _c_marker("no-npp") + "#include <math_constants.h>\n"
          "#define NPP_MIN_32U ( 0 )\n#define NPP_MAX_32U ( 4294967295U )\n"
          "#define NPP_MIN_32S (-2147483647 - 1 )\n#define NPP_MAX_32S ( 2147483647 )\n"
          "#define NPP_MIN_64U ( 0 )\n#define NPP_MAX_64U ( 18446744073709551615ULL )\n"
          "#define NPP_MIN_64S (-9223372036854775807LL - 1)\n#define NPP_MAX_64S ( 9223372036854775807LL )\n"
          "#else\n"),),
        "Every CUDA kernel includes cuda_limits.h, which included <npp.h> only for eight integer "
        "limits; toolkits without NPP (pip wheels) lack it. The limits are defined here instead, "
        "with NPP's values."),
    Patch(
        "device-count-errors", "jittor/src/misc/cuda_flags.cc",
        (("    if (count==-1)\n        cudaGetDeviceCount(&count);\n",
          "    if (count==-1 && cudaGetDeviceCount(&count) != cudaSuccess) " + "count = 0;  "
          + _c_marker("device-count-errors")),),
        "With a toolkit but no usable driver cudaGetDeviceCount fails, and a static initialiser "
        "then aborted in cudaStreamCreate; an error now counts as no device."),
)


def apply_patches(root, patches=PATCHES):
    """Apply ``patches`` to the Jittor sources under ``root`` (a folder holding ``jittor/``).

    Idempotent: a file that already carries a patch's marker is left alone. Returns the names of
    the patches applied now. Raises CudaSetupError when an expected text is missing or not unique
    (not Jittor 1.3.11), before anything is written for that patch.
    """
    applied = []
    for patch in patches:
        path = Path(root) / patch.path
        text = path.read_text()
        if f"{MARKER}: {patch.name}" in text:
            continue
        for old, new in patch.edits:
            count = text.count(old)
            if count != 1:
                raise CudaSetupError(
                    f"patch {patch.name!r} does not fit {path}: expected text found {count} times "
                    f"instead of once (is this Jittor {JITTOR_VERSION}?): {old.strip()[:80]!r}")
            text = text.replace(old, new)
        path.write_text(text)
        applied.append(patch.name)
    return applied


def patch_digest(patches=PATCHES):
    """Short hash of the patch set: a new set gets a fresh copy (and a fresh compile cache)."""
    return hashlib.sha1(repr(patches).encode()).hexdigest()[:10]


def installed_jittor():
    """The folder that holds the installed ``jittor`` and ``jittor_utils`` packages (no import)."""
    spec = importlib.util.find_spec("jittor")
    if spec is None or not spec.submodule_search_locations:
        raise CudaSetupError("jittor is not installed (pip install jittor==1.3.11.0)")
    root = Path(list(spec.submodule_search_locations)[0]).parent
    version = re.search(r'__version__\s*=\s*["\']([\d.]+)', (root / "jittor" / "__init__.py").read_text())
    if version is None or not version.group(1).startswith(JITTOR_VERSION):
        raise CudaSetupError(f"the CUDA {PATCHED_CUDA_MAJOR} patches are written for Jittor {JITTOR_VERSION}, "
                             f"found {version.group(1) if version else 'an unknown version'} in {root}")
    if not (root / "jittor_utils").is_dir():
        raise CudaSetupError(f"jittor_utils is missing beside {root / 'jittor'}")
    return root


def _publish(build, final):
    """Move a finished folder into place atomically; another process may have won the race."""
    try:
        os.rename(build, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(build, ignore_errors=True)


def prepare_jittor(cache_root, source_root=None):
    """Folder holding a patched copy of Jittor (made once under ``cache_root``)."""
    source_root = Path(source_root) if source_root else installed_jittor()
    final = Path(cache_root) / f"jittor-{JITTOR_VERSION}-cuda{PATCHED_CUDA_MAJOR}-{patch_digest()}"
    if (final / "PATCHED").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    try:
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for package in ("jittor", "jittor_utils"):
            shutil.copytree(source_root / package, build / package, ignore=ignore)
        applied = apply_patches(build)
        (build / "PATCHED").write_text(f"Jittor {JITTOR_VERSION} from {source_root}, patches:\n"
                                       + "".join(f"  {name}\n" for name in applied))
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    _publish(build, final)
    return final


# ------------------------------------------------------------------------------------------------
# The CUDA home Jittor reads
# ------------------------------------------------------------------------------------------------

def nvcc_release(nvcc):
    """(major, minor) of an nvcc, or None when it does not answer."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def toolkit_dirs(nvcc):
    """(include dirs, library dirs) nvcc itself uses, read from its dry run (wrapper scripts and
    pip-wheel layouts included)."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError) as err:
        raise CudaSetupError(f"{nvcc} does not run: {err}") from err
    def flag_dirs(variable, flag):
        line = re.search(rf"^#\$ {variable}=(.*)$", out, re.M)
        found = re.findall(rf'"?{flag}([^"\s]+)"?', line.group(1)) if line else []
        return [Path(os.path.normpath(d)) for d in found if Path(d).is_dir() and not d.rstrip("/").endswith("stubs")]
    includes, libraries = flag_dirs("INCLUDES", "-I"), flag_dirs("LIBRARIES", "-L")
    if not includes or not libraries:
        raise CudaSetupError(f"could not read the include / library folders of {nvcc} from `nvcc --dryrun`")
    return includes, libraries


def wheel_library_dirs(paths=None):
    """(include, lib) folder pairs of the NVIDIA pip packages (``nvidia/<name>/include|lib``) on
    ``paths`` (default: sys.path)."""
    pairs = []
    for entry in (sys.path if paths is None else paths):
        for package in sorted(Path(entry or ".").glob("nvidia/*/")):
            if (package / "include").is_dir() and (package / "lib").is_dir():
                pairs.append((package / "include", package / "lib"))
    return pairs


def _is_library_file(name, prefixes):
    return name.startswith(tuple("lib" + p for p in prefixes)) and ".so" in name


def _link_entries(source, target, keep=lambda name: True):
    for entry in sorted(Path(source).iterdir()):
        link = target / entry.name
        if keep(entry.name) and not (link.exists() or link.is_symlink()):
            link.symlink_to(entry.resolve())


def cuda_home(nvcc, cache_root, library_pairs=None):
    """A CUDA home for Jittor under ``cache_root``: bin/nvcc (runs ``nvcc``), include/ and lib64/
    with the toolkit's files plus cuBLAS / cuDNN / cuRAND from pip wheels where the toolkit lacks
    them. Returns the path of its bin/nvcc."""
    real_nvcc = Path(shutil.which(nvcc) or nvcc).resolve()
    includes, libraries = toolkit_dirs(str(real_nvcc))
    pairs = wheel_library_dirs() if library_pairs is None else library_pairs
    key = hashlib.sha1(repr((str(real_nvcc), includes, libraries, pairs)).encode()).hexdigest()[:10]
    final = Path(cache_root) / f"cuda-home-{key}"
    if (final / "bin" / "nvcc").is_file():
        return final / "bin" / "nvcc"
    final.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    try:
        for sub in ("bin", "include", "lib64"):
            (build / sub).mkdir()
        script = build / "bin" / "nvcc"
        script.write_text(f'#!/bin/sh\nexec "{real_nvcc}" "$@"\n')
        script.chmod(0o755)
        for folder in includes:
            _link_entries(folder, build / "include")
        for folder in libraries:
            _link_entries(folder, build / "lib64", lambda name: ".so" in name or name.endswith(".a"))
        prefixes = tuple(CUDA_LIBRARIES)
        for include, lib in pairs:
            _link_entries(include, build / "include", lambda name: name.startswith(prefixes))
            _link_entries(lib, build / "lib64", lambda name: _is_library_file(name, prefixes + ("cudart",)))
        # Jittor looks for libX.so; wheels ship only libX.so.<major>
        for lib in list((build / "lib64").iterdir()):
            unversioned = build / "lib64" / re.sub(r"\.so\..*$", ".so", lib.name)
            if not (unversioned.exists() or unversioned.is_symlink()):
                unversioned.symlink_to(lib.resolve())
        if not (build / "lib64" / "libcudart.so").exists():
            raise CudaSetupError(f"libcudart.so not found in {', '.join(map(str, libraries))} "
                                 f"(pip install nvidia-cuda-runtime)")
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    _publish(build, final)
    return final / "bin" / "nvcc"


def available_libraries(nvcc_path):
    """Which of CUDA_LIBRARIES the CUDA home of ``nvcc_path`` provides (header and library)."""
    home = Path(nvcc_path).parent.parent
    return {name: (home / "include" / f"{name}.h").exists() and (home / "lib64" / f"lib{name}.so").exists()
            for name in CUDA_LIBRARIES}


@dataclass(frozen=True)
class CudaSetup:
    nvcc_path: str         # what Jittor gets as nvcc_path (bin/nvcc of the CUDA home)
    jittor_root: str       # folder to put first on sys.path: the patched copy of Jittor
    libraries: dict        # {"cublas": True, ...}: what the CUDA home provides


def setup(nvcc, cache_root):
    """Prepare Jittor for the CUDA 13 toolkit of ``nvcc``: a CUDA home and the patched copy.
    Raises CudaSetupError with the reason when that cannot be done."""
    release = nvcc_release(nvcc)
    if release is None or release[0] != PATCHED_CUDA_MAJOR:
        raise CudaSetupError(f"{nvcc} is CUDA {release[0] if release else '?'}; the patched set-up is for "
                             f"CUDA {PATCHED_CUDA_MAJOR} (Jittor {JITTOR_VERSION} builds as it is with CUDA <= 12)")
    nvcc_path = cuda_home(nvcc, cache_root)
    return CudaSetup(str(nvcc_path), str(prepare_jittor(cache_root)), available_libraries(nvcc_path))
