"""Criss-cross attention as fused Jittor ops, plus a plain-Jittor reference.

Layout: for a map [B, C, H, W] each position u = (y, x) sees the H + W - 1 positions of its
criss-cross path. ``ca_weight(Q, K)`` -> energy [B, H+W-1, H, W]: channel i < W is the row position
(y, i) (u itself included); channel W + j is the column position (j if j < y else j + 1, x), so u is
counted once (the layout of the official CUDA op). ``ca_map(A, V)`` -> [B, C, H, W] with
out_u = sum_i A[i, u] * V[path_i(u)].

The space-time version adds a temporal line: for clips [B, C, T, H, W] the path of (t, y, x) has
T + H + W - 2 entries: the W row entries, the H - 1 column entries (both in frame t, as in 2D), then
the T - 1 entries (t', y, x) with t' = j if j < t else j + 1. With T = 1 this *is* the 2D layout,
and the 2D ops run the very same kernels with T = 1.

How the kernels are built
-------------------------
All gradients reduce to three primitives over the path (``X``, ``Y``, ``G`` are [B, C, T, H, W]
maps, ``A`` is [B, L, T, H, W]):

* energy(X, Y)[i, u]  = sum_c X[c, u] * Y[c, path_i(u)]      (ca_weight; grad of ca_map wrt A)
* gather(A, Y)[c, u]  = sum_i A[i, u] * Y[c, path_i(u)]      (ca_map; grad of ca_weight wrt Q)
* scatter(A, G)[c, p] = sum over (u, i) with path_i(u) = p of A[i, u] * G[c, u]
                                                             (grad of ca_map wrt V, of ca_weight wrt K)

The C++ lives in ``models/kernels/`` and is read at import:

* ``cc_attention_common.h``: the path arithmetic and one function per primitive that computes one
  output element. It is compiled into both the CUDA kernels (``cc_attention_cuda.h``, one thread
  per element) and the CPU "elementwise" kernels (``cc_attention_cpu_elementwise.h``, one OpenMP
  iteration per element), so the CPU tests run exactly the arithmetic the GPU runs.
* ``cc_attention_cpu.h``: the default CPU kernels ("fused"): register-blocked products on the NCHW
  tensors as they are (rows vectorised along x, columns and temporal lines with neighbouring
  lines side by side in the vector lanes), tested against the elementwise kernels, the plain-Jittor
  reference and finite differences.

On CPU, ``CrissCrossAttention`` (impl "fused") runs its whole attention, energy, softmax,
aggregation and the residual ``x + gamma * out``, as one forward and one backward kernel that read
Q, K and V straight out of the stacked projection (``criss_cross_attention``). Backward keeps only
the projection and the attention [B, L, H, W] (not the aggregated output: the gradient of gamma
comes from the same sums that the softmax backward needs); the panels are scratch freed inside the
kernels. On CUDA the module runs the separate ops (ca_weight, softmax, ca_map) on the CUDA kernels.
"""
from pathlib import Path
from typing import Optional, Tuple, Union

import jittor as jt
from jittor import nn

# ------------------------------------------------------------------------------------------------
# Kernel sources (models/kernels/*.h, read once at import)
# ------------------------------------------------------------------------------------------------

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"


def _kernel_source(name: str) -> str:
    return (KERNEL_DIR / name).read_text()


_COMMON_SRC = _kernel_source("cc_attention_common.h")
_CUDA_HEADER = _COMMON_SRC + _kernel_source("cc_attention_cuda.h")
_CPU_ELEMENTWISE_HEADER = _COMMON_SRC + _kernel_source("cc_attention_cpu_elementwise.h")
_CPU_FUSED_HEADER = _COMMON_SRC + _kernel_source("cc_attention_cpu.h")

# The per-element entry points of the common header, by primitive (the CUDA and the CPU
# elementwise kernels both loop over output elements and call these).
_ELEMENT_FN = {"energy": "cca_energy_at", "gather": "cca_gather_at", "scatter": "cca_scatter_at"}
_KIND_ID = {"energy": 0, "gather": 1, "scatter": 2}
_ACC_TYPE = {"float16": "float", "float32": "float", "float64": "double"}
# Dims passed to every kernel, read from the 5-D value-like input (in1 for every primitive).
_DIMS_CTHW = "in1_shape1, in1_shape2, in1_shape3, in1_shape4"
_DIMS = "in1_shape0, " + _DIMS_CTHW
_NUMEL = "(long)out0_shape0 * out0_shape1 * out0_shape2 * out0_shape3 * out0_shape4"


