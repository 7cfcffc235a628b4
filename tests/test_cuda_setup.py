"""utils.cuda_setup: the CUDA 13 patches of Jittor 1.3.11 and the CUDA home Jittor reads.

The patches are applied to a copy of the installed Jittor (never to the installed one) and the
patched CUDA code is compiled here with nvcc / g++ against the CUDA toolkit on PATH, so the
patches are known to compile before a GPU sees them; where the toolkit is CUDA 13, the unpatched
code is shown to fail. Those compile checks are skipped without nvcc.
"""
import ast
import importlib.util
import os
import py_compile
import shutil
import subprocess
import types
from pathlib import Path

import pytest

from cuda_compile import NVCC, NVCC_RELEASE, code_op_source, failure, jit_source, nvcc_compile
from utils import cuda_setup, runtime

INSTALLED = cuda_setup.installed_jittor()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found: patched CUDA code cannot be compiled here")
on_cuda13 = pytest.mark.skipif(not NVCC_RELEASE or NVCC_RELEASE[0] != 13,
                               reason="shows the unpatched failure, which needs a CUDA 13 toolkit")


@pytest.fixture(scope="module")
def patched(tmp_path_factory):
    """A patched copy made by prepare_jittor (a folder holding jittor/ and jittor_utils/)."""
    return cuda_setup.prepare_jittor(tmp_path_factory.mktemp("cache"), INSTALLED)


