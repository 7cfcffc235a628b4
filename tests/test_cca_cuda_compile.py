"""The CUDA kernels of the criss-cross attention op compile with nvcc; no GPU needed.

Every kernel from ``cuda_kernel_sources()`` goes through Jittor's own jt.code template, expanded
the way a CUDA launch expands it (tests/cuda_compile.py), so the source sees exactly the names a
launch declares (in0_p, in0_type, in0_shape0, out0_p, ...) and float16 is Jittor's CUDA half type.
Compiled with ``nvcc -c`` for sm_90 and sm_75. A type or syntax error in the CUDA source fails
here, before a GPU ever sees it.
"""
import os
import subprocess
from collections import defaultdict

import pytest

import jittor as jt
from cuda_compile import NVCC, code_op_source, failure, nvcc_compile
from models import cc_attention as cca

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA kernels cannot be compiled here")
JITTOR_DIR = os.path.dirname(jt.__file__)
RANK = 5            # every primitive takes two 5-D inputs and writes one 5-D output


def kernel_source(dtype, header, codes):
    """One .cu for kernels that share a header: their launches run one after the other."""
    code = "\n".join("{\n" + c + "\n}" for c in codes)
    return code_op_source(JITTOR_DIR, header, code, [(dtype, RANK)] * 2, [(dtype, RANK)])


def test_every_primitive_and_dtype_is_listed():
    listed = {(kind, dtype) for kind, dtype, _, _ in cca.cuda_kernel_sources()}
    assert listed == {(k, d) for k in ("energy", "gather", "scatter") for d in ("float16", "float32", "float64")}


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_cuda_kernels_compile_with_nvcc(dtype, tmp_path):
    groups = defaultdict(list)
    for _, kernel_dtype, header, src in cca.cuda_kernel_sources():
        if kernel_dtype == dtype:
            groups[header].append(src)
    for index, (header, codes) in enumerate(groups.items()):
        source = tmp_path / f"cca_{dtype}_{index}.cu"
        source.write_text(kernel_source(dtype, header, codes))
        obj, result = nvcc_compile(source, JITTOR_DIR)
        assert result.returncode == 0, failure(source, result)
        # one device stub per launched kernel instance: none of the launches was dropped
        symbols = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True).stdout
        stubs = {line.split("__device_stub_", 1)[1].split("(")[0] for line in symbols.splitlines()
                 if "__device_stub_" in line and "guard variable" not in line}
        assert len(stubs) >= len(codes), symbols


def test_compile_check_catches_a_bad_kernel(tmp_path):
    """The harness itself: a kernel calling an undeclared name must fail to compile."""
    _, dtype, header, src = cca.cuda_kernel_sources()[0]
    source = tmp_path / "broken.cu"
    source.write_text(kernel_source(dtype, header, [src.replace("in0_p", "in0_pointer")]))
    _, result = nvcc_compile(source, JITTOR_DIR, archs=("75",))
    assert result.returncode != 0 and "in0_pointer" in result.stdout + result.stderr