def generate_sources(kind: str, dtype, cpu_kernels: str = "fused") -> Tuple[str, str, str, str]:
    """(cpu_header, cpu_src, cuda_header, cuda_src) of one primitive for one dtype.

    ``cpu_kernels``: "fused" (register-blocked) or "elementwise" (the CUDA per-element code).
    Exposed so that tests can check that the CUDA source runs the arithmetic the CPU tests run.
    """
    acc, kind_id = _ACC_TYPE[str(dtype)], _KIND_ID[kind]
    cuda_src = (f"const long n = {_NUMEL};\n"
                f"const int threads = 256; const long blocks = (n + threads - 1) / threads;\n"
                f"cca_elementwise_kernel<in0_type, {acc}, {kind_id}>"
                f"<<<(unsigned)(blocks < 65536 ? blocks : 65536), threads>>>"
                f"(n, in0_p, in1_p, out0_p, {_DIMS_CTHW});\n")
    if cpu_kernels == "elementwise":
        cpu_header = _CPU_ELEMENTWISE_HEADER
        cpu_src = (f"cca_cpu_elementwise<in0_type, {acc}, {kind_id}>"
                   f"({_NUMEL}, in0_p, in1_p, out0_p, {_DIMS_CTHW});")
    else:
        cpu_header = _CPU_FUSED_HEADER
        if kind == "energy":
            cpu_src = f"cca_cpu_energy<in0_type>(in0_p, in1_p, out0_p, {_DIMS});"
        else:
            cpu_src = (f"cca_cpu_aggregate<in0_type>(in0_p, in1_p, out0_p, {_DIMS}, "
                       f"{'true' if kind == 'scatter' else 'false'});")
    return cpu_header, cpu_src, _CUDA_HEADER, cuda_src


# The module's whole attention on CPU (cc_attention_cpu.h); in0 = qkv [B, 2Ck + C, T, H, W].
# Forward: in1 = x, in2 = gamma -> out0 = x + gamma * aggregation, out1 = attention.
_MODULE_FORWARD_SRC = ("cca_cpu_attention_forward<in0_type>(in0_p, in1_p, (in0_type)in2_p[0], out0_p, out1_p, "
                       "in1_shape0, (int)((in0_shape1 - in1_shape1) / 2), in1_shape1, in1_shape2, in1_shape3, in1_shape4);")
# Backward: in1 = attention, in2 = output gradient, in3 = gamma -> out0 = d qkv, out1 = d gamma.
_MODULE_BACKWARD_SRC = ("double gamma_grad = 0;\n"
                        "cca_cpu_attention_backward<in0_type>(in0_p, in1_p, in2_p, (in0_type)in3_p[0], out0_p, &gamma_grad, "
                        "in2_shape0, (int)((in0_shape1 - in2_shape1) / 2), in2_shape1, in2_shape2, in2_shape3, in2_shape4);\n"
                        "out1_p[0] = (out1_type)gamma_grad;")


# ------------------------------------------------------------------------------------------------
# Primitive launches and autograd (5-D [B, C, T, H, W] internally; 2-D ops use T = 1)
# ------------------------------------------------------------------------------------------------

_CPU_KERNELS = {"fused": "fused", "elementwise": "elementwise"}   # impl name -> CPU kernel family


def _launch(kind, a, b, impl):
    """Run one primitive on 5-D inputs; output shape from the layout."""
    bsz, c, t, h, w = b.shape
    path = w + h + t - 2
    shape = [bsz, path, t, h, w] if kind == "energy" else [bsz, c, t, h, w]
    cpu_header, cpu_src, cuda_header, cuda_src = generate_sources(kind, a.dtype, _CPU_KERNELS[impl])
    return jt.code(shape, a.dtype, [a, b], cpu_header=cpu_header, cpu_src=cpu_src,
                   cuda_header=cuda_header, cuda_src=cuda_src)


class _Energy(jt.Function):
    """ca_weight: energy(Q, K); grads: dQ = gather(dE, K), dK = scatter(dE, Q)."""

    def __init__(self, impl):
        self.impl = impl

    def execute(self, query, key):
        self.saved = (query, key)
        return _launch("energy", query, key, self.impl)

    def grad(self, grad_energy):
        query, key = self.saved
        return (_launch("gather", grad_energy, key, self.impl),
                _launch("scatter", grad_energy, query, self.impl))


