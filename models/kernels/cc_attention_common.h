// Criss-cross attention: the path layout and one function per primitive that computes a single
// output element. Compiled into the CUDA kernels (one thread per element) and into the CPU
// "elementwise" kernels (one OpenMP iteration per element), so the CPU tests run exactly the
// arithmetic the GPU runs; the blocked CPU kernels use the same path helpers.
//
// Tensors are [B, C, T, H, W] (2D maps have T = 1); the path of position (t, y, x) has
// L = W + H + T - 2 entries: row entries [0, W), column entries [W, W + H - 1) and temporal
// entries [W + H - 1, L).
#ifndef CCA_COMMON_H
#define CCA_COMMON_H
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
