"""Criss-cross attention benchmarks: the module and its kernels against PyTorch, and RCCA vs Non-local.

Sections (``--sections``, all three by default):

* ``module``: one ``CrissCrossAttention(C)`` (its three 1x1 projections, the attention, the gamma
  residual), forward + backward of sum(out * g) with respect to the input and every parameter.
  Ours against two PyTorch formulations of the same module: "einsum" (mmcv's: column energies with
  -inf on the diagonal, row energies, one softmax over H + W, einsums) and "bmm" (the official
  CCNet repository's plain-PyTorch version: the same as batched matrix products over the columns
  and the rows).
* ``kernels``: the attention alone, x + gamma * aggregate(softmax(energy(Q, K)), V), forward +
  backward with respect to Q, K, V (given as one stacked tensor, as the projection makes them), x
  and gamma: no projections. Ours as the module runs it ("ours"; on CPU one forward and one
  backward kernel), ours as separate ops (``ca_weight``, softmax, ``ca_map``: "ours, ops"), and
  the two PyTorch formulations.
* ``rcca``: R loops of the module (RCCA, shared weights) against the same module on the
  plain-Jittor reference and a Non-local block of the same width: time, peak memory (the kind of
  number behind the paper's "11x less memory") and analytic forward FLOPs. CPU only.

Time: the implementations run alternately (one step of each per round, after warm-up steps) and the
median over rounds is reported, because timings on a shared machine drift. On CUDA every step ends
with a device synchronisation (``jt.sync_all(True)``, ``torch.cuda.synchronize()``).

Peak memory of the rcca rows (CPU): what one training step holds at its peak, at tensor level. Each
(implementation, shape) runs in a fresh subprocess with the caching allocators out of the way
(Jittor's ``use_sfrl_allocator=0``; glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` so every block of
64 KiB or more is mapped and returned to the OS on free; PyTorch's CPU allocator is plain malloc),
so the resident set follows the live tensors. One warm-up step first, then the growth of the
resident-set high-water mark (VmHWM in /proc/self/status, reset through /proc/self/clear_refs;
Linux only) over a second step. The input and the upstream gradient exist before and are not
counted; everything the step allocates is (kernel scratch included).

``--device cuda``: the module and kernel sections in float32 and float16, median of at least 20
rounds, peak GPU memory of one step (tensor level: PyTorch's max_memory_allocated growth; Jittor's
memory profiler, in a fresh subprocess per row, live variables at the allocator's peak minus those
alive before the step), and for the kernel rows the achieved bandwidth: the bytes the attention must
move at the least (every input read once, every output written once: forward Q, K, V, x in; out and
the attention out; backward Q, K, V, attention, dOut in; dQ, dK, dV out) over the time, as a
fraction of PEAK_BANDWIDTH_TBS (an H200's HBM3e). Without a CUDA device it stops with a one-line
error.

Examples (from the repository root):
    python benchmarks/cca.py                                        # all sections, three shapes
    python benchmarks/cca.py --sections module,kernels --repeats 7  # vs PyTorch only
    python benchmarks/cca.py --sections rcca --rcca-repeats 2 --shapes "1,512,97,97;2,512,64,64" \\
        --shapes3d 1,256,4,48,48                                    # RCCA vs Non-local
    python benchmarks/cca.py --shapes 1,64,24,24 --repeats 2 --no-memory   # quick smoke run
    python benchmarks/cca.py --device cuda --json cca_cuda.json     # GPU rows, machine-readable

Known limit: Jittor 1.3.11 dies with SIGFPE in the Non-local block at 16384 positions
(e.g. [1,256,4,64,64], a 16384 x 16384 attention); 9409 positions ([1,512,97,97]) work.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SECTIONS = ("module", "kernels", "rcca")
MODULE_IMPLS = ("ours", "torch_einsum", "torch_bmm")
KERNEL_IMPLS = ("ours", "ours_ops", "torch_einsum", "torch_bmm")
IMPLS_2D = ("fused", "reference", "nonlocal", "torch")          # rcca rows
IMPLS_3D = ("fused3d", "reference3d", "nonlocal3d")
LABELS = {"ours": "ours", "ours_ops": "ours, ops", "torch_einsum": "PyTorch einsum",
          "torch_bmm": "PyTorch bmm"}
PEAK_BANDWIDTH_TBS = 4.8        # H200 HBM3e
CUDA_MIN_REPEATS = 20
DEFAULT_SHAPES = "1,512,97,97;2,512,64,64;1,512,33,33"


# ------------------------------------------------------------------------------------------------
# Analytic numbers: forward FLOPs (multiply-add = 2 FLOPs; softmax and bias adds ignored), bytes
# ------------------------------------------------------------------------------------------------

def rcca_flops(shape, recurrence):
    b, c, *spatial = shape
    positions = 1
    for s in spatial:
        positions *= s
    path = sum(spatial) - (len(spatial) - 1)
    convs = 2 * c * (c // 8) * 2 + 2 * c * c                 # query, key, value 1x1 convs
    attention = 2 * (c // 8) * path + 2 * c * path             # energy + aggregation
    return recurrence * b * positions * (convs + attention)


def nonlocal_flops(shape):
    b, c, *spatial = shape
    positions = 1
    for s in spatial:
        positions *= s
    inter = c // 2
    convs = 3 * 2 * c * inter + 2 * inter * c                  # theta, phi, g, output projection
    attention = 2 * 2 * inter * positions                      # theta^T phi and attention @ g
    return b * positions * (convs + attention)


def attention_min_bytes(shape, itemsize):
    """Bytes the attention's forward + backward must move at the least (module docstring)."""
    b, c, h, w = shape
    positions, path, inner = h * w, h + w - 1, c // 8
    forward = (2 * inner + c + c) + (c + path)                 # Q, K, V, x in; out, attention out
    backward = (2 * inner + c + path + c) + (2 * inner + c)    # Q, K, V, attention, dOut in; grads out
    return b * positions * (forward + backward) * itemsize