class _Map(jt.Function):
    """ca_map: gather(A, V); grads: dA = energy(dOut, V), dV = scatter(A, dOut)."""

    def __init__(self, impl):
        self.impl = impl

    def execute(self, attention, value):
        self.saved = (attention, value)
        return _launch("gather", attention, value, self.impl)

    def grad(self, grad_out):
        attention, value = self.saved
        return (_launch("energy", grad_out, value, self.impl),
                _launch("scatter", attention, grad_out, self.impl))


class _ModuleAttention(jt.Function):
    """x + gamma * ca_map(softmax(ca_weight(Q, K)), V) from the stacked projection qkv, in one CPU
    kernel each way. ``self.attention`` holds the softmaxed attention of the last call."""

    def execute(self, qkv, x, gamma):
        bsz, channels, t, h, w = x.shape
        out, self.attention = jt.code([x.shape, [bsz, w + h + t - 2, t, h, w]], [x.dtype, x.dtype], [qkv, x, gamma],
                                      cpu_header=_CPU_FUSED_HEADER, cpu_src=_MODULE_FORWARD_SRC)
        self.saved = (qkv, gamma)
        return out

    def grad(self, grad_out):
        qkv, gamma = self.saved
        grad_qkv, grad_gamma = jt.code([qkv.shape, gamma.shape], [qkv.dtype, gamma.dtype],
                                       [qkv, self.attention, grad_out, gamma],
                                       cpu_header=_CPU_FUSED_HEADER, cpu_src=_MODULE_BACKWARD_SRC)
        return grad_qkv, grad_out, grad_gamma


# ------------------------------------------------------------------------------------------------
# Input checks (clear errors instead of compiler errors)
# ------------------------------------------------------------------------------------------------

_SPATIAL = {4: "[B, C, H, W]", 5: "[B, C, T, H, W]"}


def _shape(v):
    return list(v.shape)


def _check_dtype(op, *tensors):
    dtypes = {str(t.dtype) for t in tensors}
    if len(dtypes) != 1:
        raise ValueError(f"{op}: inputs must share one dtype, got {sorted(dtypes)}")
    dtype = dtypes.pop()
    allowed = ("float16", "float32", "float64") if jt.flags.use_cuda else ("float32", "float64")
    if dtype not in allowed:
        raise ValueError(f"{op}: dtype {dtype} not supported here (supported: {', '.join(allowed)}"
                         + ("" if jt.flags.use_cuda else "; float16 needs CUDA") + ")")


def _check_pair(op, names, a, b, rank, attention_first):
    """Validate (query, key) or (attention, value) of rank 4 (2D) or 5 (3D); return the dims."""
    for name, v in zip(names, (a, b)):
        if len(v.shape) != rank:
            raise ValueError(f"{op}: {name} must be {rank}-D {_SPATIAL[rank]}, got shape {_shape(v)}")
    if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise ValueError(f"{op}: {names[0]} {_shape(a)} and {names[1]} {_shape(b)} must have the same "
                         f"batch size and spatial size")
    spatial = list(b.shape[2:])
    path = sum(spatial) - (len(spatial) - 1)
    if attention_first:
        if a.shape[1] != path:
            raise ValueError(f"{op}: {names[0]} {_shape(a)} must have {path} channels (the criss-cross "
                             f"path length for spatial size {spatial}) to match {names[1]} {_shape(b)}")
    elif a.shape[1] != b.shape[1]:
        raise ValueError(f"{op}: {names[0]} {_shape(a)} and {names[1]} {_shape(b)} must have the same "
                         f"number of channels")
    if min(a.shape) < 1 or min(b.shape) < 1:
        raise ValueError(f"{op}: empty input: {names[0]} {_shape(a)}, {names[1]} {_shape(b)}")
    _check_dtype(op, a, b)


def _as_5d(v):
    return v if len(v.shape) == 5 else v.reshape(v.shape[0], v.shape[1], 1, v.shape[2], v.shape[3])


def _as_4d(v):
    return v.reshape(v.shape[0], v.shape[1], v.shape[3], v.shape[4])


# ------------------------------------------------------------------------------------------------
# Plain-Jittor reference in the contract layout (independent of the kernels: shifted copies)
# ------------------------------------------------------------------------------------------------

