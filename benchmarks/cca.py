"""Criss-cross attention: forward+backward time, peak memory and analytic FLOPs.

Compares (a) the fused RCCA module (jt.code kernels), (b) the same module on the plain-Jittor
reference (-inf-diagonal formulation), (c) a Non-local block of the same width, (d) PyTorch's einsum
criss-cross formulation (the one mmcv uses) when torch is installed. CCA rows apply the module R
times (RCCA, shared weights); every row is one forward + backward of sum(out * g) with respect to the
input and all parameters.

Time: the implementations are run alternately (one iteration of each per round, after a warm-up)
and the median over rounds is reported, because this machine's timings drift by +-15%.
Peak memory: what one training step (forward + backward) holds at its peak, at tensor level. Each
(implementation, shape) runs in a fresh subprocess with the caching allocators out of the way
(Jittor's ``use_sfrl_allocator=0``; glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` so every block of
64 KiB or more is mapped and returned to the OS on free; PyTorch's CPU allocator is plain malloc),
so the resident set follows the live tensors. One warm-up step first (compiled kernels and one-time
buffers are not the step's memory), then the growth of the resident-set high-water mark (VmHWM in
/proc/self/status, reset through /proc/self/clear_refs; Linux only) over a second step. The input
and the upstream gradient exist before and are not counted; everything the step allocates is. (On
CUDA it is host memory, not GPU memory.)

Examples (from the repository root):
    python benchmarks/cca.py                                   # both paper shapes, all impls
    python benchmarks/cca.py --shapes 1,512,97,97 --repeats 5 --impls fused,torch
    python benchmarks/cca.py --shapes 1,64,24,24 --repeats 2   # quick smoke run
    python benchmarks/cca.py --shapes "" --shapes3d 1,256,4,48,48   # 3D (space-time) rows only

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

IMPLS_2D = ("fused", "reference", "nonlocal", "torch")
IMPLS_3D = ("fused3d", "reference3d", "nonlocal3d")


# ------------------------------------------------------------------------------------------------
# Analytic forward FLOPs (multiply-add = 2 FLOPs; softmax and bias adds ignored)
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


# ------------------------------------------------------------------------------------------------
# The implementations: each returns step() running one forward + backward and syncing
# ------------------------------------------------------------------------------------------------

def _jittor_step(impl, shape, recurrence, threads):
    from utils import runtime
    jt = runtime.activate(verbose=False)
    import numpy as np
    from jittor import nn
    from models.cc_attention import CrissCrossAttention, CrissCrossAttention3D

    rng = np.random.default_rng(0)
    x = jt.array(rng.standard_normal(shape).astype("float32"))
    g = jt.array(rng.standard_normal(shape).astype("float32"))
    c = shape[1]
    if impl.startswith("nonlocal"):
        module = NonLocalBlock(c)
        loops = 1
    else:
        base = impl.replace("3d", "")
        module = (CrissCrossAttention3D if impl.endswith("3d") else CrissCrossAttention)(c, impl=base)
        module.gamma.update(jt.array([0.5]).float32())
        module.gamma.sync()
        loops = recurrence
    params = module.parameters()

    def step():
        out = x
        for _ in range(loops):
            out = module(out)
        loss = (out * g).sum()
        grads = jt.grad(loss, [x] + params)
        jt.sync(grads)
        jt.sync_all(True)
    return step


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


def _torch_step(impl, shape, recurrence, threads):
    import torch
    from torch import nn
    torch.set_num_threads(threads)
    torch.manual_seed(0)

    class TorchCrissCross(nn.Module):
        """The einsum formulation of mmcv's CrissCrossAttention (column energies with -inf on the
        diagonal, row energies, one softmax over H + W), written here for comparison."""

        def __init__(self, c):
            super().__init__()
            self.query_conv, self.key_conv = nn.Conv2d(c, c // 8, 1), nn.Conv2d(c, c // 8, 1)
            self.value_conv = nn.Conv2d(c, c, 1)
            self.gamma = nn.Parameter(torch.full([1], 0.5))

        def forward(self, x):
            _, _, h, _ = x.shape
            q, k, v = self.query_conv(x), self.key_conv(x), self.value_conv(x)
            diagonal = torch.diag(torch.full((h,), float("-inf"), dtype=x.dtype))
            energy_col = (torch.einsum("bchw,bciw->bwhi", q, k) + diagonal).transpose(1, 2)   # [B,H,W,H]
            energy_row = torch.einsum("bchw,bchj->bhwj", q, k)                             # [B,H,W,W]
            attention = torch.softmax(torch.cat([energy_col, energy_row], dim=-1), dim=-1)
            out = torch.einsum("bciw,bhwi->bchw", v, attention[..., :h])
            out = out + torch.einsum("bchj,bhwj->bchw", v, attention[..., h:])
            return self.gamma * out + x

    module = TorchCrissCross(shape[1])
    x = torch.randn(*shape, requires_grad=True)
    g = torch.randn(*shape)

    def step():
        out = x
        for _ in range(recurrence):
            out = module(out)
        (out * g).sum().backward()
    return step


def make_step(impl, shape, recurrence, threads):
    if impl == "torch":
        return _torch_step(impl, shape, recurrence, threads)
    return _jittor_step(impl, shape, recurrence, threads)


# ------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------

def time_alternating(impls, shape, recurrence, repeats, threads):
    """Median seconds per forward+backward for each impl, run one after another in rounds."""
    from tqdm import tqdm
    steps = {}
    for impl in impls:
        steps[impl] = make_step(impl, shape, recurrence, threads)
        steps[impl]()                                   # warm-up: compiles kernels, fills caches
    times = {impl: [] for impl in impls}
    for _ in tqdm(range(repeats), desc=f"timing {list(shape)}", leave=False):
        for impl in impls:
            start = time.perf_counter()
            steps[impl]()
            times[impl].append(time.perf_counter() - start)
    return {impl: statistics.median(ts) for impl, ts in times.items()}


def _status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory_child(impl, shape, recurrence, threads):
    """Runs in a fresh process (see the module docstring): peak-RSS growth (MiB) over one
    forward+backward after a warm-up step.

    Linux keeps ru_maxrss across fork+exec (the child would inherit the parent's peak), so we reset
    this process's high-water mark (``echo 5 > /proc/self/clear_refs``) and read VmHWM / VmRSS."""
    import gc
    step = make_step(impl, shape, recurrence, threads)
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


def measure_memory(impl, shape, recurrence, threads):
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", impl,
           "--shapes", ",".join(map(str, shape)), "--recurrence", str(recurrence), "--threads", str(threads)]
    env = dict(os.environ, CCNET_QUIET="1", **UNCACHED_ALLOCATORS)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        print(f"memory run of {impl} {shape} failed: {' | '.join(tail)}", file=sys.stderr)
        return float("nan")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]