# ------------------------------------------------------------------------------------------------
# Devices
# ------------------------------------------------------------------------------------------------

class DeviceUnavailable(SystemExit):
    """--device cuda on a machine without a usable CUDA device: a one-line exit message."""


def setup_jittor(device):
    """Import Jittor on the requested device (utils.runtime decides what the machine offers)."""
    from utils import runtime
    state = runtime.configure()
    if device == "cuda" and not state["use_cuda"]:
        raise DeviceUnavailable(f"benchmarks/cca.py --device cuda: no usable CUDA device for Jittor here "
                                f"({state['device_reason']})")
    jt = runtime.activate(verbose=False)
    if device == "cuda" and not jt.flags.use_cuda:
        raise DeviceUnavailable("benchmarks/cca.py --device cuda: Jittor did not enable CUDA (jt.has_cuda is off)")
    jt.flags.use_cuda = 1 if device == "cuda" else 0
    return jt


def torch_device(device):
    """The torch device, or None when torch is not installed (its rows are then skipped)."""
    try:
        import torch
    except ImportError:
        print("torch not importable: skipping the torch rows", file=sys.stderr)
        return None
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("benchmarks/cca.py --device cuda: torch.cuda.is_available() is False")
    return torch.device(device)


def jittor_sync(jt, vars_):
    jt.sync(vars_)
    jt.sync_all(True)


# ------------------------------------------------------------------------------------------------
# PyTorch formulations (written here for comparison; the official and mmcv code compute the same)
# ------------------------------------------------------------------------------------------------

def torch_einsum_attention(query, key, value):
    """mmcv's formulation: einsum energies, -inf on the column diagonal, one softmax over H + W."""
    import torch
    h = query.shape[2]
    diagonal = torch.diag(torch.full((h,), float("-inf"), dtype=query.dtype, device=query.device))
    energy_col = (torch.einsum("bchw,bciw->bwhi", query, key) + diagonal).transpose(1, 2)   # [B,H,W,H]
    energy_row = torch.einsum("bchw,bchj->bhwj", query, key)                                # [B,H,W,W]
    attention = torch.softmax(torch.cat([energy_col, energy_row], dim=-1), dim=-1)
    out = torch.einsum("bciw,bhwi->bchw", value, attention[..., :h])
    return out + torch.einsum("bchj,bhwj->bchw", value, attention[..., h:])