def copy_patched_files(destination):
    for path in {p.path for p in cuda_setup.PATCHES}:
        (destination / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(INSTALLED / path, destination / path)


# ------------------------------------------------------------------------------------------------
# Applying the patches
# ------------------------------------------------------------------------------------------------

def test_patches_apply_once_and_are_marked(tmp_path):
    copy_patched_files(tmp_path)
    assert cuda_setup.apply_patches(tmp_path) == [p.name for p in cuda_setup.PATCHES]
    before = {p.path: (tmp_path / p.path).read_text() for p in cuda_setup.PATCHES}
    assert cuda_setup.apply_patches(tmp_path) == []                  # idempotent
    assert before == {p.path: (tmp_path / p.path).read_text() for p in cuda_setup.PATCHES}
    for patch in cuda_setup.PATCHES:
        text = before[patch.path]
        assert f"{cuda_setup.MARKER}: {patch.name}" in text
        assert all(new in text for _, new in patch.edits)
        if patch.path.endswith(".py"):
            py_compile.compile(str(tmp_path / patch.path), doraise=True)


def test_installed_jittor_is_never_patched(patched):
    for patch in cuda_setup.PATCHES:
        assert cuda_setup.MARKER not in (INSTALLED / patch.path).read_text()
        assert cuda_setup.MARKER in (patched / patch.path).read_text()


def test_a_patch_that_does_not_fit_is_an_error_and_writes_nothing(tmp_path):
    copy_patched_files(tmp_path)
    target = tmp_path / "jittor" / "other" / "code_softmax.py"
    target.write_text(target.read_text().replace("cub::Max()", "cub::Maximum()"))
    before = target.read_text()
    with pytest.raises(cuda_setup.CudaSetupError, match=r"softmax-max-functor.*code_softmax.py.*0 times"):
        cuda_setup.apply_patches(tmp_path)
    assert target.read_text() == before


def test_prepare_jittor_makes_one_marked_copy(patched):
    assert patched.name.endswith(cuda_setup.patch_digest())
    stamp = (patched / "PATCHED").read_text()
    assert all(p.name in stamp for p in cuda_setup.PATCHES)
    assert (patched / "jittor" / "__init__.py").is_file() and (patched / "jittor_utils" / "__init__.py").is_file()
    assert not list(patched.rglob("__pycache__"))
    assert cuda_setup.prepare_jittor(patched.parent, INSTALLED) == patched       # made once
    assert [d.name for d in patched.parent.iterdir()] == [patched.name]          # no leftovers


def test_patched_nvcc_flags_use_cxx17(patched):
    """The patched convert_nvcc_flags (jittor/compiler.py) turns the host -std=c++14 into C++17."""
    tree = ast.parse((patched / "jittor" / "compiler.py").read_text())
    function = next(node for node in ast.walk(tree)
                    if isinstance(node, ast.FunctionDef) and node.name == "convert_nvcc_flags")
    namespace = {"os": os, "cc_path": "/usr/bin/g++", "jittor_path": str(patched / "jittor"),
                 "nvcc_version": [13, 0, 88]}
    exec(compile(ast.Module([function], []), "compiler.py", "exec"), namespace)
    flags = namespace["convert_nvcc_flags"](" -Wall -std=c++14 -fPIC ")
    assert "-std=c++17" in flags and "-std=c++14" not in flags


def test_cudnn9_library_names_and_no_legacy_rnn(patched):
    text = (patched / "jittor" / "compile_extern.py").read_text()
    assert '"libcudnn_ops_infer.so"' not in text and '"libcudnn_cnn.so"' in text
    assert 'if not (lib_name == "cudnn" and "rnn" in fname)' in text
    assert "LOG.f(msg)" not in text                     # missing libraries are warnings


# ------------------------------------------------------------------------------------------------
# Compiling the patched CUDA code
# ------------------------------------------------------------------------------------------------

def toolkit_include():
    return [str(d) for d in cuda_setup.toolkit_dirs(NVCC)[0]]


def gxx_syntax_check(jittor_dir, source):
    cmd = ["g++", "-std=c++14", "-fsyntax-only", "-DHAS_CUDA", "-DIS_CUDA",
           *(f"-I{d}" for d in [*toolkit_include(), jittor_dir / "src", jittor_dir / "extern" / "cuda" / "inc"]),
           str(source)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@needs_nvcc
def test_device_attributes_compile(patched):
    helper = patched / "jittor" / "extern" / "cuda" / "src" / "helper_cuda.cc"
    result = gxx_syntax_check(patched / "jittor", helper)
    assert result.returncode == 0, failure(helper, result)


@needs_nvcc
@on_cuda13
def test_device_attributes_unpatched_fail_on_cuda13():
    result = gxx_syntax_check(INSTALLED / "jittor", INSTALLED / "jittor" / "extern" / "cuda" / "src" / "helper_cuda.cc")
    assert result.returncode != 0 and "computeMode" in result.stderr


@needs_nvcc
def test_device_count_errors_count_as_no_device(patched, tmp_path):
    """Jittor's get_device_count, as patched, in a program of its own: with no usable driver
    (this machine) it answers 0, where CUDA leaves the count at -1 and Jittor took that for a GPU."""
    text = (patched / "jittor" / "src" / "misc" / "cuda_flags.cc").read_text()
    start = text.index("int get_device_count() {")
    function = text[start:text.index("\n}\n", start) + 3]
    program = tmp_path / "device_count.cc"
    program.write_text("#include <cuda_runtime.h>\n#include <cstdio>\n" + function
                       + 'int main() { printf("%d\\n", get_device_count()); }\n')
    lib_dir = str(cuda_setup.toolkit_dirs(NVCC)[1][0])
    build = subprocess.run(["g++", str(program), *(f"-I{d}" for d in toolkit_include()), f"-L{lib_dir}",
                            "-lcudart", f"-Wl,-rpath,{lib_dir}", "-o", str(tmp_path / "device_count")],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    count = int(subprocess.run([str(tmp_path / "device_count")], capture_output=True, text=True).stdout)
    assert count == runtime._cuda_device_count()       # what the driver says: 0 without one


LIMITS_KERNEL = r"""
#include "misc/cuda_limits.h"
__global__ void limits(long long* out) {
    out[0] = numeric_max<int>(); out[1] = numeric_min<long long>(); out[2] = numeric_max<unsigned int>();
}
"""


@needs_nvcc
@pytest.mark.parametrize("which", ["patched", pytest.param("installed", marks=on_cuda13)])
def test_cuda_limits_without_npp(patched, which, tmp_path):
    """Every CUDA kernel includes misc/cuda_limits.h; patched, it needs no <npp.h>."""
    if which == "installed" and any((Path(d) / "npp.h").exists() for d in toolkit_include()):
        pytest.skip("this toolkit has npp.h, so the unpatched header compiles too")
    jittor_dir = (patched if which == "patched" else INSTALLED) / "jittor"
    source = tmp_path / "limits.cu"
    source.write_text(LIMITS_KERNEL)
    _, result = nvcc_compile(source, jittor_dir, archs=("75",))
    if which == "patched":
        assert result.returncode == 0, failure(source, result)
    else:
        assert result.returncode != 0 and "npp.h" in result.stderr + result.stdout


def where_op_source(jittor_dir):
    op = jittor_dir / "extern" / "cuda" / "cub" / "ops" / "cub_where_op.cc"
    keys = {"JIT": "1", "JIT_cuda": "1", "index_t": "int32", "Ti": "bool", "To": "int32", "NDIM": "2"}
    return jit_source(op.read_text(), keys), [op.parent, op.parent.parent / "inc"]


@needs_nvcc
@pytest.mark.parametrize("which", ["patched", pytest.param("installed", marks=on_cuda13)])
def test_cub_where_op_compiles(patched, which, tmp_path):
    """jt.where / nonzero on CUDA (the jit source of CubWhereOp for bool -> int32, 2-D)."""
    jittor_dir = (patched if which == "patched" else INSTALLED) / "jittor"
    text, includes = where_op_source(jittor_dir)
    source = tmp_path / "cub_where.cu"
    source.write_text(text)
    _, result = nvcc_compile(source, jittor_dir, archs=("90",), include_dirs=includes)
    if which == "patched":
        assert result.returncode == 0, failure(source, result)
    else:
        assert result.returncode != 0 and "CountingInputIterator" in result.stdout + result.stderr


def softmax_kernel_source(jittor_dir, length=1000):
    """The jt.code source softmax_v1 generates (jittor/other/code_softmax.py) for rows of
    ``length``, captured by running it with jt.code replaced by a recorder."""
    spec = importlib.util.spec_from_file_location("code_softmax_under_test",
                                                  jittor_dir / "other" / "code_softmax.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    captured = {}

    class Function:
        def __call__(self, *args):
            return self.execute(*args)

    module.jt = types.SimpleNamespace(Function=Function, compile_extern=types.SimpleNamespace(cub_home=""),
                                      code=lambda shape, dtype, inputs, **kw: captured.update(kw))
    module.can_softmax_v1 = lambda *args: True
    module.softmax_v1(types.SimpleNamespace(shape=(4, length), dtype="float32"))
    return code_op_source(str(jittor_dir), captured["cuda_header"], captured["cuda_src"],
                          [("float32", 2)], [("float32", 2)])


@needs_nvcc
@pytest.mark.parametrize("which", ["patched", pytest.param("installed", marks=on_cuda13)])
def test_softmax_kernel_compiles(patched, which, tmp_path):
    """softmax / log_softmax over the last dimension on CUDA (used by the cross-entropy loss)."""
    jittor_dir = (patched if which == "patched" else INSTALLED) / "jittor"
    source = tmp_path / "softmax.cu"
    source.write_text(softmax_kernel_source(jittor_dir))
    _, result = nvcc_compile(source, jittor_dir, archs=("90",))
    if which == "patched":
        assert result.returncode == 0, failure(source, result)
    else:
        assert result.returncode != 0 and "cub" in result.stderr + result.stdout and "Max" in result.stderr + result.stdout


# ------------------------------------------------------------------------------------------------
# The CUDA home
# ------------------------------------------------------------------------------------------------

def fake_toolkit(root, release="13.0", with_cudart=True):
    """A toolkit laid out like the pip wheels (include/, lib/ with libX.so.N) and an nvcc that
    answers --version and --dryrun like the real one."""
    include, lib = root / "toolkit" / "include", root / "toolkit" / "lib"
    include.mkdir(parents=True)
    lib.mkdir()
    (include / "cuda_runtime.h").write_text("// runtime\n")
    if with_cudart:
        (lib / "libcudart.so.13").write_text("")
    nvcc = root / "toolkit" / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text(f"""#!/bin/sh
case "$1" in
  --version) echo "Cuda compilation tools, release {release}, V{release}.88";;
  --dryrun) echo '#$ INCLUDES="-I{include}"' >&2; echo '#$ LIBRARIES=  "-L{lib}/stubs" "-L{lib}"' >&2;;
esac
""")
    nvcc.chmod(0o755)
    return nvcc


def fake_wheels(root):
    """nvidia/cu13 (cuBLAS, cuRAND) and nvidia/cudnn folders as the pip wheels install them."""
    pairs = []
    for package, names in (("cu13", ("cublas", "curand")), ("cudnn", ("cudnn", "cudnn_ops", "cudnn_cnn"))):
        include, lib = root / "site" / "nvidia" / package / "include", root / "site" / "nvidia" / package / "lib"
        include.mkdir(parents=True)
        lib.mkdir()
        for name in names:
            (include / f"{name}.h").write_text("")
            (lib / f"lib{name}.so.{9 if 'cudnn' in name else 13}").write_text("")
        (lib / "libnvblas.so.13").write_text("")            # not a library Jittor uses
        pairs.append((include, lib))
    return pairs


def test_cuda_home_merges_toolkit_and_wheels(tmp_path):
    nvcc = fake_toolkit(tmp_path)
    pairs = fake_wheels(tmp_path)
    assert sorted(cuda_setup.wheel_library_dirs([tmp_path / "site"])) == sorted(pairs)
    home_nvcc = cuda_setup.cuda_home(str(nvcc), tmp_path / "cache", pairs)
    home = home_nvcc.parent.parent
    # bin/nvcc is a script (Jittor would follow a symbolic link back to the toolkit)
    assert not home_nvcc.is_symlink()
    version = subprocess.run([str(home_nvcc), "--version"], capture_output=True, text=True).stdout
    assert "release 13.0" in version
    assert (home / "include" / "cuda_runtime.h").resolve() == (tmp_path / "toolkit" / "include" / "cuda_runtime.h")
    for name in ("cublas", "curand", "cudnn"):
        assert (home / "include" / f"{name}.h").exists()
    # Jittor looks for libX.so; the wheels ship libX.so.N
    for name in ("libcudart.so", "libcublas.so", "libcudnn.so", "libcudnn_ops.so", "libcudnn_cnn.so.9"):
        assert (home / "lib64" / name).exists(), name
    assert not (home / "lib64" / "libnvblas.so").exists()
    assert cuda_setup.available_libraries(str(home_nvcc)) == {"cublas": True, "cudnn": True, "curand": True}
    # made once: the same inputs give the same home
    assert cuda_setup.cuda_home(str(nvcc), tmp_path / "cache", pairs) == home_nvcc


def test_cuda_home_without_cudart_is_an_error(tmp_path):
    nvcc = fake_toolkit(tmp_path, with_cudart=False)
    with pytest.raises(cuda_setup.CudaSetupError, match="libcudart.so not found"):
        cuda_setup.cuda_home(str(nvcc), tmp_path / "cache", [])
    assert not list((tmp_path / "cache").iterdir())          # nothing half-built left behind


def test_cuda_home_reports_missing_libraries(tmp_path):
    home_nvcc = cuda_setup.cuda_home(str(fake_toolkit(tmp_path)), tmp_path / "cache", [])
    assert cuda_setup.available_libraries(str(home_nvcc)) == {"cublas": False, "cudnn": False, "curand": False}


@pytest.mark.parametrize("release", ["12.4", "14.0"])
def test_setup_is_only_for_cuda13(tmp_path, release):
    with pytest.raises(cuda_setup.CudaSetupError, match=f"CUDA {release.split('.')[0]}; the patched set-up is for CUDA 13"):
        cuda_setup.setup(str(fake_toolkit(tmp_path, release)), tmp_path / "cache")


def test_setup_for_cuda13(tmp_path, monkeypatch):
    monkeypatch.setattr(cuda_setup, "wheel_library_dirs", lambda paths=None: fake_wheels(tmp_path))
    prepared = cuda_setup.setup(str(fake_toolkit(tmp_path)), tmp_path / "cache")
    assert prepared.nvcc_path.endswith("/bin/nvcc") and os.path.isfile(prepared.nvcc_path)
    assert Path(prepared.jittor_root).parent == tmp_path / "cache"
    assert (Path(prepared.jittor_root) / "PATCHED").is_file()
    assert all(prepared.libraries.values())


@needs_nvcc
def test_toolkit_dirs_of_the_real_nvcc():
    includes, libraries = cuda_setup.toolkit_dirs(NVCC)
    assert any((d / "cuda_runtime.h").is_file() for d in includes)
    assert any(list(d.glob("libcudart.so*")) for d in libraries)
    assert not any(str(d).endswith("stubs") for d in libraries)
