"""Criss-cross attention (DESIGN.md section 2) as fused Jittor ops, plus a plain-Jittor reference.

Layout (contract): for a map [B, C, H, W] each position u = (y, x) sees the H + W - 1 positions of
its criss-cross path. ``ca_weight(Q, K)`` -> energy [B, H+W-1, H, W]: channel i < W is the row
position (y, i) (u itself included); channel W + j is the column position (j if j < y else j + 1, x),
so u is counted once. ``ca_map(A, V)`` -> [B, C, H, W] with out_u = sum_i A[i, u] * V[path_i(u)].

The 3D (space-time, TPAMI) version of issue 9 adds a temporal line: for clips [B, C, T, H, W] the
path of (t, y, x) has T + H + W - 2 entries: the W row entries, the H - 1 column entries (both in
frame t, as in 2D), then the T - 1 entries (t', y, x) with t' = j if j < t else j + 1. With T = 1
this *is* the 2D layout, and the 2D ops run the very same kernels with T = 1.

How the kernels are built
-------------------------
All six gradients reduce to three primitives over the path (``X``, ``Y``, ``G`` are [B, C, T, H, W]
maps, ``A`` is [B, L, T, H, W]):

* energy(X, Y)[i, u]  = sum_c X[c, u] * Y[c, path_i(u)]      (ca_weight; grad of ca_map wrt A)
* gather(A, Y)[c, u]  = sum_i A[i, u] * Y[c, path_i(u)]      (ca_map; grad of ca_weight wrt Q)
* scatter(A, G)[c, p] = sum over (u, i) with path_i(u) = p of A[i, u] * G[c, u]
                                                             (grad of ca_map wrt V, of ca_weight wrt K)

``_COMMON_SRC`` holds the path arithmetic and one function per primitive that computes one output
element. It is compiled into both the CUDA kernels (one thread per element) and the CPU
"elementwise" kernels (one OpenMP iteration per element), so the CPU tests run exactly the
arithmetic the GPU runs. The default CPU kernels ("fused") compute the same sums as small
register-blocked matrix products on channels-last panels (the reduced or scattered channel index is
contiguous there, see ../shared/JITTOR.md); they use the same path helpers and are tested against
the elementwise kernels, the plain-Jittor reference and finite differences.

Memory: the fused ops save only their inputs for backward (Q, K: C/8 channels; V; the attention
[B, L, H, W]); their channels-last panels are scratch buffers freed when the kernel returns.
"""
import utils  # noqa: F401  (configures Jittor before it is imported)
import jittor as jt
from jittor import nn

# ------------------------------------------------------------------------------------------------
# Generated sources
# ------------------------------------------------------------------------------------------------