def torch_bmm_attention(query, key, value):
    """The official repository's plain-PyTorch formulation: one batched product per column (over
    B*W) and per row (over B*H), -inf on the column diagonal, one softmax over H + W."""
    import torch
    b, _, h, w = query.shape

    def by_column(t):            # [B, C, H, W] -> [B*W, C, H]
        return t.permute(0, 3, 1, 2).reshape(b * w, t.shape[1], h)

    def by_row(t):               # [B, C, H, W] -> [B*H, C, W]
        return t.permute(0, 2, 1, 3).reshape(b * h, t.shape[1], w)

    diagonal = torch.diag(torch.full((h,), float("-inf"), dtype=query.dtype, device=query.device))
    energy_col = (torch.bmm(by_column(query).transpose(1, 2), by_column(key)) + diagonal)
    energy_col = energy_col.view(b, w, h, h).permute(0, 2, 1, 3)                           # [B,H,W,H]
    energy_row = torch.bmm(by_row(query).transpose(1, 2), by_row(key)).view(b, h, w, w)     # [B,H,W,W]
    attention = torch.softmax(torch.cat([energy_col, energy_row], dim=3), dim=3)
    att_col = attention[..., :h].permute(0, 2, 1, 3).reshape(b * w, h, h)
    att_row = attention[..., h:].reshape(b * h, w, w)
    out_col = torch.bmm(by_column(value), att_col.transpose(1, 2)).view(b, w, -1, h).permute(0, 2, 3, 1)
    out_row = torch.bmm(by_row(value), att_row.transpose(1, 2)).view(b, h, -1, w).permute(0, 2, 1, 3)
    return out_col + out_row


TORCH_ATTENTION = {"torch_einsum": torch_einsum_attention, "torch_bmm": torch_bmm_attention}


# ------------------------------------------------------------------------------------------------
# Steps: each factory returns (step, live) where step() runs one forward + backward and waits for
# the device, and live lists what exists before the step (for the memory accounting)
# ------------------------------------------------------------------------------------------------

def _numpy_inputs(shape, channels, dtype):
    import numpy as np
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s).astype(dtype) for s in ([shape[0], channels] + list(shape[2:]), shape)]


def jittor_module_step(jt, shape, dtype):
    from models.cc_attention import CrissCrossAttention
    jt.set_global_seed(0)
    module = CrissCrossAttention(shape[1], gamma_init=0.5)
    if dtype == "float16":
        module.float16()
    x, g = (jt.array(a) for a in _numpy_inputs(shape, shape[1], dtype))
    params = module.parameters()

    def step():
        out = module(x)
        jittor_sync(jt, jt.grad((out * g).sum(), [x] + params))
    return step, [x, g] + params


def jittor_kernel_step(jt, shape, dtype, separate_ops):
    from models.cc_attention import ca_map, ca_weight, criss_cross_attention
    b, c, h, w = shape
    inner = c // 8
    qkv_np, x_np = _numpy_inputs(shape, 2 * inner + c, dtype)
    qkv, x = jt.array(qkv_np), jt.array(x_np)
    g = jt.array(_numpy_inputs(shape, c, dtype)[1][::-1].copy())
    gamma = jt.full([1], 0.5, dtype=dtype)

    def attention(qkv_, x_, gamma_):
        if not separate_ops:
            return criss_cross_attention(qkv_, x_, gamma_)[0]
        q, k, v = qkv_[:, :inner], qkv_[:, inner:2 * inner], qkv_[:, 2 * inner:]
        return gamma_ * ca_map(jt.nn.softmax(ca_weight(q, k), dim=1), v) + x_

    def step():
        out = attention(qkv, x, gamma)
        jittor_sync(jt, jt.grad((out * g).sum(), [qkv, x, gamma]))
    return step, [qkv, x, g, gamma]