def _path_copies(y, t_len, h, w):
    """[B, C, L, T, H, W] with entry i = y at path_i(t, y, x) (plain Jittor reindex)."""
    bsz, c = y.shape[:2]
    row = y.reindex([bsz, c, w, t_len, h, w], ["i0", "i1", "i3", "i4", "i2"])
    parts = [row]
    if h > 1:
        parts.append(y.reindex([bsz, c, h - 1, t_len, h, w], ["i0", "i1", "i3", "i2 < i4 ? i2 : i2 + 1", "i5"]))
    if t_len > 1:
        parts.append(y.reindex([bsz, c, t_len - 1, t_len, h, w], ["i0", "i1", "i2 < i3 ? i2 : i2 + 1", "i4", "i5"]))
    return jt.concat(parts, dim=2) if len(parts) > 1 else row


def reference_ca_weight(query: jt.Var, key: jt.Var) -> jt.Var:
    """Energy in the contract layout from explicit shifted copies of K (slow, for tests)."""
    q, k = _as_5d(query), _as_5d(key)
    energy = (q.unsqueeze(2) * _path_copies(k, *k.shape[2:])).sum(1)
    return energy if len(query.shape) == 5 else _as_4d(energy)


def reference_ca_map(attention: jt.Var, value: jt.Var) -> jt.Var:
    """Aggregation in the contract layout from explicit shifted copies of V (slow, for tests)."""
    a, v = _as_5d(attention), _as_5d(value)
    out = (a.unsqueeze(1) * _path_copies(v, *v.shape[2:])).sum(2)
    return out if len(value.shape) == 5 else _as_4d(out)