# Shared by the CPU and the CUDA kernels: the path layout and the per-element sums.
_COMMON_SRC = r"""
#ifndef CCA_COMMON_SRC
#define CCA_COMMON_SRC
#ifdef __CUDACC__
#define CCA_HD __host__ __device__ __forceinline__
#else
#define CCA_HD inline
#endif

// Entry j of a line that skips the position's own index `self` (column: self = y, time: self = t).
CCA_HD int cca_line_source(int j, int self) { return j < self ? j : j + 1; }
// Inverse: which entry of the line of `self` holds index `other` (other != self).
CCA_HD int cca_line_channel(int other, int self) { return other < self ? other : other - 1; }

// Path entry i of position (t, y, x): row entries [0, W), column entries [W, W+H-1),
// temporal entries [W+H-1, W+H+T-2). Writes the source position.
CCA_HD void cca_path(int i, int t, int y, int x, int H, int W, int& pt, int& py, int& px) {
    pt = t; py = y; px = x;
    if (i < W) px = i;
    else if (i < W + H - 1) py = cca_line_source(i - W, y);
    else pt = cca_line_source(i - W - H + 1, t);
}

// energy[b, i, t, y, x] = sum_c X[b, c, t, y, x] * Y[b, c, path_i(t, y, x)]; idx enumerates energy.
template <typename T, typename Acc>
CCA_HD void cca_energy_at(long idx, const T* X, const T* Y, T* E, int C, int TT, int H, int W) {
    const long S = (long)TT * H * W; const int L = W + H + TT - 2;
    const long s = idx % S; const long bi = idx / S; const int i = (int)(bi % L); const long b = bi / L;
    const int x = (int)(s % W), y = (int)((s / W) % H), t = (int)(s / ((long)W * H));
    int pt, py, px; cca_path(i, t, y, x, H, W, pt, py, px);
    const T* xp = X + b * C * S + s;
    const T* yp = Y + b * C * S + ((long)pt * H + py) * W + px;
    Acc sum = 0;
    for (int c = 0; c < C; ++c) sum += (Acc)xp[c * S] * (Acc)yp[c * S];
    E[idx] = (T)sum;
}

// out[b, c, t, y, x] = sum_i A[b, i, t, y, x] * Y[b, c, path_i(t, y, x)]; idx enumerates out.
template <typename T, typename Acc>
CCA_HD void cca_gather_at(long idx, const T* A, const T* Y, T* O, int C, int TT, int H, int W) {
    const long S = (long)TT * H * W; const int L = W + H + TT - 2;
    const long s = idx % S; const long bc = idx / S; const long b = bc / C;
    const int x = (int)(s % W), y = (int)((s / W) % H), t = (int)(s / ((long)W * H));
    const T* ap = A + b * L * S + s;
    const T* yp = Y + bc * S;
    Acc sum = 0;
    for (int i = 0; i < L; ++i) {
        int pt, py, px; cca_path(i, t, y, x, H, W, pt, py, px);
        sum += (Acc)ap[i * S] * (Acc)yp[((long)pt * H + py) * W + px];
    }
    O[idx] = (T)sum;
}

// out[b, c, p] = sum over the positions u whose path holds p of A[b, entry, u] * G[b, c, u].
template <typename T, typename Acc>
CCA_HD void cca_scatter_at(long idx, const T* A, const T* G, T* O, int C, int TT, int H, int W) {
    const long S = (long)TT * H * W; const long HW = (long)H * W; const int L = W + H + TT - 2;
    const long s = idx % S; const long bc = idx / S; const long b = bc / C;
    const int px = (int)(s % W), py = (int)((s / W) % H), pt = (int)(s / HW);
    const T* ab = A + b * L * S;
    const T* gp = G + bc * S;
    Acc sum = 0;
    for (int x = 0; x < W; ++x) {           // p is row entry px of (pt, py, x)
        const long u = pt * HW + (long)py * W + x;
        sum += (Acc)ab[px * S + u] * (Acc)gp[u];
    }
    for (int y = 0; y < H; ++y) if (y != py) {   // p is column entry of (pt, y, px)
        const long u = pt * HW + (long)y * W + px;
        sum += (Acc)ab[(W + cca_line_channel(py, y)) * S + u] * (Acc)gp[u];
    }
    for (int t = 0; t < TT; ++t) if (t != pt) {  // p is temporal entry of (t, py, px)
        const long u = t * HW + (long)py * W + px;
        sum += (Acc)ab[(W + H - 1 + cca_line_channel(pt, t)) * S + u] * (Acc)gp[u];
    }
    O[idx] = (T)sum;
}
#endif
"""

# The per-element entry points of _COMMON_SRC, by primitive (the CUDA and the CPU elementwise
# kernels both loop over output elements and call these).
_ELEMENT_FN = {"energy": "cca_energy_at", "gather": "cca_gather_at", "scatter": "cca_scatter_at"}

_CUDA_HEADER = _COMMON_SRC + r"""
template <typename T, typename Acc, int KIND>
__global__ void cca_elementwise_kernel(long n, const T* a, const T* b, T* out, int C, int TT, int H, int W) {
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < n; idx += (long)blockDim.x * gridDim.x) {
        if (KIND == 0) cca_energy_at<T, Acc>(idx, a, b, out, C, TT, H, W);
        else if (KIND == 1) cca_gather_at<T, Acc>(idx, a, b, out, C, TT, H, W);
        else cca_scatter_at<T, Acc>(idx, a, b, out, C, TT, H, W);
    }
}
"""
_KIND_ID = {"energy": 0, "gather": 1, "scatter": 2}

