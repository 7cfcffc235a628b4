// Criss-cross attention on CPU: register-blocked OpenMP kernels that work on the NCHW (NCTHW)
// tensors as they are, so no pass transposes a whole C-wide tensor.
//
// Every primitive splits the criss-cross path into two kinds of work:
// * rows: the W row entries of the positions (t, y, *) form one small matrix product per row,
//   vectorised along x (contiguous);
// * lines: the column entries (H - 1 per position) and temporal entries (T - 1) join positions of
//   one column / one temporal line. Neighbouring columns (or neighbouring (y, x) of the temporal
//   lines) run side by side in the vector lanes, so each lane does its own small matrix product.
// Each task copies the rows or line strips it reads into small contiguous panels first: with
// power-of-two sizes the channel stride of an NCHW tensor maps every channel onto the same cache
// sets, and the panels also pad rows to whole vectors. Needs cca_line_source / cca_line_channel
// from the common header.
#ifndef CCA_CPU_H
#define CCA_CPU_H
#include <cmath>
#include <cstring>
#include <memory>
#include <omp.h>
#include <type_traits>

#if defined(__AVX512F__)
#define CCA_VECTOR_BYTES 64
#else
#define CCA_VECTOR_BYTES 32
#endif
template <typename T> struct CcaVec;
template <> struct CcaVec<float>  { typedef float  type __attribute__((vector_size(CCA_VECTOR_BYTES))); };
template <> struct CcaVec<double> { typedef double type __attribute__((vector_size(CCA_VECTOR_BYTES))); };