def _torch_sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def torch_module_step(device, formulation, shape, dtype, loops=1):
    """The module in PyTorch (three 1x1 convs, the formulation's attention, gamma), applied
    ``loops`` times (RCCA: shared weights)."""
    import torch
    from torch import nn
    torch.manual_seed(0)
    c = shape[1]
    attention_fn = TORCH_ATTENTION[formulation]

    class TorchCrissCross(nn.Module):
        def __init__(self):
            super().__init__()
            self.query_conv, self.key_conv = nn.Conv2d(c, c // 8, 1), nn.Conv2d(c, c // 8, 1)
            self.value_conv = nn.Conv2d(c, c, 1)
            self.gamma = nn.Parameter(torch.full([1], 0.5))

        def forward(self, x):
            out = attention_fn(self.query_conv(x), self.key_conv(x), self.value_conv(x))
            return self.gamma * out + x

    module = TorchCrissCross().to(device=device, dtype=getattr(torch, dtype))
    x_np, g_np = _numpy_inputs(shape, c, dtype)
    x = torch.tensor(x_np, device=device, requires_grad=True)
    g = torch.tensor(g_np, device=device)

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        out = x
        for _ in range(loops):
            out = module(out)
        (out * g).sum().backward()
        _torch_sync(device)
    return step, [x, g] + list(module.parameters())


def torch_kernel_step(device, formulation, shape, dtype):
    import torch
    b, c, h, w = shape
    inner = c // 8
    attention_fn = TORCH_ATTENTION[formulation]
    qkv_np, x_np = _numpy_inputs(shape, 2 * inner + c, dtype)
    qkv = torch.tensor(qkv_np, device=device, requires_grad=True)
    x = torch.tensor(x_np, device=device, requires_grad=True)
    g = torch.tensor(_numpy_inputs(shape, c, dtype)[1][::-1].copy(), device=device)
    gamma = torch.full([1], 0.5, dtype=getattr(torch, dtype), device=device, requires_grad=True)

    def step():
        for t in (qkv, x, gamma):
            t.grad = None
        out = gamma * attention_fn(qkv[:, :inner], qkv[:, inner:2 * inner], qkv[:, 2 * inner:]) + x
        (out * g).sum().backward()
        _torch_sync(device)
    return step, [qkv, x, g, gamma]


def make_step(section, impl, shape, dtype, device):
    """(step, live) of one implementation of one section."""
    if impl.startswith("torch"):
        target = torch_device(device)
        factory = torch_module_step if section == "module" else torch_kernel_step
        return factory(target, impl, shape, dtype)
    jt = setup_jittor(device)
    if section == "module":
        return jittor_module_step(jt, shape, dtype)
    return jittor_kernel_step(jt, shape, dtype, separate_ops=impl == "ours_ops")


def time_alternating(steps, repeats, warmup=2):
    """Median seconds per step of each named step, the steps run one after another in rounds."""
    for step in steps.values():
        for _ in range(warmup):                         # compiles kernels, fills caches
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


# Where our module step spends its time: Jittor's profiler, ops grouped by what they do.
PROFILE_GROUPS = (("attention forward kernel", "code«IN_SIZE:3"), ("attention backward kernel", "code«IN_SIZE:4"),
                  ("projections (matmul / conv)", ("mkl_matmul", "mkl_conv", "cublas", "cudnn")))


def profile_module_step(jt, shape, dtype="float32"):
    """{group: seconds} of one forward + backward of our module (after two warm-up steps)."""
    step, _ = jittor_module_step(jt, shape, dtype)
    step()
    step()
    with jt.profile_scope(warmup=0, rerun=0) as report:
        step()
    header = report[0]
    name_at, time_at = header.index("Name"), header.index("TotalTime")
    groups = {name: 0.0 for name, _ in PROFILE_GROUPS}
    groups["other Jittor ops"] = 0.0
    for row in report[1:]:
        group = next((name for name, prefix in PROFILE_GROUPS if row[name_at].startswith(prefix)), "other Jittor ops")
        groups[group] += float(row[time_at]) / 1e9          # the profiler reports nanoseconds
    return groups


def print_profiles(shapes, device):
    jt = setup_jittor(device)
    print("\nprofile: one forward + backward of our CrissCrossAttention(C), by op group (Jittor's profiler)")
    print("| shape | " + " | ".join(name for name, _ in PROFILE_GROUPS) + " | other Jittor ops | total ms |")
    print("|" + "---|" * (len(PROFILE_GROUPS) + 3))
    for shape in shapes:
        groups = profile_module_step(jt, shape)
        total = sum(groups.values())
        cells = [f"{seconds * 1e3:.1f} ({seconds / total:.0%})" for seconds in groups.values()]
        print(f"| {list(shape)} | " + " | ".join(cells) + f" | {total * 1e3:.1f} |")


# ------------------------------------------------------------------------------------------------
# Peak GPU memory of one step (tensor level)
# ------------------------------------------------------------------------------------------------

def _nbytes(t):
    if hasattr(t, "element_size"):                      # torch
        return t.numel() * t.element_size()
    return int(t.nbytes)                                # jittor


def torch_step_peak_bytes(step):
    import torch
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    return torch.cuda.max_memory_allocated() - before


_JITTOR_PROFILE_SEPARATOR = "[!@#div1!@#]"      # field separator of jt.get_max_memory_info()


def jittor_step_peak_bytes(jt, step, live):
    """Live variable bytes at the allocator's peak during one step (after a warm-up step), minus
    those alive before it. Jittor's profiler keeps its maximum for the whole process, so every
    measurement needs a fresh process (``--memory-child``)."""
    step()
    jt.flags.profile_memory_enable = 1
    try:
        step()
        peak = int(jt.get_max_memory_info().split(_JITTOR_PROFILE_SEPARATOR)[0])
    finally:
        jt.flags.profile_memory_enable = 0
    return peak - sum(_nbytes(v) for v in live)


def measure_gpu_memory_child(section, impl, shape, dtype):
    step, live = make_step(section, impl, shape, dtype, "cuda")
    if impl.startswith("torch"):
        return torch_step_peak_bytes(step)
    return jittor_step_peak_bytes(setup_jittor("cuda"), step, live)


# ------------------------------------------------------------------------------------------------
# Peak host memory of one RCCA step (rcca section, CPU)
# ------------------------------------------------------------------------------------------------

def _status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_rcca_memory_child(impl, shape, recurrence, threads):
    """Runs in a fresh process (module docstring): peak-RSS growth (MiB) over one forward+backward
    after a warm-up step.

    Linux keeps ru_maxrss across fork+exec (the child would inherit the parent's peak), so we reset
    this process's high-water mark (``echo 5 > /proc/self/clear_refs``) and read VmHWM / VmRSS."""
    import gc
    step = make_rcca_step(impl, shape, recurrence, threads)
    step()                                              # warm-up: kernels, one-time buffers
    gc.collect()
    if impl != "torch":
        import jittor as jt
        if jt.flags.use_sfrl_allocator:
            raise RuntimeError("memory child: Jittor's caching allocator is on (use_sfrl_allocator=1)")
        jt.gc()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) / 1024.0