# Register-blocked CPU kernels on channels-last panels.
_CPU_BLOCKED_SRC = r"""
#include <memory>
#include <cstring>
#ifndef CCA_CPU_BLOCKED_SRC
#define CCA_CPU_BLOCKED_SRC
// 64-byte vectors: one AVX-512 register (GCC splits them on narrower machines).
template <typename T> struct CcaVec;
template <> struct CcaVec<float>  { typedef float  type __attribute__((vector_size(64))); };
template <> struct CcaVec<double> { typedef double type __attribute__((vector_size(64))); };

template <typename V, typename T> inline V cca_load(const T* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
template <typename V, typename T> inline void cca_store(T* p, const V& v) { std::memcpy(p, &v, sizeof(V)); }
template <typename V> inline V cca_zero() { V v; std::memset(&v, 0, sizeof(V)); return v; }
template <typename T> inline T cca_hsum(const T& v) { return v; }
inline float cca_hsum(const CcaVec<float>::type& v) { float s = 0; for (int e = 0; e < 16; ++e) s += v[e]; return s; }
inline double cca_hsum(const CcaVec<double>::type& v) { double s = 0; for (int e = 0; e < 8; ++e) s += v[e]; return s; }

// dst[b][c][r] = src[b][r][c] (NC(S) <-> N(S)C), cache-blocked.
template <typename T>
void cca_transpose(const T* src, T* dst, long B, long R, long Cc) {
    const long TB = 32, nr = (R + TB - 1) / TB, nc = (Cc + TB - 1) / TB;
    #pragma omp parallel for schedule(static)
    for (long blk = 0; blk < B * nr * nc; ++blk) {
        const long b = blk / (nr * nc), r0 = (blk / nc) % nr * TB, c0 = blk % nc * TB;
        const long r1 = r0 + TB < R ? r0 + TB : R, c1 = c0 + TB < Cc ? c0 + TB : Cc;
        const T* s = src + b * R * Cc; T* d = dst + b * R * Cc;
        for (long c = c0; c < c1; ++c)
            for (long r = r0; r < r1; ++r) d[c * R + r] = s[r * Cc + c];
    }
}

// O[m*ldo + n] (+)= sum_k A[m*am + k*ak] * Y[k*ldy + n] for one MR x (NV vectors) tile.
template <typename T, typename V, int MR, int NV>
inline void cca_nn_tile(int K, const T* A, long am, long ak, const T* Y, long ldy, T* O, long ldo, bool accumulate) {
    const int VL = sizeof(V) / sizeof(T);
    V s[MR][NV];
    for (int m = 0; m < MR; ++m) for (int v = 0; v < NV; ++v) s[m][v] = cca_zero<V>();
    for (int k = 0; k < K; ++k) {
        V y[NV];
        for (int v = 0; v < NV; ++v) y[v] = cca_load<V>(Y + k * ldy + v * VL);
        for (int m = 0; m < MR; ++m) {
            const T a = A[m * am + k * ak];
            for (int v = 0; v < NV; ++v) s[m][v] += a * y[v];
        }
    }
    for (int m = 0; m < MR; ++m) for (int v = 0; v < NV; ++v) {
        T* o = O + m * ldo + v * VL;
        cca_store(o, accumulate ? s[m][v] + cca_load<V>(o) : s[m][v]);
    }
}

template <typename T, typename V, int NV>
inline void cca_nn_rows(int M, int K, const T* A, long am, long ak, const T* Y, long ldy, T* O, long ldo, bool acc) {
    int m = 0;
    for (; m + 4 <= M; m += 4) cca_nn_tile<T, V, 4, NV>(K, A + m * am, am, ak, Y, ldy, O + m * ldo, ldo, acc);
    for (; m < M; ++m) cca_nn_tile<T, V, 1, NV>(K, A + m * am, am, ak, Y, ldy, O + m * ldo, ldo, acc);
}

// O[M x N] (+)= A[M x K] * Y[K x N], Y and O rows contiguous in n.
template <typename T>
void cca_nn(int M, int N, int K, const T* A, long am, long ak, const T* Y, long ldy, T* O, long ldo, bool acc) {
    typedef typename CcaVec<T>::type V;
    const int VL = sizeof(V) / sizeof(T);
    int n = 0;
    for (; n + 4 * VL <= N; n += 4 * VL) cca_nn_rows<T, V, 4>(M, K, A, am, ak, Y + n, ldy, O + n, ldo, acc);
    for (; n + VL <= N; n += VL) cca_nn_rows<T, V, 1>(M, K, A, am, ak, Y + n, ldy, O + n, ldo, acc);
    for (; n < N; ++n) cca_nn_rows<T, T, 1>(M, K, A, am, ak, Y + n, ldy, O + n, ldo, acc);
}

// O[m*om + n*on] = sum_k X[m*ldx + k] * Y[n*ldy + k] for one MR x NR tile (k contiguous).
template <typename T, int MR, int NR>
inline void cca_nt_tile(int K, const T* X, long ldx, const T* Y, long ldy, T* O, long om, long on) {
    typedef typename CcaVec<T>::type V;
    const int VL = sizeof(V) / sizeof(T);
    V s[MR][NR];
    for (int m = 0; m < MR; ++m) for (int n = 0; n < NR; ++n) s[m][n] = cca_zero<V>();
    int k = 0;
    for (; k + VL <= K; k += VL) {
        V x[MR], y[NR];
        for (int m = 0; m < MR; ++m) x[m] = cca_load<V>(X + m * ldx + k);
        for (int n = 0; n < NR; ++n) y[n] = cca_load<V>(Y + n * ldy + k);
        for (int m = 0; m < MR; ++m) for (int n = 0; n < NR; ++n) s[m][n] += x[m] * y[n];
    }
    for (int m = 0; m < MR; ++m) for (int n = 0; n < NR; ++n) {
        T r = cca_hsum(s[m][n]);
        for (int kk = k; kk < K; ++kk) r += X[m * ldx + kk] * Y[n * ldy + kk];
        O[m * om + n * on] = r;
    }
}

template <typename T, int MR>
inline void cca_nt_cols(int N, int K, const T* X, long ldx, const T* Y, long ldy, T* O, long om, long on) {
    int n = 0;
    for (; n + 4 <= N; n += 4) cca_nt_tile<T, MR, 4>(K, X, ldx, Y + n * ldy, ldy, O + n * on, om, on);
    for (; n < N; ++n) cca_nt_tile<T, MR, 1>(K, X, ldx, Y + n * ldy, ldy, O + n * on, om, on);
}

// O[M x N] = X[M x K] * Y[N x K]^T, rows of X and Y contiguous in k.
template <typename T>
void cca_nt(int M, int N, int K, const T* X, long ldx, const T* Y, long ldy, T* O, long om, long on) {
    int m = 0;
    for (; m + 4 <= M; m += 4) cca_nt_cols<T, 4>(N, K, X + m * ldx, ldx, Y, ldy, O + m * om, om, on);
    for (; m < M; ++m) cca_nt_cols<T, 1>(N, K, X + m * ldx, ldx, Y, ldy, O + m * om, om, on);
}

template <typename T> std::unique_ptr<T[]> cca_buffer(long n) { return std::unique_ptr<T[]>(new T[n > 0 ? n : 1]); }

// Dense coefficient tile of one line (column: n = H, stride W; time: n = T, stride H*W) of the
// positions u = base + self*stride: P[self*n + other] = A[entry of `other` on the line of self, u],
// zero on the diagonal (a position is counted once, in its row).
template <typename T>
inline void cca_line_tile(const T* A, long S, int first_entry, int n, long stride, long base, T* P) {
    for (int self = 0; self < n; ++self)
        for (int other = 0; other < n; ++other)
            P[self * n + other] = other == self ? T(0)
                : A[(first_entry + cca_line_channel(other, self)) * S + base + self * stride];
}

// energy (see _COMMON_SRC): X, Y [B, C, TT, H, W] -> E [B, L, TT, H, W]
template <typename T>
void cca_cpu_energy(const T* X, const T* Y, T* E, int B, int C, int TT, int H, int W) {
    const long HW = (long)H * W, S = TT * HW, L = W + H + TT - 2;
    auto xt = cca_buffer<T>(B * S * C), yt = cca_buffer<T>(B * S * C);
    cca_transpose(X, xt.get(), B, C, S);
    cca_transpose(Y, yt.get(), B, C, S);
    #pragma omp parallel
    {
        const int n = H > TT ? H : TT;
        auto tile = cca_buffer<T>((long)n * n);
        #pragma omp for schedule(dynamic)
        for (long r = 0; r < (long)B * TT * H; ++r) {          // rows: E[i][x] = Y(y, i) . X(y, x)
            const long b = r / (TT * H), row = r % (TT * H);
            const long u0 = b * S + row * W;
            cca_nt<T>(W, W, C, yt.get() + u0 * C, C, xt.get() + u0 * C, C, E + b * L * S + row * W, S, 1);
        }
        #pragma omp for schedule(dynamic)
        for (long c = 0; c < (long)B * TT * W; ++c) {          // columns, diagonal dropped
            const long b = c / (TT * W), t = (c / W) % TT, x = c % W;
            const long u0 = b * S + t * HW + x;
            cca_nt<T>(H, H, C, yt.get() + u0 * C, W * C, xt.get() + u0 * C, W * C, tile.get(), H, 1);
            T* e = E + b * L * S + t * HW + x;
            for (int j = 0; j < H; ++j)
                for (int y = 0; y < H; ++y)
                    if (j != y) e[(W + cca_line_channel(j, y)) * S + (long)y * W] = tile[j * H + y];
        }
        if (TT > 1) {
            #pragma omp for schedule(dynamic)
            for (long p = 0; p < (long)B * HW; ++p) {         // temporal lines, diagonal dropped
                const long b = p / HW, u0 = b * S + p % HW;
                cca_nt<T>(TT, TT, C, yt.get() + u0 * C, HW * C, xt.get() + u0 * C, HW * C, tile.get(), TT, 1);
                T* e = E + b * L * S + p % HW;
                for (int j = 0; j < TT; ++j)
                    for (int t = 0; t < TT; ++t)
                        if (j != t) e[(W + H - 1 + cca_line_channel(j, t)) * S + t * HW] = tile[j * TT + t];
            }
        }
    }
}

// gather (scatter = false) or scatter (scatter = true); Y is the value (gather) or the incoming
// gradient (scatter); O [B, C, TT, H, W].
template <typename T>
void cca_cpu_aggregate(const T* A, const T* Y, T* O, int B, int C, int TT, int H, int W, bool scatter) {
    const long HW = (long)H * W, S = TT * HW, L = W + H + TT - 2;
    auto yt = cca_buffer<T>(B * S * C), ot = cca_buffer<T>(B * S * C);
    cca_transpose(Y, yt.get(), B, C, S);
    #pragma omp parallel
    {
        const int n = H > TT ? H : TT;
        auto tile = cca_buffer<T>((long)n * n);
        #pragma omp for schedule(dynamic)
        for (long r = 0; r < (long)B * TT * H; ++r) {
            const long b = r / (TT * H), row = r % (TT * H);
            const long u0 = b * S + row * W;
            const T* a = A + b * L * S + row * W;                // a[i*S + x] = A[b, i, row, x]
            if (scatter) cca_nn<T>(W, C, W, a, S, 1, yt.get() + u0 * C, C, ot.get() + u0 * C, C, false);
            else         cca_nn<T>(W, C, W, a, 1, S, yt.get() + u0 * C, C, ot.get() + u0 * C, C, false);
        }
        #pragma omp for schedule(dynamic)
        for (long c = 0; c < (long)B * TT * W; ++c) {
            const long b = c / (TT * W), t = (c / W) % TT, x = c % W;
            const long u0 = b * S + t * HW + x;
            cca_line_tile<T>(A + b * L * S, S, W, H, W, t * HW + x, tile.get());   // P[y][j]
            if (scatter) cca_nn<T>(H, C, H, tile.get(), 1, H, yt.get() + u0 * C, W * C, ot.get() + u0 * C, W * C, true);
            else         cca_nn<T>(H, C, H, tile.get(), H, 1, yt.get() + u0 * C, W * C, ot.get() + u0 * C, W * C, true);
        }
        if (TT > 1) {
            #pragma omp for schedule(dynamic)
            for (long p = 0; p < (long)B * HW; ++p) {
                const long b = p / HW, u0 = b * S + p % HW;
                cca_line_tile<T>(A + b * L * S, S, W + H - 1, TT, HW, p % HW, tile.get());
                if (scatter) cca_nn<T>(TT, C, TT, tile.get(), 1, TT, yt.get() + u0 * C, HW * C, ot.get() + u0 * C, HW * C, true);
                else         cca_nn<T>(TT, C, TT, tile.get(), TT, 1, yt.get() + u0 * C, HW * C, ot.get() + u0 * C, HW * C, true);
            }
        }
    }
    cca_transpose(ot.get(), O, B, S, C);
}
#endif
"""

