"""The CUDA kernels of the criss-cross attention op compile with nvcc; no GPU needed.

Every kernel from ``cuda_kernel_sources()`` goes through Jittor's own jt.code template
(jittor/src/ops/code_op.cc, expanded by Jittor's precompiler the way a CUDA launch expands it),
so the source sees exactly the names a launch declares (in0_p, in0_type, in0_shape0, out0_p, ...)
and float16 is Jittor's CUDA half type. Compiled with ``nvcc -c`` for sm_90 (H100 / H200) and
sm_75 (the oldest architecture CUDA 13 still builds). A type or syntax error in the CUDA source
fails here, before a GPU ever sees it.
"""
import os
import shutil
import subprocess
from collections import defaultdict

import pytest

import jittor as jt
from models import cc_attention as cca

ARCHS = ("90", "75")
NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA kernels cannot be compiled here")
JITTOR_SRC = os.path.join(os.path.dirname(jt.__file__), "src")


def jit_source(dtype, header, codes):
    """The .cu Jittor writes for a jt.code launch on CUDA with two 5-D inputs and one 5-D output
    (mirrors OpCompiler::get_jit_src and the float16 pass); ``codes`` run one after the other."""
    keys = {"JIT": "1", "JIT_cuda": "1", "index_t": "int32", "IN_SIZE": "2", "OUT_SIZE": "1"}
    for name in ("in0", "in1", "out0"):
        keys.update({f"{name}_dim": "5", f"{name}_type": dtype})
    code = "\n".join("{\n" + c + "\n}" for c in codes)
    with open(os.path.join(JITTOR_SRC, "ops", "code_op.cc")) as f:
        body = jt.core.op_compiler.precompile(dict(keys, HEADER=header, CODE=code), f.read())

    def after_last_include(text, insert):
        at = text.find("\n", text.rfind("#include")) + 1
        return text[:at] + insert + text[at:]
    defines = lambda jit: "".join(f"#define {k} {v}\n" for k, v in keys.items() if k.startswith("JIT") == jit)
    source = defines(True) + after_last_include(body, defines(False))
    if "float16" in source:
        source = after_last_include(source, '#include "type/fp16_compute.h"\n')
    return source


def nvcc_compile(source, archs=ARCHS):
    """``nvcc -c`` with the flags Jittor's CUDA build uses; returns (object path, CompletedProcess)."""
    obj = source.with_suffix(".o")
    arch_flags = [f for a in archs for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
    cmd = [NVCC, "-c", "-x", "cu", "-std=c++17", "--use_fast_math", "-DHAS_CUDA", "-DIS_CUDA",
           f"-I{JITTOR_SRC}", f"-I{os.path.join(os.path.dirname(JITTOR_SRC), 'extern', 'cuda', 'inc')}",
           *arch_flags, str(source), "-o", str(obj)]
    return obj, subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def kernel_groups():
    """{(dtype, header): [cuda_src, ...]}: kernels sharing a header compile as one file."""
    groups = defaultdict(list)
    for _, dtype, header, src in cca.cuda_kernel_sources():
        groups[(dtype, header)].append(src)
    return groups


def test_every_primitive_and_dtype_is_listed():
    listed = {(kind, dtype) for kind, dtype, _, _ in cca.cuda_kernel_sources()}
    assert listed == {(k, d) for k in ("energy", "gather", "scatter") for d in ("float16", "float32", "float64")}


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_cuda_kernels_compile_with_nvcc(dtype, tmp_path):
    groups = {key: srcs for key, srcs in kernel_groups().items() if key[0] == dtype}
    for index, ((_, header), srcs) in enumerate(groups.items()):
        source = tmp_path / f"cca_{dtype}_{index}.cu"
        source.write_text(jit_source(dtype, header, srcs))
        obj, result = nvcc_compile(source)
        assert result.returncode == 0, f"{source}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        # one device stub per launched kernel instance: none of the launches was dropped
        symbols = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True).stdout
        stubs = {line.split("__device_stub_", 1)[1].split("(")[0] for line in symbols.splitlines()
                 if "__device_stub_" in line and "guard variable" not in line}
        assert len(stubs) >= len(srcs), symbols


def test_compile_check_catches_a_bad_kernel(tmp_path):
    """The harness itself: a kernel calling an undeclared name must fail to compile."""
    _, dtype, header, src = cca.cuda_kernel_sources()[0]
    source = tmp_path / "broken.cu"
    source.write_text(jit_source(dtype, header, [src.replace("in0_p", "in0_pointer")]))
    _, result = nvcc_compile(source, archs=("75",))
    assert result.returncode != 0 and "in0_pointer" in result.stdout + result.stderr