# Allocators that hand freed memory straight back, so RSS tracks live tensors (module docstring).
UNCACHED_ALLOCATORS = {"use_sfrl_allocator": "0", "MALLOC_MMAP_THRESHOLD_": "65536"}


def run_child(args, extra_env=None):
    """Run this script with ``args`` in a fresh process; the last stdout line is JSON."""
    env = dict(os.environ, CCNET_QUIET="1", **(extra_env or {}))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)] + args, capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        print(f"child run {' '.join(args)} failed: {' | '.join(tail)}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# RCCA section: R loops of the module vs the plain-Jittor reference vs Non-local
# ------------------------------------------------------------------------------------------------

def NonLocalBlock(channels):  # noqa: N802  (factory: the class needs jittor imported)
    """Embedded-Gaussian Non-local block (Wang et al. 2018) of width C, inner C/2, residual. Works on
    any number of spatial dims (images or clips): they are flattened to N positions, and the 1x1
    convs run as 2D convs on [B, C, N, 1] (oneDNN)."""
    import jittor as jt
    from jittor import nn

    class _NonLocal(nn.Module):
        def __init__(self):
            super().__init__()
            inter = channels // 2
            self.theta, self.phi = nn.Conv2d(channels, inter, 1), nn.Conv2d(channels, inter, 1)
            self.g, self.out = nn.Conv2d(channels, inter, 1), nn.Conv2d(inter, channels, 1)

        def execute(self, x):
            b, c = x.shape[:2]
            flat = x.reshape(b, c, -1, 1)
            theta = self.theta(flat).reshape(b, c // 2, -1).transpose(0, 2, 1)   # [B, N, C/2]
            phi = self.phi(flat).reshape(b, c // 2, -1)                          # [B, C/2, N]
            g = self.g(flat).reshape(b, c // 2, -1).transpose(0, 2, 1)           # [B, N, C/2]
            attention = nn.softmax(jt.matmul(theta, phi), dim=-1)                # [B, N, N]
            y = jt.matmul(attention, g).transpose(0, 2, 1).reshape(b, c // 2, -1, 1)
            return x + self.out(y).reshape(x.shape)
    return _NonLocal()


def make_rcca_step(impl, shape, recurrence, threads):
    """One forward + backward of R loops (Non-local: one block) at `shape`, 2D or 3D."""
    if impl == "torch":
        import torch
        torch.set_num_threads(threads)
        return torch_module_step(torch.device("cpu"), "torch_einsum", shape, "float32", loops=recurrence)[0]
    jt = setup_jittor("cpu")
    import numpy as np
    from models.cc_attention import CrissCrossAttention, CrissCrossAttention3D
    rng = np.random.default_rng(0)
    x = jt.array(rng.standard_normal(shape).astype("float32"))
    g = jt.array(rng.standard_normal(shape).astype("float32"))
    if impl.startswith("nonlocal"):
        module, loops = NonLocalBlock(shape[1]), 1
    else:
        module_class = CrissCrossAttention3D if impl.endswith("3d") else CrissCrossAttention
        module, loops = module_class(shape[1], impl=impl.replace("3d", ""), gamma_init=0.5), recurrence
    params = module.parameters()

    def step():
        out = x
        for _ in range(loops):
            out = module(out)
        jittor_sync(jt, jt.grad((out * g).sum(), [x] + params))
    return step


def memory_child_args(impl, shape, recurrence, threads):
    """Arguments of the fresh process that measures one rcca row's peak memory."""
    shape_flag = "--shapes3d" if len(shape) == 5 else "--shapes"
    return ["--memory-child", impl, shape_flag, ",".join(map(str, shape)), "--recurrence", str(recurrence),
            "--threads", str(threads)]


def run_rcca_section(args, jobs, device):
    if device != "cpu":
        raise SystemExit("benchmarks/cca.py: the rcca section (host-memory accounting) is CPU only; "
                         "use --sections module,kernels with --device cuda")
    rows = []
    repeats = args.rcca_repeats or args.repeats
    for shape, shape_impls in jobs:
        if not shape_impls:
            continue
        steps = {impl: make_rcca_step(impl, shape, args.recurrence, args.threads) for impl in shape_impls}
        times = time_alternating(steps, repeats, warmup=1)
        for impl in shape_impls:
            memory = float("nan")
            if not args.no_memory:
                child = run_child(memory_child_args(impl, shape, args.recurrence, args.threads), UNCACHED_ALLOCATORS)
                memory = child["peak_mib"] if child else float("nan")
            is_nonlocal = impl.startswith("nonlocal")
            flops = nonlocal_flops(shape) if is_nonlocal else rcca_flops(shape, args.recurrence)
            rows.append(dict(section="rcca", device=device, dtype="float32", shape=list(shape), impl=impl,
                             recurrence=1 if is_nonlocal else args.recurrence, seconds=times[impl],
                             peak_mib=memory, forward_gflop=flops / 1e9))
            print(f"measured rcca {list(shape)} {impl}: {times[impl]:.3f} s, {memory:.0f} MiB", file=sys.stderr,
                  flush=True)
    return rows


# ------------------------------------------------------------------------------------------------
# Module and kernel sections
# ------------------------------------------------------------------------------------------------

def run_versus_torch(section, shapes, dtypes, device, args):
    impls = MODULE_IMPLS if section == "module" else KERNEL_IMPLS
    if torch_device(device) is None:
        impls = tuple(i for i in impls if not i.startswith("torch"))
    repeats = args.repeats if device == "cpu" else max(args.repeats, CUDA_MIN_REPEATS)
    rows = []
    for dtype in dtypes:
        for shape in shapes:
            steps = {impl: make_step(section, impl, shape, dtype, device)[0] for impl in impls}
            times = time_alternating(steps, repeats)
            for impl in impls:
                row = dict(section=section, device=device, dtype=dtype, shape=list(shape), impl=impl,
                           seconds=times[impl], repeats=repeats)
                if device == "cuda" and not args.no_memory:
                    child = run_child(["--gpu-memory-child", f"{section}:{impl}:{dtype}",
                                       "--shapes", ",".join(map(str, shape))])
                    row["peak_gpu_mib"] = child["peak_bytes"] / 2 ** 20 if child else float("nan")
                if section == "kernels" and device == "cuda":
                    moved = attention_min_bytes(shape, 2 if dtype == "float16" else 4)
                    row["min_bytes"] = moved
                    row["bandwidth_tbs"] = moved / times[impl] / 1e12
                    row["bandwidth_fraction"] = row["bandwidth_tbs"] / PEAK_BANDWIDTH_TBS
                rows.append(row)
                print(f"measured {section} {dtype} {list(shape)} {impl}: {times[impl] * 1e3:.1f} ms",
                      file=sys.stderr, flush=True)
            del steps
    return rows


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------

def print_versus_torch(section, rows, args, device):
    rows = [r for r in rows if r["section"] == section]
    if not rows:
        return
    title = {"module": "one CrissCrossAttention(C) (projections + attention + gamma), forward + backward",
             "kernels": "the attention alone (no projections), forward + backward"}[section]
    threads = f"{args.threads} CPU threads" if device == "cpu" else "CUDA, synchronised"
    print(f"\n{section}: {title}; {threads}; median of {rows[0]['repeats']} alternated rounds")
    extra = " | peak GPU MiB" if device == "cuda" else ""
    extra += f" | TB/s (of {PEAK_BANDWIDTH_TBS})" if section == "kernels" and device == "cuda" else ""
    print(f"| dtype | shape | impl | ms | ours / this{extra} |")
    print("|" + "---|" * (5 + extra.count("|")))
    for row in rows:
        ours = next(r for r in rows if r["shape"] == row["shape"] and r["dtype"] == row["dtype"] and r["impl"] == "ours")
        cells = [row["dtype"], str(row["shape"]), LABELS[row["impl"]], f"{row['seconds'] * 1e3:.1f}",
                 f"{ours['seconds'] / row['seconds']:.2f}"]
        if device == "cuda":
            cells.append(f"{row.get('peak_gpu_mib', float('nan')):.0f}")
        if "bandwidth_tbs" in row:
            cells.append(f"{row['bandwidth_tbs']:.3f} ({row['bandwidth_fraction']:.1%})")
        print("| " + " | ".join(cells) + " |")


def print_rcca(rows, args):
    rows = [r for r in rows if r["section"] == "rcca"]
    if not rows:
        return
    print(f"\nrcca: R={args.recurrence} loops of the module (Non-local: one block), forward+backward, "
          f"{args.threads} CPU threads, median of {args.rcca_repeats or args.repeats} alternated rounds; "
          f"memory: peak of one step's live tensors (module docstring)")
    print("| shape | impl | fwd+bwd s | vs fused | peak MiB | vs fused | fwd GFLOP |")
    print("|" + "---|" * 7)
    for row in rows:
        base_impl = "fused3d" if len(row["shape"]) == 5 else "fused"
        base = next((r for r in rows if r["shape"] == row["shape"] and r["impl"] == base_impl), None)
        t_ratio = f"{row['seconds'] / base['seconds']:.2f}x" if base else "-"
        m_ratio = f"{row['peak_mib'] / base['peak_mib']:.1f}x" if base and base["peak_mib"] > 0 else "-"
        print(f"| {row['shape']} | {row['impl']} | {row['seconds']:.3f} | {t_ratio} | "
              f"{row['peak_mib']:.0f} | {m_ratio} | {row['forward_gflop']:.1f} |")
    for shape in sorted({tuple(r["shape"]) for r in rows}):
        ratio = rcca_flops(shape, args.recurrence) / nonlocal_flops(shape)
        print(f"analytic forward FLOPs at {list(shape)}: RCCA(R={args.recurrence}) / Non-local = {ratio:.1%}")


# ------------------------------------------------------------------------------------------------

def _parse_shapes(text, rank, flag):
    shapes = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        try:
            dims = [int(v) for v in part.split(",")]
        except ValueError:
            dims = []
        if len(dims) != rank or min(dims) < 1:
            raise SystemExit(f"{flag}: {part!r} must be {rank} comma-separated positive ints")
        shapes.append(tuple(dims))
    return shapes


def _parse_list(text, valid, flag):
    items = [i.strip() for i in text.split(",") if i.strip()]
    unknown = [i for i in items if i not in valid]
    if unknown:
        raise SystemExit(f"{flag}: unknown {unknown}; valid: {', '.join(valid)}")
    return items


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cuda: module and kernel rows on the GPU, float32 and float16 (module docstring)")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="2D shapes B,C,H,W separated by ';'")
    parser.add_argument("--shapes3d", default="", help="3D shapes B,C,T,H,W separated by ';' (rcca rows)")
    parser.add_argument("--impls", default=",".join(IMPLS_2D),
                        help=f"rcca rows: comma list of {', '.join(IMPLS_2D)} (3D: {', '.join(IMPLS_3D)})")
    parser.add_argument("--recurrence", type=int, default=2, help="R for the rcca rows")
    parser.add_argument("--repeats", type=int, default=5,
                        help=f"timed rounds, median reported (at least {CUDA_MIN_REPEATS} on CUDA)")
    parser.add_argument("--rcca-repeats", type=int, default=None, help="timed rounds of the rcca rows (default: --repeats)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (OMP_NUM_THREADS / torch)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write every row to FILE as JSON")
    parser.add_argument("--profile", action="store_true",
                        help="also print where one step of our module spends its time, by op group")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--gpu-memory-child", default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    for name in ("repeats", "recurrence", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name}: must be at least 1, got {getattr(args, name)}")
    if args.rcca_repeats is not None and args.rcca_repeats < 1:
        raise SystemExit(f"--rcca-repeats: must be at least 1, got {args.rcca_repeats}")
    args.section_list = _parse_list(args.sections, SECTIONS, "--sections")
    args.impl_list = _parse_list(args.impls, IMPLS_2D + IMPLS_3D, "--impls")
    args.shape_list = _parse_shapes(args.shapes, 4, "--shapes")
    args.shape3d_list = _parse_shapes(args.shapes3d, 5, "--shapes3d")
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            raise SystemExit(f"--json: folder {folder} does not exist")
    return args


def write_json(path, rows, args):
    """All rows and the run's settings, written atomically."""
    payload = dict(device=args.device, threads=args.threads, repeats=args.repeats, recurrence=args.recurrence,
                   peak_bandwidth_tbs=PEAK_BANDWIDTH_TBS, rows=rows)
    tmp = path + ".tmp"
    with open(tmp, "w") as out:
        json.dump(payload, out, indent=1, allow_nan=True)
    os.replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    if args.memory_child:
        shape = args.shape3d_list[0] if args.shape3d_list else args.shape_list[0]
        print(json.dumps({"peak_mib": measure_rcca_memory_child(args.memory_child, shape, args.recurrence,
                                                                 args.threads)}))
        return
    if args.gpu_memory_child:
        section, impl, dtype = args.gpu_memory_child.split(":")
        print(json.dumps({"peak_bytes": measure_gpu_memory_child(section, impl, args.shape_list[0], dtype)}))
        return

    device = args.device
    setup_jittor(device)                       # fails early, in one line, when the device is missing
    if device == "cuda":
        torch_device(device)
    else:
        try:
            import torch
            torch.set_num_threads(args.threads)
        except ImportError:
            pass
    dtypes = ["float32", "float16"] if device == "cuda" else ["float32"]

    rows = []
    for section in ("module", "kernels"):
        if section in args.section_list:
            rows += run_versus_torch(section, args.shape_list, dtypes, device, args)
    if "rcca" in args.section_list:
        impls = list(args.impl_list)
        if "torch" in impls and torch_device("cpu") is None:
            impls.remove("torch")
        jobs = [(shape, [i for i in impls if i in IMPLS_2D]) for shape in args.shape_list]
        impls_3d = [i for i in impls if i in IMPLS_3D] or list(IMPLS_3D)
        jobs += [(shape, impls_3d) for shape in args.shape3d_list]
        rows += run_rcca_section(args, jobs, device)

    for section in ("module", "kernels"):
        print_versus_torch(section, rows, args, device)
    print_rcca(rows, args)
    if args.profile:
        print_profiles(args.shape_list, device)
    if args.json:
        write_json(args.json, rows, args)
        print(f"\nrows written to {args.json}")


if __name__ == "__main__":
    main()