_CPU_ELEMENTWISE_SRC = r"""
template <typename T, typename Acc, int KIND>
void cca_cpu_elementwise(long n, const T* a, const T* b, T* out, int C, int TT, int H, int W) {
    #pragma omp parallel for schedule(static)
    for (long idx = 0; idx < n; ++idx) {
        if (KIND == 0) cca_energy_at<T, Acc>(idx, a, b, out, C, TT, H, W);
        else if (KIND == 1) cca_gather_at<T, Acc>(idx, a, b, out, C, TT, H, W);
        else cca_scatter_at<T, Acc>(idx, a, b, out, C, TT, H, W);
    }
}
"""

_ACC_TYPE = {"float16": "float", "float32": "float", "float64": "double"}
# Dims passed to every kernel, read from the 5-D value-like input (in1 for every primitive).
_DIMS_CTHW = "in1_shape1, in1_shape2, in1_shape3, in1_shape4"
_DIMS = "in1_shape0, " + _DIMS_CTHW
_NUMEL = "(long)out0_shape0 * out0_shape1 * out0_shape2 * out0_shape3 * out0_shape4"


def generate_sources(kind, dtype, cpu_kernels="fused"):
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
        cpu_header = _COMMON_SRC + _CPU_ELEMENTWISE_SRC
        cpu_src = (f"cca_cpu_elementwise<in0_type, {acc}, {kind_id}>"
                   f"({_NUMEL}, in0_p, in1_p, out0_p, {_DIMS_CTHW});")
    else:
        cpu_header = _COMMON_SRC + _CPU_BLOCKED_SRC
        if kind == "energy":
            cpu_src = f"cca_cpu_energy<in0_type>(in0_p, in1_p, out0_p, {_DIMS});"
        else:
            cpu_src = (f"cca_cpu_aggregate<in0_type>(in0_p, in1_p, out0_p, {_DIMS}, "
                       f"{'true' if kind == 'scatter' else 'false'});")
    return cpu_header, cpu_src, _CUDA_HEADER, cuda_src


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


