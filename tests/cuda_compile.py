"""Compiling CUDA code the way Jittor would, without a GPU (shared by the compile-check tests).

``jit_source`` writes the .cu file Jittor generates for one op launch: the op's source (e.g.
jittor/src/ops/code_op.cc for jt.code) expanded by Jittor's own precompiler with the op's jit keys,
the keys #defined as OpCompiler::get_jit_src does, and float16's header added as Jittor's float16
pass does. ``nvcc_compile`` runs ``nvcc -c`` with the flags of Jittor's CUDA build.
"""
import os
import shutil
import subprocess

import jittor as jt
from utils import cuda_setup

NVCC = shutil.which("nvcc")
NVCC_RELEASE = cuda_setup.nvcc_release(NVCC) if NVCC else None
ARCHS = ("90", "75")     # H100 / H200, and the oldest architecture CUDA 13 still builds


def _after_last_include(text, insert):
    at = text.find("\n", text.rfind("#include")) + 1
    return text[:at] + insert + text[at:]


def jit_source(op_source, keys):
    """The jit .cu of an op: ``op_source`` (text) expanded with the jit ``keys`` (dict)."""
    body = jt.core.op_compiler.precompile(keys, op_source)
    def defines(jit):
        return "".join(f"#define {k} {v}\n" for k, v in keys.items()
                       if k.startswith("JIT") == jit and k not in ("CODE", "HEADER"))
    source = defines(True) + _after_last_include(body, defines(False))
    if "float16" in source:
        source = _after_last_include(source, '#include "type/fp16_compute.h"\n')
    return source


def _split_leading_functions(code):
    """CodeOp::jit_prepare moves the functions a source starts with (e.g. a ``__global__``
    kernel: text starting with '_', up to its balanced closing brace) into the header."""
    moved, i = [], 0
    while i < len(code):
        if code[i] in " \t\n":
            moved.append(code[i])
        elif code[i] == "_":
            depth = 0
            while i < len(code):
                moved.append(code[i])
                depth += {"{": 1, "}": -1}.get(code[i], 0)
                if code[i] == "}" and depth == 0:
                    break
                i += 1
        else:
            break
        i += 1
    return "".join(moved), code[i:]


def code_op_source(jittor_dir, header, code, inputs, outputs):
    """The jit .cu of a jt.code launch on CUDA; ``inputs`` / ``outputs``: [(dtype, rank), ...]."""
    functions, code = _split_leading_functions(code)
    keys = {"JIT": "1", "JIT_cuda": "1", "index_t": "int32", "IN_SIZE": str(len(inputs)),
            "OUT_SIZE": str(len(outputs)), "HEADER": f"{header}\nnamespace jittor {{\n{functions}}}", "CODE": code}
    for prefix, vars_ in (("in", inputs), ("out", outputs)):
        for i, (dtype, rank) in enumerate(vars_):
            keys.update({f"{prefix}{i}_dim": str(rank), f"{prefix}{i}_type": dtype})
    with open(os.path.join(jittor_dir, "src", "ops", "code_op.cc")) as f:
        return jit_source(f.read(), keys)


def nvcc_compile(source, jittor_dir, archs=ARCHS, include_dirs=()):
    """``nvcc -c`` of ``source`` (a Path) as Jittor's CUDA build compiles it (C++17: CUDA 13's CUB
    needs it); returns (object path, CompletedProcess)."""
    obj = source.with_suffix(".o")
    arch_flags = [f for a in archs for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
    includes = [os.path.join(jittor_dir, "src"), os.path.join(jittor_dir, "extern", "cuda", "inc"), *include_dirs]
    cmd = [NVCC, "-c", "-x", "cu", "-std=c++17", "--use_fast_math", "-DHAS_CUDA", "-DIS_CUDA",
           *(f"-I{d}" for d in includes), *arch_flags, str(source), "-o", str(obj)]
    return obj, subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def failure(source, result):
    return f"{source}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