# ------------------------------------------------------------------------------------------------

def _parse_shapes(text, rank):
    shapes = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        dims = [int(v) for v in part.split(",")]
        if len(dims) != rank:
            raise SystemExit(f"--shapes{'3d' if rank == 5 else ''}: {part!r} must have {rank} comma-separated ints")
        shapes.append(tuple(dims))
    return shapes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="1,512,97,97;2,512,64,64",
                        help="2D shapes B,C,H,W separated by ';' (default: the paper's two)")
    parser.add_argument("--shapes3d", default="", help="3D shapes B,C,T,H,W separated by ';'")
    parser.add_argument("--impls", default=",".join(IMPLS_2D),
                        help=f"comma list of {', '.join(IMPLS_2D)} (3D rows: {', '.join(IMPLS_3D)})")
    parser.add_argument("--recurrence", type=int, default=2, help="R for the criss-cross rows")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (OMP_NUM_THREADS / torch)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    if args.memory_child:
        shape = tuple(int(v) for v in args.shapes.split(","))
        peak = measure_memory_child(args.memory_child, shape, args.recurrence, args.threads)
        print(json.dumps({"peak_mib": peak}))
        return

    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = [i for i in impls if i not in IMPLS_2D + IMPLS_3D]
    if unknown:
        raise SystemExit(f"--impls: unknown {unknown}; valid: {', '.join(IMPLS_2D + IMPLS_3D)}")
    if "torch" in impls:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("torch not importable: skipping the torch rows", file=sys.stderr)
            impls.remove("torch")

    jobs = [(shape, [i for i in impls if i in IMPLS_2D]) for shape in _parse_shapes(args.shapes, 4)]
    impls_3d = [i for i in impls if i in IMPLS_3D] or list(IMPLS_3D)
    jobs += [(shape, impls_3d) for shape in _parse_shapes(args.shapes3d, 5)]

    rows = []
    for shape, shape_impls in jobs:
        if not shape_impls:
            continue
        times = time_alternating(shape_impls, shape, args.recurrence, args.repeats, args.threads)
        for impl in shape_impls:
            memory = float("nan") if args.no_memory else measure_memory(impl, shape, args.recurrence, args.threads)
            is_nonlocal = impl.startswith("nonlocal")
            flops = nonlocal_flops(shape) if is_nonlocal else rcca_flops(shape, args.recurrence)
            rows.append(dict(shape=shape, impl=impl, seconds=times[impl], peak_mib=memory, gflops=flops / 1e9))
            print(f"measured {list(shape)} {impl}: {times[impl]:.3f} s, {memory:.0f} MiB", file=sys.stderr, flush=True)

    print(f"\nforward+backward, {args.threads} CPU threads, median of {args.repeats} alternated rounds; "
          f"criss-cross rows: R={args.recurrence}; memory: peak of one step's live tensors (see benchmarks/cca.py's docstring)")
    header = f"| shape | impl | fwd+bwd s | vs fused | peak MiB | vs fused | fwd GFLOP |"
    print(header)
    print("|" + "---|" * 7)
    for row in rows:
        base_impl = "fused3d" if len(row["shape"]) == 5 else "fused"
        base = next((r for r in rows if r["shape"] == row["shape"] and r["impl"] == base_impl), None)
        t_ratio = f"{row['seconds'] / base['seconds']:.2f}x" if base else "-"
        m_ratio = f"{row['peak_mib'] / base['peak_mib']:.1f}x" if base and base["peak_mib"] > 0 else "-"
        print(f"| {list(row['shape'])} | {row['impl']} | {row['seconds']:.3f} | {t_ratio} | "
              f"{row['peak_mib']:.0f} | {m_ratio} | {row['gflops']:.1f} |")
    for shape in sorted({r["shape"] for r in rows}):
        ratio = rcca_flops(shape, args.recurrence) / nonlocal_flops(shape)
        print(f"analytic forward FLOPs at {list(shape)}: RCCA(R={args.recurrence}) / Non-local = {ratio:.1%}")


if __name__ == "__main__":
    main()