def criss_cross_reference(query: jt.Var, key: jt.Var, value: jt.Var, return_attention: bool = False) -> Union[jt.Var, Tuple[jt.Var, jt.Var]]:
    """The -inf-diagonal formulation used by many reimplementations: column energies (self masked) ++ row energies,
    one softmax over H + W, as batched matmuls. Optionally also the attention in contract layout."""
    b, _, h, w = query.shape
    energy_col = jt.matmul(query.permute(0, 3, 2, 1), key.permute(0, 3, 1, 2))     # [B,W,H(y),H(j)]
    diagonal = jt.init.eye(h, dtype=query.dtype) * -1e30  # finite so that H == 1 stays NaN-free
    energy_col = (energy_col + diagonal).permute(0, 2, 1, 3)                       # [B,H,W,H]
    energy_row = jt.matmul(query.permute(0, 2, 3, 1), key.permute(0, 2, 1, 3))     # [B,H,W,W]
    attention = nn.softmax(jt.concat([energy_col, energy_row], dim=3), dim=3)
    att_col = attention[:, :, :, :h].permute(0, 2, 1, 3)                            # [B,W,H,H]
    att_row = attention[:, :, :, h:]                                                # [B,H,W,W]
    out_col = jt.matmul(att_col, value.permute(0, 3, 2, 1)).permute(0, 3, 2, 1)
    out_row = jt.matmul(att_row, value.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    out = out_col + out_row
    if not return_attention:
        return out
    # contract layout: row entries (y, i) first, then the column without the diagonal
    rows = attention[:, :, :, h:].permute(0, 3, 1, 2)                               # [B,W,H,W]
    cols = attention.reindex([b, h - 1, h, w], ["i0", "i2", "i3", "i1 < i2 ? i1 : i1 + 1"]) if h > 1 else None
    contract = rows if cols is None else jt.concat([rows, cols], dim=1)
    return out, contract


def criss_cross_reference_3d(query: jt.Var, key: jt.Var, value: jt.Var, return_attention: bool = False) -> Union[jt.Var, Tuple[jt.Var, jt.Var]]:
    """Space-time version of ``criss_cross_reference`` for clips [B, C, T, H, W]: row, column (self
    masked) and temporal (self masked) energies, one softmax over W + H + T, batched matmuls."""
    b, _, t, h, w = query.shape
    energy_row = jt.matmul(query.permute(0, 2, 3, 4, 1), key.permute(0, 2, 3, 1, 4))     # [B,T,H,W,W]
    energy_col = jt.matmul(query.permute(0, 2, 4, 3, 1), key.permute(0, 2, 4, 1, 3))     # [B,T,W,H,H]
    energy_col = (energy_col + jt.init.eye(h, dtype=query.dtype) * -1e30).permute(0, 1, 3, 2, 4)
    energy_time = jt.matmul(query.permute(0, 3, 4, 2, 1), key.permute(0, 3, 4, 1, 2))    # [B,H,W,T,T]
    energy_time = (energy_time + jt.init.eye(t, dtype=query.dtype) * -1e30).permute(0, 3, 1, 2, 4)
    attention = nn.softmax(jt.concat([energy_row, energy_col, energy_time], dim=4), dim=4)  # [B,T,H,W,W+H+T]
    att_row, att_col, att_time = attention[..., :w], attention[..., w:w + h], attention[..., w + h:]
    out = jt.matmul(att_row, value.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
    out += jt.matmul(att_col.permute(0, 1, 3, 2, 4), value.permute(0, 2, 4, 3, 1)).permute(0, 4, 1, 3, 2)
    out += jt.matmul(att_time.permute(0, 2, 3, 1, 4), value.permute(0, 3, 4, 2, 1)).permute(0, 4, 3, 1, 2)
    if not return_attention:
        return out
    parts = [att_row.permute(0, 4, 1, 2, 3)]                                            # [B,W,T,H,W]
    if h > 1:
        parts.append(att_col.reindex([b, h - 1, t, h, w], ["i0", "i2", "i3", "i4", "i1 < i3 ? i1 : i1 + 1"]))
    if t > 1:
        parts.append(att_time.reindex([b, t - 1, t, h, w], ["i0", "i2", "i3", "i4", "i1 < i2 ? i1 : i1 + 1"]))
    return out, (jt.concat(parts, dim=1) if len(parts) > 1 else parts[0])


_REFERENCE_BY_RANK = {4: criss_cross_reference, 5: criss_cross_reference_3d}


# ------------------------------------------------------------------------------------------------
# Public ops
# ------------------------------------------------------------------------------------------------

IMPLS = ("fused", "elementwise", "reference")
_default_impl = {"name": "fused"}


def set_default_impl(name: str) -> None:
    """Choose the implementation used when none is given: "fused" (blocked CPU kernels / CUDA),
    "elementwise" (the per-element CUDA arithmetic, also on CPU) or "reference" (plain Jittor)."""
    _default_impl["name"] = _resolve_impl(name)


def _resolve_impl(name):
    name = _default_impl["name"] if name is None else name
    if name not in IMPLS:
        raise ValueError(f"unknown criss-cross attention impl {name!r}; valid: {', '.join(IMPLS)}")
    return name


def _weight(op, query, key, rank, impl):
    _check_pair(op, ("query", "key"), query, key, rank, attention_first=False)
    impl = _resolve_impl(impl)
    if impl == "reference":
        return reference_ca_weight(query, key)
    energy = _Energy(impl)(_as_5d(query), _as_5d(key))
    return energy if rank == 5 else _as_4d(energy)


def _map(op, attention, value, rank, impl):
    _check_pair(op, ("attention", "value"), attention, value, rank, attention_first=True)
    impl = _resolve_impl(impl)
    if impl == "reference":
        return reference_ca_map(attention, value)
    out = _Map(impl)(_as_5d(attention), _as_5d(value))
    return out if rank == 5 else _as_4d(out)


def ca_weight(query: jt.Var, key: jt.Var, impl: Optional[str] = None) -> jt.Var:
    """Criss-cross energy [B, H+W-1, H, W] of query and key [B, C, H, W] (layout: module doc)."""
    return _weight("ca_weight", query, key, 4, impl)


def ca_map(attention: jt.Var, value: jt.Var, impl: Optional[str] = None) -> jt.Var:
    """Aggregate value [B, C, H, W] along the criss-cross path with attention [B, H+W-1, H, W]."""
    return _map("ca_map", attention, value, 4, impl)


def ca_weight_3d(query: jt.Var, key: jt.Var, impl: Optional[str] = None) -> jt.Var:
    """Space-time energy [B, T+H+W-2, T, H, W] of query and key [B, C, T, H, W]."""
    return _weight("ca_weight_3d", query, key, 5, impl)


def ca_map_3d(attention: jt.Var, value: jt.Var, impl: Optional[str] = None) -> jt.Var:
    """Aggregate value [B, C, T, H, W] along the space-time path with attention [B, T+H+W-2, T, H, W]."""
    return _map("ca_map_3d", attention, value, 5, impl)


def _attend_reference(query, key, value, return_attention):
    """The -inf-diagonal formulation; builds the contract layout only when asked to."""
    reference = _REFERENCE_BY_RANK[len(value.shape)]
    if return_attention:
        return reference(query, key, value, return_attention=True)
    return reference(query, key, value), None


def _attend_ops(query, key, value, impl, return_attention):
    """ca_weight, softmax, ca_map as separate ops (the CUDA path, and "elementwise" everywhere)."""
    rank = len(value.shape)
    attention = nn.softmax(_weight("criss_cross_attention", query, key, rank, impl), dim=1)
    return _map("criss_cross_attention", attention, value, rank, impl), attention


def _attend_fused_cpu(qkv, x, gamma):
    """The whole attention and the residual in one CPU kernel each way (module docstring)."""
    attention_fn = _ModuleAttention()
    out = attention_fn(_as_5d(qkv), _as_5d(x), gamma)
    if len(x.shape) == 5:
        return out, attention_fn.attention
    return _as_4d(out), _as_4d(attention_fn.attention)


def criss_cross_attention(qkv: jt.Var, x: jt.Var, gamma: jt.Var, impl: Optional[str] = None,
                          return_attention: bool = False) -> Tuple[jt.Var, Optional[jt.Var]]:
    """x + gamma * ca_map(softmax(ca_weight(Q, K)), V) for Q, K (C' channels each) and V (C
    channels) stacked along the channels of ``qkv`` [B, 2C' + C, (T,) H, W], x [B, C, (T,) H, W]:
    what ``CrissCrossAttention`` runs after its projections. Returns (output, attention), the
    attention being the softmaxed [B, L, (T,) H, W] (None if not ``return_attention`` and the path
    did not build it anyway)."""
    rank = len(x.shape)
    if rank not in _SPATIAL or len(qkv.shape) != rank:
        raise ValueError(f"criss_cross_attention: x must be {_SPATIAL[4]} or {_SPATIAL[5]} and qkv of the same "
                         f"rank, got x {_shape(x)}, qkv {_shape(qkv)}")
    channels = x.shape[1]
    inner, odd = divmod(qkv.shape[1] - channels, 2)
    if inner < 1 or odd or qkv.shape[0] != x.shape[0] or qkv.shape[2:] != x.shape[2:]:
        raise ValueError(f"criss_cross_attention: qkv {_shape(qkv)} must hold 2C' + C channels (C = {channels} "
                         f"from x {_shape(x)}, C' >= 1) with x's batch and spatial size")
    if min(x.shape) < 1:
        raise ValueError(f"criss_cross_attention: empty input x {_shape(x)}")
    if list(gamma.shape) != [1]:
        raise ValueError(f"criss_cross_attention: gamma must have shape [1], got {_shape(gamma)}")
    _check_dtype("criss_cross_attention", qkv)
    impl = _resolve_impl(impl)
    if impl == "fused" and not jt.flags.use_cuda:
        _check_dtype("criss_cross_attention", qkv, x)     # one kernel reads both
        return _attend_fused_cpu(qkv, x, gamma)
    # Under mixed precision the projections may hand float16 Q, K, V while x stays float32: the
    # residual sum below promotes, as the rest of the network does.
    query, key, value = qkv[:, :inner], qkv[:, inner:2 * inner], qkv[:, 2 * inner:]
    if impl == "reference":
        out, attention = _attend_reference(query, key, value, return_attention)
    else:
        out, attention = _attend_ops(query, key, value, impl, return_attention)
    return gamma * out + x, attention


# ------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------

class CrissCrossAttention(nn.Module):
    """gamma * ca_map(softmax(ca_weight(Q, K)), V) + x with 1x1 convs Q, K (C -> C/8) and V (C -> C).

    RCCA applies the same module R times (shared weights). The 3D subclass works on clips.

    ``impl``: "fused" (default), "elementwise" or "reference" (see ``set_default_impl``); None follows
    the module default at call time. "fused" on CPU runs the attention and the residual as one
    kernel each way (module docstring). ``keep_attention``: store the last softmaxed attention
    [B, H+W-1, H, W] in ``self.last_attention`` (for visualisation). ``gamma_init``: starting value
    of the residual scale gamma; 0 (official) makes the module start as the identity, which also
    starts every attention weight with a zero gradient, so short schedules may never leave it.
    """
    rank = 4
    projection_conv = nn.Conv2d         # the 1x1 Q/K/V convs; a subclass may store them otherwise

    def __init__(self, in_channels: int, impl: Optional[str] = None, keep_attention: bool = False,
                 gamma_init: float = 0.0):
        super().__init__()
        if in_channels < 8:
            raise ValueError(f"CrissCrossAttention: in_channels={in_channels} gives no query/key "
                             f"channels (in_channels // 8 == 0); use at least 8")
        if impl is not None:
            _resolve_impl(impl)
        self.in_channels = in_channels
        self.impl = impl
        self.keep_attention = keep_attention
        self.last_attention = None
        conv = self.projection_conv
        self.query_conv = conv(in_channels, in_channels // 8, 1)
        self.key_conv = conv(in_channels, in_channels // 8, 1)
        self.value_conv = conv(in_channels, in_channels, 1)
        self.gamma = jt.full([1], float(gamma_init), dtype="float32")

    def _check_input(self, x):
        expected = "[B, C, H, W]" if self.rank == 4 else "[B, C, T, H, W]"
        if len(x.shape) != self.rank or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__}({self.in_channels}): input must be {expected} with "
                             f"C = {self.in_channels}, got shape {_shape(x)}")
        if min(x.shape) < 1:
            raise ValueError(f"{type(self).__name__}({self.in_channels}): empty input, shape {_shape(x)}")

    def _stacked_weights(self):
        convs = (self.query_conv, self.key_conv, self.value_conv)
        weight = jt.concat([conv.weight.reshape(conv.weight.shape[0], self.in_channels) for conv in convs], dim=0)
        return weight, jt.concat([conv.bias for conv in convs], dim=0)

    def _project(self, x):
        """Q, K, V stacked along the channels [B, C/8 + C/8 + C, ...] from the three 1x1 projections
        with their weights stacked: one product instead of three, forward and backward; the
        parameters stay separate. On CPU in float32 (where Jittor's matmul runs on oneDNN) as one
        matrix product per image, [C/8 + C/8 + C, C] @ [C, positions], faster than Jittor's 1x1
        convolution there; elsewhere as a convolution."""
        weight, bias = self._stacked_weights()
        if jt.flags.use_cuda or str(x.dtype) != "float32" or str(weight.dtype) != "float32":
            # a 1x1x1 conv of a clip is a 1x1 conv of its frames stacked along H (oneDNN handles 2D)
            shape = x.shape
            frames = x if self.rank == 4 else x.reshape(shape[0], shape[1], shape[2] * shape[3], shape[4])
            qkv = nn.conv2d(frames, weight.reshape(weight.shape[0], self.in_channels, 1, 1), bias)
            return qkv.reshape(shape[0], qkv.shape[1], *shape[2:])
        flat = x.reshape(x.shape[0], self.in_channels, -1)
        per_image = [jt.matmul(weight, flat[i]) for i in range(x.shape[0])]
        qkv = per_image[0].unsqueeze(0) if len(per_image) == 1 else jt.stack(per_image, dim=0)
        return (qkv + bias.reshape(1, -1, 1)).reshape(x.shape[0], weight.shape[0], *x.shape[2:])

    def execute(self, x: jt.Var) -> jt.Var:
        self._check_input(x)
        out, attention = criss_cross_attention(self._project(x), x, self.gamma, self.impl,
                                               return_attention=self.keep_attention)
        if self.keep_attention:
            self.last_attention = attention.detach()
        return out


class CrissCrossAttention3D(CrissCrossAttention):
    """Space-time criss-cross attention for clips [B, C, T, H, W] (TPAMI CCNet): row, column and
    temporal line of every position, ``last_attention`` [B, T+H+W-2, T, H, W]. Same parameter names
    as the 2D module (1x1x1 convs), so a 2D checkpoint loads into it; with T = 1 it computes exactly
    what the 2D module computes (the 2D ops are these kernels with T = 1)."""
    rank = 5
    projection_conv = nn.Conv3d


def cuda_kernel_sources():
    """Every CUDA kernel the ops can launch, as (primitive, dtype, cuda_header, cuda_src).

    The three primitives serve the forward and the backward of ca_weight and ca_map, in 2D and
    3D alike (the 2D ops run the 3D kernels with T = 1); each takes two 5-D inputs and writes one
    5-D output, in float16, float32 or float64. For compile checks of the CUDA code without a GPU.
    """
    return [(kind, dtype) + generate_sources(kind, dtype)[2:] for kind in _KIND_ID for dtype in _ACC_TYPE]