def reference_ca_weight(query, key):
    """Energy in the contract layout from explicit shifted copies of K (slow, for tests)."""
    q, k = _as_5d(query), _as_5d(key)
    energy = (q.unsqueeze(2) * _path_copies(k, *k.shape[2:])).sum(1)
    return energy if len(query.shape) == 5 else _as_4d(energy)


def reference_ca_map(attention, value):
    """Aggregation in the contract layout from explicit shifted copies of V (slow, for tests)."""
    a, v = _as_5d(attention), _as_5d(value)
    out = (a.unsqueeze(1) * _path_copies(v, *v.shape[2:])).sum(2)
    return out if len(value.shape) == 5 else _as_4d(out)


def criss_cross_reference(query, key, value, return_attention=False):
    """The -inf-diagonal formulation of DESIGN 2: column energies (self masked) ++ row energies,
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


def criss_cross_reference_3d(query, key, value, return_attention=False):
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


def set_default_impl(name):
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


def ca_weight(query, key, impl=None):
    """Criss-cross energy [B, H+W-1, H, W] of query and key [B, C, H, W] (layout: module doc)."""
    return _weight("ca_weight", query, key, 4, impl)


def ca_map(attention, value, impl=None):
    """Aggregate value [B, C, H, W] along the criss-cross path with attention [B, H+W-1, H, W]."""
    return _map("ca_map", attention, value, 4, impl)


def ca_weight_3d(query, key, impl=None):
    """Space-time energy [B, T+H+W-2, T, H, W] of query and key [B, C, T, H, W]."""
    return _weight("ca_weight_3d", query, key, 5, impl)


def ca_map_3d(attention, value, impl=None):
    """Aggregate value [B, C, T, H, W] along the space-time path with attention [B, T+H+W-2, T, H, W]."""
    return _map("ca_map_3d", attention, value, 5, impl)


# ------------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------------

class CrissCrossAttention(nn.Module):
    """gamma * ca_map(softmax(ca_weight(Q, K)), V) + x with 1x1 convs Q, K (C -> C/8) and V (C -> C).

    RCCA applies the same module R times (shared weights). The 3D subclass works on clips.

    ``impl``: "fused" (default), "elementwise" or "reference" (see ``set_default_impl``); None follows
    the module default at call time. ``keep_attention``: store the last softmaxed attention
    [B, H+W-1, H, W] in ``self.last_attention`` (for visualisation). ``gamma_init``: starting value
    of the residual scale gamma; 0 (official) makes the module start as the identity, which also
    starts every attention weight with a zero gradient, so short schedules may never leave it.
    """
    rank = 4
    projection_conv = nn.Conv2d         # the 1x1 Q/K/V convs; a subclass may store them otherwise

    def __init__(self, in_channels, impl=None, keep_attention=False, gamma_init=0.0):
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

    def _attend(self, query, key, value, impl):
        if impl == "reference":
            # the -inf-diagonal formulation: never builds the contract layout unless asked to
            reference = _REFERENCE_BY_RANK[self.rank]
            if self.keep_attention:
                out, attention = reference(query, key, value, return_attention=True)
                self.last_attention = attention.detach()
                return out
            return reference(query, key, value)
        attention = nn.softmax(_weight(type(self).__name__, query, key, self.rank, impl), dim=1)
        if self.keep_attention:
            self.last_attention = attention.detach()
        return _map(type(self).__name__, attention, value, self.rank, impl)

    def _project(self, x):
        """Q, K, V from one convolution with the three weights stacked: one oneDNN call (and one
        backward) instead of three, ~15% faster on CPU; the parameters stay separate (contract)."""
        convs = (self.query_conv, self.key_conv, self.value_conv)
        weight = jt.concat([conv.weight for conv in convs], dim=0)
        bias = jt.concat([conv.bias for conv in convs], dim=0)
        # a 1x1x1 conv of a clip is a 1x1 conv of its frames stacked along H (oneDNN handles 2D)
        shape = x.shape
        frames = x if self.rank == 4 else x.reshape(shape[0], shape[1], shape[2] * shape[3], shape[4])
        qkv = nn.conv2d(frames, weight.reshape(weight.shape[0], weight.shape[1], 1, 1), bias)
        qkv = qkv.reshape(shape[0], qkv.shape[1], *shape[2:])
        inner = self.in_channels // 8
        return qkv[:, :inner], qkv[:, inner:2 * inner], qkv[:, 2 * inner:]

    def execute(self, x):
        self._check_input(x)
        impl = _resolve_impl(self.impl)
        out = self._attend(*self._project(x), impl)
        return self.gamma * out + x


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