template <typename T> constexpr int cca_lanes() { return CCA_VECTOR_BYTES / (int)sizeof(T); }
template <typename V, typename T> inline V cca_load(const T* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
template <typename V, typename T> inline void cca_store(T* p, const V& v) { std::memcpy(p, &v, sizeof(V)); }
// Loads into a register that the compiler may not replace by a memory operand: GCC otherwise
// folds the load into every multiply-add that uses it and issues it once per use.
template <typename V, typename T> inline V cca_load_register(const T* p) {
    V v = cca_load<V>(p);
    __asm__("" : "+x"(v));
    return v;
}
inline long cca_round_up(long n, long m) { return (n + m - 1) / m * m; }

template <typename T> std::unique_ptr<T[]> cca_buffer(long n) { return std::unique_ptr<T[]>(new T[n > 0 ? n : 1]); }

// Calls f(std::integral_constant<int, r>) for 1 <= r <= 6: the tail tiles of the blocked loops
// get their own fully unrolled instance.
template <typename F> inline void cca_with_size(int r, F&& f) {
    switch (r) {
        case 1: f(std::integral_constant<int, 1>()); break;
        case 2: f(std::integral_constant<int, 2>()); break;
        case 3: f(std::integral_constant<int, 3>()); break;
        case 4: f(std::integral_constant<int, 4>()); break;
        case 5: f(std::integral_constant<int, 5>()); break;
        default: f(std::integral_constant<int, 6>()); break;
    }
}

// Stores o[0 .. nvalid) = (base ? base[..] : 0) + alpha * v (whole vector when nvalid >= lanes).
template <typename T, typename V>
inline void cca_store_lanes(T* o, const T* base, const V& v, T alpha, int nvalid) {
    const int VL = cca_lanes<T>();
    if (nvalid >= VL) {
        V r = alpha * v;
        if (base) r += cca_load<V>(base);
        cca_store(o, r);
    } else {
        for (int e = 0; e < nvalid; ++e) o[e] = (base ? base[e] : T(0)) + alpha * v[e];
    }
}

// Copies the first nvalid of VL lanes from src to dst and zeroes the rest (inline whole-vector
// copy in the common case: a library memcpy per 32 bytes costs more than the copy).
template <typename T>
inline void cca_copy_lanes(T* dst, const T* src, int nvalid) {
    typedef typename CcaVec<T>::type V;
    const int VL = cca_lanes<T>();
    if (nvalid == VL) { cca_store(dst, cca_load<V>(src)); return; }
    for (int l = 0; l < VL; ++l) dst[l] = l < nvalid ? src[l] : T(0);
}

// Geometry of a [B, C, T, H, W] problem; S positions per channel, L path entries per position.
struct CcaShape {
    int B, T, H, W, L; long HW, S;
    CcaShape(int b, int t, int h, int w) : B(b), T(t), H(h), W(w), L(w + h + t - 2), HW((long)h * w), S((long)t * h * w) {}
};

// Channels [c0, c0 + C) of a [B, Ctotal, S] tensor: Q, K and V may be slices of one tensor.
template <typename T> struct CcaMap {
    T* data; long batch_stride; int C; long S;
    T* at(int b, int c) const { return data + b * batch_stride + (long)c * S; }
};
template <typename T> CcaMap<T> cca_map(T* p, int b_channels, int c0, int C, long S) {
    return CcaMap<T>{p + (long)c0 * S, (long)b_channels * S, C, S};
}

// ------------------------------------------------------------------------------------------------
// Rows
// ------------------------------------------------------------------------------------------------

// One MR x (NV vectors) tile of O = base + alpha * A * Bm, where A[m][k] = A[m*am + k*ak] is read
// as broadcast scalars and Bm rows (ldb) as vectors.
template <typename T, int MR, int NV>
inline void cca_row_tile(int K, const T* A, long am, long ak, const T* Bm, long ldb,
                         T* O, long ldo, const T* base, long ldbase, int nvalid, T alpha) {
    typedef typename CcaVec<T>::type V;
    const int VL = cca_lanes<T>();
    V s[MR][NV];
    for (int m = 0; m < MR; ++m) for (int v = 0; v < NV; ++v) s[m][v] = V{};
    for (int k = 0; k < K; ++k) {
        V b[NV];
        for (int v = 0; v < NV; ++v) b[v] = cca_load<V>(Bm + (long)k * ldb + v * VL);
        for (int m = 0; m < MR; ++m) {
            const T a = A[m * am + k * ak];
            for (int v = 0; v < NV; ++v) s[m][v] += a * b[v];
        }
    }
    for (int m = 0; m < MR; ++m)
        for (int v = 0; v < NV && v * VL < nvalid; ++v)
            cca_store_lanes(O + m * ldo + v * VL, base ? base + m * ldbase + v * VL : nullptr, s[m][v], alpha,
                            nvalid - v * VL);
}

// O[M x nvalid] = base + alpha * A[M x K] * Bm[K x N]; Bm rows padded to whole vectors. K runs
// in chunks so that the chunk of Bm stays in L2 across the tiles.
template <typename T>
void cca_row_product(int M, int nvalid, int K, const T* A, long am, long ak, const T* Bm, long ldb,
                     T* O, long ldo, const T* base, long ldbase, T alpha) {
    const int MR = 6, NR = 2 * cca_lanes<T>(), KC = 128;
    for (int k0 = 0; k0 < K; k0 += KC) {
        const int kc = K - k0 < KC ? K - k0 : KC;
        const T* a0 = A + k0 * ak; const T* b0 = Bm + (long)k0 * ldb;
        const T* base0 = k0 ? O : base; const long ldbase0 = k0 ? ldo : ldbase;
        for (int m = 0; m < M; m += MR) {
            cca_with_size(M - m < MR ? M - m : MR, [&](auto rows) {
                constexpr int R = decltype(rows)::value;
                const T* bm = base0 ? base0 + m * ldbase0 : nullptr;
                int n = 0;
                for (; n + NR <= nvalid; n += NR)
                    cca_row_tile<T, R, 2>(kc, a0 + m * am, am, ak, b0 + n, ldb, O + m * ldo + n, ldo,
                                          bm ? bm + n : nullptr, ldbase0, NR, alpha);
                for (; n < nvalid; n += NR / 2)
                    cca_row_tile<T, R, 1>(kc, a0 + m * am, am, ak, b0 + n, ldb, O + m * ldo + n, ldo,
                                          bm ? bm + n : nullptr, ldbase0, nvalid - n, alpha);
            });
        }
    }
}

// Copies the row of W positions starting at `pos` of every channel of z into P[c][ld] (zero pad).
template <typename T>
void cca_pack_row(const CcaMap<T>& z, int b, long pos, int W, long ld, T* P) {
    for (int c = 0; c < z.C; ++c) {
        std::memcpy(P + c * ld, z.at(b, c) + pos, W * sizeof(T));
        for (long x = W; x < ld; ++x) P[c * ld + x] = T(0);
    }
}

// Row entries of the attention at the row's positions: P[i][x] = A[i, pos + x] (transpose = false)
// or P[x][i] = A[i, pos + x] (transpose = true), rows padded to ld.
template <typename T>
void cca_pack_row_attention(const T* A, long S, int W, long pos, bool transpose, long ld, T* P) {
    for (int r = 0; r < W; ++r) {
        T* p = P + r * ld;
        if (transpose) for (int i = 0; i < W; ++i) p[i] = A[i * S + pos + r];
        else std::memcpy(p, A + r * S + pos, W * sizeof(T));
        for (long x = W; x < ld; ++x) p[x] = T(0);
    }
}

// Softmax over the L entries at W consecutive positions (a row), in place; w holds 2W scratch.
template <typename T>
void cca_softmax_row(T* A, long S, int L, int W, T* w) {
    T* top = w; T* inv = w + W;
    for (int x = 0; x < W; ++x) top[x] = A[x];
    for (int i = 1; i < L; ++i) { const T* a = A + i * S; for (int x = 0; x < W; ++x) top[x] = a[x] > top[x] ? a[x] : top[x]; }
    for (int x = 0; x < W; ++x) inv[x] = T(0);
    for (int i = 0; i < L; ++i) {
        T* a = A + i * S;
        for (int x = 0; x < W; ++x) { const T e = std::exp(a[x] - top[x]); a[x] = e; inv[x] += e; }
    }
    for (int x = 0; x < W; ++x) inv[x] = T(1) / inv[x];
    for (int i = 0; i < L; ++i) { T* a = A + i * S; for (int x = 0; x < W; ++x) a[x] *= inv[x]; }
}

// Softmax backward at a row, in place: D = gamma * A * (D - sum_i A * D). Returns the sum over
// the row of sum_i A * D (the gradient of the residual scale). w holds W scratch.
template <typename T>
double cca_softmax_grad_row(const T* A, T* D, long S, int L, int W, T gamma, T* w) {
    for (int x = 0; x < W; ++x) w[x] = T(0);
    for (int i = 0; i < L; ++i) { const T* a = A + i * S; const T* d = D + i * S; for (int x = 0; x < W; ++x) w[x] += a[x] * d[x]; }
    double total = 0;
    for (int x = 0; x < W; ++x) total += w[x];
    for (int i = 0; i < L; ++i) {
        const T* a = A + i * S; T* d = D + i * S;
        for (int x = 0; x < W; ++x) d[x] = gamma * a[x] * (d[x] - w[x]);
    }
    return total;
}

// Scratch of one row task: two channel panels and the attention tile.
template <typename T> struct CcaRowScratch {
    long ld; std::unique_ptr<T[]> x, y, a;
    CcaRowScratch(const CcaShape& g, int cx, int cy)
        : ld(cca_round_up(g.W, cca_lanes<T>())), x(cca_buffer<T>(cx * ld)), y(cca_buffer<T>(cy * ld)),
          a(cca_buffer<T>(g.W * ld > 2 * ld ? g.W * ld : 2 * ld)) {}
};

// E[i, row + x] = sum_c Y[c, row + i] X[c, row + x] for the row entries i (rows already packed).
template <typename T>
void cca_row_energy(const CcaShape& g, const CcaRowScratch<T>& s, int C, T* E, long pos) {
    cca_row_product<T>(g.W, g.W, C, s.y.get(), 1, s.ld, s.x.get(), s.ld, E + pos, g.S, nullptr, 0, T(1));
}

// O[c, row + x] = base + alpha * sum_k Z[c, k] P[k, x] with Z packed in s.x and P in s.a:
// gather (P[i][x] = A[i, row + x]) or scatter (P[x][px] = A[px, row + x]).
template <typename T>
void cca_row_aggregate(const CcaShape& g, const CcaRowScratch<T>& s, const CcaMap<T>& out, int b, long pos,
                       const CcaMap<T>* base, T alpha) {
    cca_row_product<T>(out.C, g.W, g.W, s.x.get(), s.ld, 1, s.a.get(), s.ld, out.at(b, 0) + pos, out.S,
                       base ? base->at(b, 0) + pos : nullptr, base ? base->S : 0, alpha);
}

// ------------------------------------------------------------------------------------------------
// Lines (columns and temporal lines)
// ------------------------------------------------------------------------------------------------

// A family of lines: in each of `planes` planes (plane p starts at p * plane_stride), lane l in
// [0, extent) has the n positions plane + s * stride + l, s in [0, n); its path entries are
// first + cca_line_channel(other, self). Columns: planes = T, n = H, stride = W, extent = W,
// first = W. Temporal lines: planes = 1, n = T, stride = HW, extent = HW, first = W + H - 1.
struct CcaLines {
    int planes, n, extent, first; long plane_stride, stride;
};
inline CcaLines cca_columns(const CcaShape& g) { return CcaLines{g.T, g.H, g.W, g.W, g.HW, g.W}; }
inline CcaLines cca_temporal(const CcaShape& g) { return CcaLines{1, g.T, (int)g.HW, g.W + g.H - 1, 0, g.HW}; }

// The line families of a shape that have entries (columns need H > 1, temporal lines T > 1).
template <typename F> inline void cca_for_each_line_family(const CcaShape& g, F&& f) {
    if (g.H > 1) f(cca_columns(g));
    if (g.T > 1) f(cca_temporal(g));
}

// A line task: a range of neighbouring lanes of one plane, cut into blocks of one vector each.
// A task reads and writes the NCHW tensors only in row segments of its lanes (contiguous runs,
// in order), never one vector here and one there: scattered accesses were what made the line
// passes slow. Everything else works on packed per-block panels: block k of a panel starts at
// k * (panel block size).
struct CcaLineRange {
    int b; long origin; int lanes, blocks;            // origin: position of the first lane
    int valid(int k, int VL) const { const int rest = lanes - k * VL; return rest < VL ? rest : VL; }
};

// Splits every plane into ranges of whole blocks: about four tasks per thread (so that a thread
// that is held up does not hold up the pass), as wide as that allows (wide ranges give long
// contiguous segments).
struct CcaLineTasks {
    int ranges, blocks_per_range, blocks; long count;
    CcaLineTasks(const CcaShape& g, const CcaLines& f, int VL) {
        blocks = (f.extent + VL - 1) / VL;
        const long planes = (long)g.B * f.planes, wanted = 4L * omp_get_num_threads();
        long r = (wanted + planes - 1) / planes;
        r = r < 1 ? 1 : r > blocks ? blocks : r;
        blocks_per_range = (int)((blocks + r - 1) / r);
        ranges = (blocks + blocks_per_range - 1) / blocks_per_range;
        count = planes * ranges;
    }
    CcaLineRange operator()(const CcaLines& f, long task, int VL) const {
        const long bp = task / ranges; const int blk0 = (int)(task % ranges) * blocks_per_range;
        const int nb = blocks - blk0 < blocks_per_range ? blocks - blk0 : blocks_per_range;
        const int l0 = blk0 * VL, lanes = f.extent - l0 < nb * VL ? f.extent - l0 : nb * VL;
        return CcaLineRange{(int)(bp / f.planes), (bp % f.planes) * f.plane_stride + l0, lanes, nb};
    }
};

// Channels per strip chunk: the strips of one block for one chunk (n x chunk vectors each) stay
// in L2 during its tiles.
inline int cca_strip_chunk(int n, int C) {
    int chunk = 131072 / (n * CCA_VECTOR_BYTES) / 6 * 6;
    chunk = chunk < 6 ? 6 : chunk;
    return chunk < C ? chunk : C;
}
// Distance between the rows of a panel: one vector of padding, so that rows a power of two
// apart do not fall into the same cache sets.
inline long cca_panel_stride(int count, int VL) { return (long)(count + 1) * VL; }

// Strips of channels [c0, c0 + nc) of z: block k, P[k * bs + s * rs + c * VL + l] = z[c, position
// s of lane k * VL + l] (zero beyond the last lane).
template <typename T>
void cca_pack_strips(const CcaMap<T>& z, const CcaLines& f, const CcaLineRange& t, int c0, int nc, long rs, long bs, T* P) {
    const int VL = cca_lanes<T>();
    for (int c = 0; c < nc; ++c)
        for (int s = 0; s < f.n; ++s) {
            const T* src = z.at(t.b, c0 + c) + t.origin + s * f.stride;
            for (int k = 0; k < t.blocks; ++k) cca_copy_lanes(P + k * bs + s * rs + c * VL, src + k * VL, t.valid(k, VL));
        }
}

// Line tiles of the attention, zero on the diagonal (a position counts once, in its row), for
// every block (stride bs):
// gather:  P[s * ps + r * VL + l] = A[first + ch(s, r), position r]  (s: source, r: output)
// scatter: P[s * ps + r * VL + l] = A[first + ch(r, s), position s]
template <typename T>
void cca_pack_line_attention(const T* A, long S, const CcaLines& f, const CcaLineRange& t, bool scatter, long ps, long bs, T* P) {
    const int VL = cca_lanes<T>();
    for (int e = 0; e + 1 < f.n; ++e)                   // entry e of the line of `self` is `other`
        for (int self = 0; self < f.n; ++self) {
            const int other = cca_line_source(e, self);
            const T* src = A + (f.first + e) * S + t.origin + self * f.stride;
            const long at = scatter ? self * ps + other * VL : other * ps + self * VL;
            for (int k = 0; k < t.blocks; ++k) cca_copy_lanes(P + k * bs + at, src + k * VL, t.valid(k, VL));
        }
    for (int k = 0; k < t.blocks; ++k)
        for (int s = 0; s < f.n; ++s) for (int l = 0; l < VL; ++l) P[k * bs + s * ps + s * VL + l] = T(0);
}

// acc[c][r] = sum_s Z[s][c] * P[s][r] (lanewise) over the n positions s of one position block,
// for CB channels x RB outputs, stored to (or added to) the packed output O[c * oc + r * VL]. The RB
// attention vectors stay in registers while the CB channels stream through one at a time:
// 6 x 2 accumulators fit the 16 AVX2 registers.
template <typename T, int CB, int RB>
inline void cca_line_aggregate_tile(int n, const T* Z, long zs, const T* P, long ps, T* O, long oc, bool accumulate) {
    typedef typename CcaVec<T>::type V;
    const int VL = cca_lanes<T>();
    V acc[CB][RB];
    for (int c = 0; c < CB; ++c)
        for (int r = 0; r < RB; ++r) acc[c][r] = accumulate ? cca_load<V>(O + c * oc + r * VL) : V{};
    for (int s = 0; s < n; ++s) {
        V p[RB];
        for (int r = 0; r < RB; ++r) p[r] = cca_load<V>(P + s * ps + r * VL);
        for (int c = 0; c < CB; ++c) {
            const V z = cca_load_register<V>(Z + s * zs + c * VL);
            for (int r = 0; r < RB; ++r) acc[c][r] += z * p[r];
        }
    }
    for (int c = 0; c < CB; ++c) for (int r = 0; r < RB; ++r) cca_store(O + c * oc + r * VL, acc[c][r]);
}

// Packed O[c * oc + r * VL] = sum_s Z[s][c] P[s][r] for one block, c < nc, every output r. The
// positions and the outputs run in blocks so that the slice of P they span stays in L1 while
// every channel tile passes over it (a whole block of P, n x n vectors, only fits L2).
template <typename T>
void cca_line_aggregate(int n, const T* Z, long zs, int nc, const T* P, long ps, T* O, long oc) {
    const int VL = cca_lanes<T>(), CB = 6, SB = 24, RBLOCK = 16;
    for (int s0 = 0; s0 < n; s0 += SB) {
        const int sb = n - s0 < SB ? n - s0 : SB;
        const T* z0 = Z + s0 * zs; const T* p0 = P + s0 * ps;
        for (int r0 = 0; r0 < n; r0 += RBLOCK) {
            const int r1 = n - r0 < RBLOCK ? n : r0 + RBLOCK;
            for (int c = 0; c < nc; c += CB) {
                cca_with_size(nc - c < CB ? nc - c : CB, [&](auto cbs) {
                    constexpr int CBS = decltype(cbs)::value;
                    int r = r0;
                    for (; r + 2 <= r1; r += 2)
                        cca_line_aggregate_tile<T, CBS, 2>(sb, z0 + c * VL, zs, p0 + r * VL, ps, O + c * oc + r * VL, oc, s0 > 0);
                    if (r < r1) cca_line_aggregate_tile<T, CBS, 1>(sb, z0 + c * VL, zs, p0 + r * VL, ps, O + c * oc + r * VL, oc, s0 > 0);
                });
            }
        }
    }
}

// out[c0 + c, position r] += alpha * O[k * bs + c * oc + r * VL] for the task's lanes.
template <typename T>
void cca_unpack_aggregate(const T* O, long oc, long bs, const CcaLines& f, const CcaLineRange& t, const CcaMap<T>& out,
                          int c0, int nc, T alpha) {
    const int VL = cca_lanes<T>();
    for (int c = 0; c < nc; ++c)
        for (int r = 0; r < f.n; ++r) {
            T* dst = out.at(t.b, c0 + c) + t.origin + r * f.stride;
            for (int k = 0; k < t.blocks; ++k)
                cca_store_lanes(dst + k * VL, dst + k * VL, cca_load<typename CcaVec<T>::type>(O + k * bs + c * oc + r * VL),
                                alpha, t.valid(k, VL));
        }
}

// acc[y][j] = sum_c X[y][c] * Y[j][c] (lanewise) for YB x JB positions of the line, stored to
// (or, after the first channel chunk, added to) the packed energies P[y * ps + j * VL]. The JB
// vectors of Y stay in registers while X streams (6 x 2 accumulators fit the AVX2 registers).
template <typename T, int YB, int JB>
inline void cca_line_energy_tile(int C, const T* X, const T* Y, long rs, T* P, long ps, bool accumulate) {
    typedef typename CcaVec<T>::type V;
    const int VL = cca_lanes<T>();
    V acc[YB][JB];
    for (int y = 0; y < YB; ++y) for (int j = 0; j < JB; ++j) acc[y][j] = V{};
    for (int c = 0; c < C; ++c) {
        V b[JB];
        for (int j = 0; j < JB; ++j) b[j] = cca_load<V>(Y + j * rs + c * VL);
        for (int y = 0; y < YB; ++y) {
            const V a = cca_load_register<V>(X + y * rs + c * VL);
            for (int j = 0; j < JB; ++j) acc[y][j] += a * b[j];
        }
    }
    for (int y = 0; y < YB; ++y)
        for (int j = 0; j < JB; ++j) {
            T* p = P + y * ps + j * VL;
            cca_store(p, accumulate ? acc[y][j] + cca_load<V>(p) : acc[y][j]);
        }
}

// Packed line energies P[y * ps + j * VL] of one block from one channel chunk of its strips X, Y
// (nc channels, row stride rs).
template <typename T>
void cca_line_energy(int n, const T* X, const T* Y, long rs, int nc, T* P, long ps, bool accumulate) {
    const int VL = cca_lanes<T>(), YB = 6;
    for (int y = 0; y < n; y += YB) {
        cca_with_size(n - y < YB ? n - y : YB, [&](auto ybs) {
            constexpr int Y_ = decltype(ybs)::value;
            int j = 0;
            for (; j + 2 <= n; j += 2) cca_line_energy_tile<T, Y_, 2>(nc, X + y * rs, Y + j * rs, rs, P + y * ps + j * VL, ps, accumulate);
            if (j < n) cca_line_energy_tile<T, Y_, 1>(nc, X + y * rs, Y + j * rs, rs, P + y * ps + j * VL, ps, accumulate);
        });
    }
}

// Writes the packed energies (block k at k * bs) into the line entries
// E[first + e, position self] = P[self][other] with other = source of entry e.
template <typename T>
void cca_unpack_line_energy(const T* P, long ps, long bs, const CcaLines& f, const CcaLineRange& t, T* E, long S) {
    const int VL = cca_lanes<T>();
    for (int e = 0; e + 1 < f.n; ++e)
        for (int self = 0; self < f.n; ++self) {
            T* dst = E + (f.first + e) * S + t.origin + self * f.stride;
            const T* src = P + self * ps + cca_line_source(e, self) * VL;
            for (int k = 0; k < t.blocks; ++k) {
                const int valid = t.valid(k, VL);
                if (valid == VL) cca_store(dst + k * VL, cca_load<typename CcaVec<T>::type>(src + k * bs));
                else for (int l = 0; l < valid; ++l) dst[k * VL + l] = src[k * bs + l];
            }
        }
}

// Per-thread panels of the line tasks, sized for the widest range: strips x (and y) of one
// channel chunk, the attention tiles a, the packed energies e, the packed outputs o.
template <typename T> struct CcaLinePanels {
    int chunk; long rs, ps, sbs, tbs, obs; std::unique_ptr<T[]> x, y, a, e, o;
    CcaLinePanels(const CcaLines& f, const CcaLineTasks& tasks, int C, bool two_strips, bool attention, bool energies)
        : chunk(cca_strip_chunk(f.n, C)), rs(cca_panel_stride(chunk, cca_lanes<T>())),
          ps(cca_panel_stride(f.n, cca_lanes<T>())), sbs(f.n * rs), tbs(f.n * ps), obs((long)chunk * ps) {
        const long nb = tasks.blocks_per_range;
        x = cca_buffer<T>(nb * sbs);
        y = cca_buffer<T>(two_strips ? nb * sbs : 0);
        a = cca_buffer<T>(attention ? nb * tbs : 0);
        e = cca_buffer<T>(energies ? nb * tbs : 0);
        o = cca_buffer<T>(attention ? nb * obs : 0);
    }
};

// ------------------------------------------------------------------------------------------------
// The three primitives (see the common header for their definitions) and their phases
// ------------------------------------------------------------------------------------------------

// E [B, L, S] = energy(X, Y): row entries. No barrier at the end: the line entries, computed
// next, are other entries of E.
template <typename T>
void cca_phase_row_energy(const CcaShape& g, const CcaMap<T>& X, const CcaMap<T>& Y, T* E) {
    CcaRowScratch<T> s(g, X.C, Y.C);
    #pragma omp for schedule(dynamic) nowait
    for (long r = 0; r < (long)g.B * g.T * g.H; ++r) {
        const int b = (int)(r / ((long)g.T * g.H)); const long pos = r % ((long)g.T * g.H) * g.W;
        cca_pack_row(X, b, pos, g.W, s.ld, s.x.get());
        cca_pack_row(Y, b, pos, g.W, s.ld, s.y.get());
        cca_row_energy(g, s, X.C, E + (long)b * g.L * g.S, pos);
    }
}

// Line entries of E = energy(X, Y).
template <typename T>
void cca_phase_line_energy(const CcaShape& g, const CcaMap<T>& X, const CcaMap<T>& Y, T* E) {
    const int VL = cca_lanes<T>();
    cca_for_each_line_family(g, [&](const CcaLines& f) {
        const CcaLineTasks tasks(g, f, VL);
        CcaLinePanels<T> p(f, tasks, X.C, true, false, true);
        #pragma omp for schedule(dynamic) nowait
        for (long task = 0; task < tasks.count; ++task) {
            const CcaLineRange t = tasks(f, task, VL);
            for (int c0 = 0; c0 < X.C; c0 += p.chunk) {
                const int nc = X.C - c0 < p.chunk ? X.C - c0 : p.chunk;
                cca_pack_strips(X, f, t, c0, nc, p.rs, p.sbs, p.x.get());
                cca_pack_strips(Y, f, t, c0, nc, p.rs, p.sbs, p.y.get());
                for (int k = 0; k < t.blocks; ++k)
                    cca_line_energy(f.n, p.x.get() + k * p.sbs, p.y.get() + k * p.sbs, p.rs, nc, p.e.get() + k * p.tbs, p.ps, c0 > 0);
            }
            cca_unpack_line_energy(p.e.get(), p.ps, p.tbs, f, t, E + (long)t.b * g.L * g.S, g.S);
        }
    });
    #pragma omp barrier
}

// out = base + alpha * (gather or scatter)(A, Z): row entries.
template <typename T>
void cca_phase_row_aggregate(const CcaShape& g, const T* A, const CcaMap<T>& Z, const CcaMap<T>& out,
                             bool scatter, const CcaMap<T>* base, T alpha) {
    CcaRowScratch<T> s(g, Z.C, 0);
    #pragma omp for schedule(dynamic)
    for (long r = 0; r < (long)g.B * g.T * g.H; ++r) {
        const int b = (int)(r / ((long)g.T * g.H)); const long pos = r % ((long)g.T * g.H) * g.W;
        cca_pack_row(Z, b, pos, g.W, s.ld, s.x.get());
        cca_pack_row_attention(A + (long)b * g.L * g.S, g.S, g.W, pos, scatter, s.ld, s.a.get());
        cca_row_aggregate(g, s, out, b, pos, base, alpha);
    }
}

// One line aggregation: out += alpha * (gather or scatter)(A, Z), line entries.
template <typename T> struct CcaLineAggregation {
    const T* A; CcaMap<T> Z, out; bool scatter; T alpha;
};

// Runs independent line aggregations (distinct outputs) as one pass. Each family runs in its own
// pass, since columns and temporal lines add into the same outputs.
template <typename T>
void cca_phase_line_aggregate(const CcaShape& g, const CcaLineAggregation<T>* jobs, int njobs) {
    const int VL = cca_lanes<T>();
    int widest = 0;
    for (int j = 0; j < njobs; ++j) widest = jobs[j].Z.C > widest ? jobs[j].Z.C : widest;
    cca_for_each_line_family(g, [&](const CcaLines& f) {
        const CcaLineTasks tasks(g, f, VL);
        CcaLinePanels<T> p(f, tasks, widest, false, true, false);
        #pragma omp for schedule(dynamic)
        for (long task = 0; task < njobs * tasks.count; ++task) {
            const CcaLineAggregation<T>& job = jobs[task / tasks.count];
            const CcaLineRange t = tasks(f, task % tasks.count, VL);
            cca_pack_line_attention(job.A + (long)t.b * g.L * g.S, g.S, f, t, job.scatter, p.ps, p.tbs, p.a.get());
            for (int c0 = 0; c0 < job.Z.C; c0 += p.chunk) {
                const int nc = job.Z.C - c0 < p.chunk ? job.Z.C - c0 : p.chunk;
                cca_pack_strips(job.Z, f, t, c0, nc, p.rs, p.sbs, p.x.get());
                for (int k = 0; k < t.blocks; ++k)
                    cca_line_aggregate(f.n, p.x.get() + k * p.sbs, p.rs, nc, p.a.get() + k * p.tbs, p.ps, p.o.get() + k * p.obs, p.ps);
                cca_unpack_aggregate(p.o.get(), p.ps, p.obs, f, t, job.out, c0, nc, job.alpha);
            }
        }
    });
}

// Standalone primitives (ca_weight / ca_map and their gradients), 5-D tensors [B, C, T, H, W].
template <typename T>
void cca_cpu_energy(T* X, T* Y, T* E, int B, int C, int TT, int H, int W) {
    const CcaShape g(B, TT, H, W);
    const CcaMap<T> x = cca_map(X, C, 0, C, g.S), y = cca_map(Y, C, 0, C, g.S);
    #pragma omp parallel
    {
        cca_phase_row_energy(g, x, y, E);
        cca_phase_line_energy(g, x, y, E);
    }
}

template <typename T>
void cca_cpu_aggregate(T* A, T* Z, T* O, int B, int C, int TT, int H, int W, bool scatter) {
    const CcaShape g(B, TT, H, W);
    const CcaMap<T> z = cca_map(Z, C, 0, C, g.S), o = cca_map(O, C, 0, C, g.S);
    #pragma omp parallel
    {
        cca_phase_row_aggregate(g, A, z, o, scatter, (const CcaMap<T>*)nullptr, T(1));
        const CcaLineAggregation<T> job{A, z, o, scatter, T(1)};
        cca_phase_line_aggregate(g, &job, 1);
    }
}

// ------------------------------------------------------------------------------------------------
// The whole attention of the module in one forward and one backward kernel
// ------------------------------------------------------------------------------------------------
// qkv [B, 2 * Ck + C, S] holds Q, K (Ck channels each) and V (C); x [B, C, S] is the module input.
// forward: A = softmax(energy(Q, K)) [B, L, S], out = x + gamma * gather(A, V).
// backward, from the output gradient G: D = energy(G, V); dgamma = sum A * D;
// dE = gamma * A * (D - sum_i A * D); dV = gamma * scatter(A, G); dQ = gather(dE, K);
// dK = scatter(dE, Q). The input gradient G itself is the residual's share, left to the caller.

template <typename T>
void cca_cpu_attention_forward(T* qkv, T* x, T gamma, T* out, T* A, int B, int Ck, int C, int TT, int H, int W) {
    const CcaShape g(B, TT, H, W);
    const int total = 2 * Ck + C;
    const CcaMap<T> q = cca_map(qkv, total, 0, Ck, g.S), k = cca_map(qkv, total, Ck, Ck, g.S),
                    v = cca_map(qkv, total, 2 * Ck, C, g.S), in = cca_map(x, C, 0, C, g.S), o = cca_map(out, C, 0, C, g.S);
    #pragma omp parallel
    {
        cca_phase_row_energy(g, q, k, A);
        cca_phase_line_energy(g, q, k, A);
        // rows: the softmax of the row's positions (all their entries are done), then its row entries
        CcaRowScratch<T> s(g, C, 0);
        #pragma omp for schedule(dynamic)
        for (long r = 0; r < (long)g.B * g.T * g.H; ++r) {
            const int b = (int)(r / ((long)g.T * g.H)); const long pos = r % ((long)g.T * g.H) * g.W;
            T* a = A + (long)b * g.L * g.S;
            cca_softmax_row(a + pos, g.S, g.L, g.W, s.a.get());
            cca_pack_row(v, b, pos, g.W, s.ld, s.x.get());
            cca_pack_row_attention(a, g.S, g.W, pos, false, s.ld, s.a.get());
            cca_row_aggregate(g, s, o, b, pos, &in, gamma);
        }
        const CcaLineAggregation<T> job{A, v, o, false, gamma};
        cca_phase_line_aggregate(g, &job, 1);
    }
}

template <typename T>
void cca_cpu_attention_backward(T* qkv, T* A, T* G, T gamma, T* dqkv, double* dgamma,
                                int B, int Ck, int C, int TT, int H, int W) {
    const CcaShape g(B, TT, H, W);
    const int total = 2 * Ck + C;
    const CcaMap<T> q = cca_map(qkv, total, 0, Ck, g.S), k = cca_map(qkv, total, Ck, Ck, g.S),
                    v = cca_map(qkv, total, 2 * Ck, C, g.S), go = cca_map(G, C, 0, C, g.S),
                    dq = cca_map(dqkv, total, 0, Ck, g.S), dk = cca_map(dqkv, total, Ck, Ck, g.S),
                    dv = cca_map(dqkv, total, 2 * Ck, C, g.S);
    auto D = cca_buffer<T>((long)B * g.L * g.S);
    // one partial sum per row, added up in order: the result does not depend on the scheduling
    const long rows = (long)g.B * g.T * g.H;
    auto row_gamma_grad = cca_buffer<double>(rows);
    const int VL = cca_lanes<T>();
    #pragma omp parallel
    {
        {   // rows: D row entries and dV row entries share the packed rows of G
            CcaRowScratch<T> s(g, C, C);
            #pragma omp for schedule(dynamic)
            for (long r = 0; r < (long)g.B * g.T * g.H; ++r) {
                const int b = (int)(r / ((long)g.T * g.H)); const long pos = r % ((long)g.T * g.H) * g.W;
                cca_pack_row(go, b, pos, g.W, s.ld, s.x.get());
                cca_pack_row(v, b, pos, g.W, s.ld, s.y.get());
                cca_row_energy(g, s, C, D.get() + (long)b * g.L * g.S, pos);
                cca_pack_row_attention(A + (long)b * g.L * g.S, g.S, g.W, pos, true, s.ld, s.a.get());
                cca_row_aggregate(g, s, dv, b, pos, (const CcaMap<T>*)nullptr, gamma);
            }
        }
        // lines: D line entries and dV line entries share the strips of G
        cca_for_each_line_family(g, [&](const CcaLines& f) {
            const CcaLineTasks tasks(g, f, VL);
            CcaLinePanels<T> p(f, tasks, C, true, true, true);
            #pragma omp for schedule(dynamic)
            for (long task = 0; task < tasks.count; ++task) {
                const CcaLineRange t = tasks(f, task, VL);
                cca_pack_line_attention(A + (long)t.b * g.L * g.S, g.S, f, t, true, p.ps, p.tbs, p.a.get());
                for (int c0 = 0; c0 < C; c0 += p.chunk) {
                    const int nc = C - c0 < p.chunk ? C - c0 : p.chunk;
                    cca_pack_strips(go, f, t, c0, nc, p.rs, p.sbs, p.x.get());
                    cca_pack_strips(v, f, t, c0, nc, p.rs, p.sbs, p.y.get());
                    for (int kb = 0; kb < t.blocks; ++kb) {
                        const T* gs = p.x.get() + kb * p.sbs;
                        cca_line_energy(f.n, gs, p.y.get() + kb * p.sbs, p.rs, nc, p.e.get() + kb * p.tbs, p.ps, c0 > 0);
                        cca_line_aggregate(f.n, gs, p.rs, nc, p.a.get() + kb * p.tbs, p.ps, p.o.get() + kb * p.obs, p.ps);
                    }
                    cca_unpack_aggregate(p.o.get(), p.ps, p.obs, f, t, dv, c0, nc, gamma);
                }
                cca_unpack_line_energy(p.e.get(), p.ps, p.tbs, f, t, D.get() + (long)t.b * g.L * g.S, g.S);
            }
        });
        {   // rows: softmax backward of the row (D becomes dE), then dQ and dK row entries
            CcaRowScratch<T> s(g, Ck, Ck);
            #pragma omp for schedule(dynamic)
            for (long r = 0; r < (long)g.B * g.T * g.H; ++r) {
                const int b = (int)(r / ((long)g.T * g.H)); const long pos = r % ((long)g.T * g.H) * g.W;
                T* d = D.get() + (long)b * g.L * g.S;
                row_gamma_grad[r] = cca_softmax_grad_row(A + (long)b * g.L * g.S + pos, d + pos, g.S, g.L, g.W, gamma, s.a.get());
                cca_pack_row(k, b, pos, g.W, s.ld, s.x.get());
                cca_pack_row_attention(d, g.S, g.W, pos, false, s.ld, s.a.get());
                cca_row_aggregate(g, s, dq, b, pos, (const CcaMap<T>*)nullptr, T(1));
                cca_pack_row(q, b, pos, g.W, s.ld, s.x.get());
                cca_pack_row_attention(d, g.S, g.W, pos, true, s.ld, s.a.get());
                cca_row_aggregate(g, s, dk, b, pos, (const CcaMap<T>*)nullptr, T(1));
            }
        }
        const CcaLineAggregation<T> jobs[2] = {{D.get(), k, dq, false, T(1)}, {D.get(), q, dk, true, T(1)}};
        cca_phase_line_aggregate(g, jobs, 2);
    }
    double gamma_grad = 0;
    for (long r = 0; r < rows; ++r) gamma_grad += row_gamma_grad[r];
    *dgamma = gamma_grad;
}
#endif
