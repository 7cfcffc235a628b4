"""Per-pixel cross-entropy of bilinearly upsampled logits, without the upsampled tensor.

``upsampled_nll(logits, label, align_corners)``: logits [B, K, h, w], label [B, H, W] (class ids in
[0, K)) -> nll [B, H, W] = -log softmax(upsample(logits))[label], differentiable with respect to
the logits. It is what ``-gather(log_softmax(interpolate(logits, (H, W))), label)`` computes.

Why a kernel: CCNet's loss upsamples stride-8 logits to the label size. Written with Jittor ops,
a 512x512 crop with 150 classes gives [1, 150, 512, 512] float tensors (150 MiB each) for the
upsampled logits, their log-softmax and the gradients of both, and a training step held five of
them at its memory peak. The CPU kernel here computes each pixel's K upsampled logits from the
four source pixels on the fly, keeps only its log-sum-exp for backward ([B, H, W]), and scatters
the gradient straight back to the low-resolution logits. On CUDA the Jittor-op formulation runs
(``reference_upsampled_nll``, also the tests' reference).

Bilinear sampling follows PyTorch's ``F.interpolate(mode="bilinear")`` (and Jittor's
``nn.interpolate``): with ``align_corners=False`` the source coordinate is
(dst + 0.5) * in / out - 0.5 clamped at 0; with ``True`` it is dst * (in - 1) / (out - 1).

Backward without atomics: output rows are grouped by their upper source row r; a group writes
only source rows r and r + 1, so the groups with even r run in parallel, then those with odd r.
"""
import numpy as np

import jittor as jt
from jittor import nn

_CPU_HEADER = r"""
#include <cmath>
#include <vector>
#include <algorithm>

namespace upce {

// One output coordinate's two source taps (PyTorch's bilinear rule).
template <typename Acc> struct Tap { int i0, i1; Acc w0, w1; };

template <typename Acc>
std::vector<Tap<Acc>> taps(int out_size, int in_size, bool align_corners) {
    std::vector<Tap<Acc>> t(out_size);
    const Acc scale = align_corners ? (out_size > 1 ? Acc(in_size - 1) / Acc(out_size - 1) : Acc(0))
                                    : Acc(in_size) / Acc(out_size);
    for (int o = 0; o < out_size; ++o) {
        Acc src = align_corners ? scale * o : scale * (o + Acc(0.5)) - Acc(0.5);
        if (src < 0) src = 0;
        int i0 = std::min((int)src, in_size - 1);
        const Acc l1 = src - i0;
        t[o] = {i0, i0 + (i0 < in_size - 1 ? 1 : 0), Acc(1) - l1, l1};
    }
    return t;
}

// [B, K, h, w] -> [B, h, w, K]: one pixel's class scores contiguous.
template <typename T>
void to_channels_last(const T* src, T* dst, int B, int K, int HW) {
    #pragma omp parallel for schedule(static)
    for (long bp = 0; bp < (long)B * HW; ++bp) {
        const long b = bp / HW, p = bp % HW;
        for (int k = 0; k < K; ++k) dst[bp * K + k] = src[(b * K + k) * HW + p];
    }
}

// z[k] = bilinear sample of the four channels-last source pixels.
template <typename T, typename Acc>
inline void sample(const T* a, const T* b, const T* c, const T* d, Acc wy0, Acc wy1, Acc wx0, Acc wx1,
                   int K, Acc* z) {
    for (int k = 0; k < K; ++k)
        z[k] = wy0 * (wx0 * (Acc)a[k] + wx1 * (Acc)b[k]) + wy1 * (wx0 * (Acc)c[k] + wx1 * (Acc)d[k]);
}

template <typename Acc>
inline Acc log_sum_exp(const Acc* z, int K) {
    Acc m = z[0];
    for (int k = 1; k < K; ++k) m = z[k] > m ? z[k] : m;
    Acc s = 0;
    for (int k = 0; k < K; ++k) s += std::exp(z[k] - m);
    return m + std::log(s);
}

template <typename T, typename Acc>
void forward(const T* logits, const int* label, T* nll, T* lse, int B, int K, int h, int w,
             int H, int W, bool align_corners) {
    const auto ty = taps<Acc>(H, h, align_corners), tx = taps<Acc>(W, w, align_corners);
    std::vector<T> cl((size_t)B * h * w * K);
    to_channels_last(logits, cl.data(), B, K, h * w);
    #pragma omp parallel
    {
        std::vector<Acc> z(K);
        #pragma omp for schedule(static)
        for (long by = 0; by < (long)B * H; ++by) {
            const long b = by / H; const int y = by % H;
            const T* r0 = cl.data() + (b * h + ty[y].i0) * w * K;
            const T* r1 = cl.data() + (b * h + ty[y].i1) * w * K;
            for (int x = 0; x < W; ++x) {
                const auto& t = tx[x];
                sample<T, Acc>(r0 + t.i0 * K, r0 + t.i1 * K, r1 + t.i0 * K, r1 + t.i1 * K,
                               ty[y].w0, ty[y].w1, t.w0, t.w1, K, z.data());
                const long p = by * W + x;
                const Acc l = log_sum_exp(z.data(), K);
                lse[p] = (T)l;
                nll[p] = (T)(l - z[label[p]]);
            }
        }
    }
}

template <typename T, typename Acc>
void backward(const T* logits, const int* label, const T* lse, const T* grad, T* grad_logits,
              int B, int K, int h, int w, int H, int W, bool align_corners) {
    const auto ty = taps<Acc>(H, h, align_corners), tx = taps<Acc>(W, w, align_corners);
    std::vector<T> cl((size_t)B * h * w * K);
    to_channels_last(logits, cl.data(), B, K, h * w);
    std::vector<Acc> gcl((size_t)B * h * w * K, Acc(0));
    // rows_of[r] .. rows_of[r + 1]: the output rows whose upper source row is r (ty[].i0 rises with y)
    std::vector<int> rows_of(h + 1, H);
    for (int y = H - 1; y >= 0; --y) rows_of[ty[y].i0] = y;
    for (int r = h - 1; r >= 0; --r) rows_of[r] = std::min(rows_of[r], rows_of[r + 1]);
    for (int parity = 0; parity < 2; ++parity) {
        #pragma omp parallel
        {
            std::vector<Acc> z(K);
            #pragma omp for schedule(dynamic)
            for (long br = 0; br < (long)B * h; ++br) {
                const long b = br / h; const int r = br % h;
                if (r % 2 != parity) continue;
                for (int y = rows_of[r]; y < rows_of[r + 1]; ++y) {
                    const Acc wy0 = ty[y].w0, wy1 = ty[y].w1;
                    const T* r0 = cl.data() + (b * h + ty[y].i0) * w * K;
                    const T* r1 = cl.data() + (b * h + ty[y].i1) * w * K;
                    Acc* g0 = gcl.data() + (b * h + ty[y].i0) * w * K;
                    Acc* g1 = gcl.data() + (b * h + ty[y].i1) * w * K;
                    for (int x = 0; x < W; ++x) {
                        const long p = (b * H + y) * W + x;
                        const Acc g = grad[p];
                        if (g == 0) continue;              // ignored pixels: weight 0
                        const auto& t = tx[x];
                        sample<T, Acc>(r0 + t.i0 * K, r0 + t.i1 * K, r1 + t.i0 * K, r1 + t.i1 * K,
                                       wy0, wy1, t.w0, t.w1, K, z.data());
                        const Acc l = lse[p];
                        for (int k = 0; k < K; ++k) z[k] = g * std::exp(z[k] - l);   // g * softmax
                        z[label[p]] -= g;
                        Acc* a = g0 + t.i0 * K; Acc* bb = g0 + t.i1 * K;
                        Acc* c = g1 + t.i0 * K; Acc* d = g1 + t.i1 * K;
                        const Acc w00 = wy0 * t.w0, w01 = wy0 * t.w1, w10 = wy1 * t.w0, w11 = wy1 * t.w1;
                        for (int k = 0; k < K; ++k) {
                            a[k] += w00 * z[k]; bb[k] += w01 * z[k];
                            c[k] += w10 * z[k]; d[k] += w11 * z[k];
                        }
                    }
                }
            }
        }
    }
    const int HW = h * w;
    #pragma omp parallel for schedule(static)
    for (long bk = 0; bk < (long)B * K; ++bk) {
        const long b = bk / K; const int k = bk % K;
        for (int p = 0; p < HW; ++p) grad_logits[bk * HW + p] = (T)gcl[((size_t)b * HW + p) * K + k];
    }
}

}  // namespace upce
"""

_ACC = {"float32": "float", "float64": "double"}


def _dims(label_input):
    return (f"in0_shape0, in0_shape1, in0_shape2, in0_shape3, "
            f"{label_input}_shape1, {label_input}_shape2, data[\"align_corners\"] != 0")


class _UpsampledNLL(jt.Function):
    def execute(self, logits, label, align_corners):
        acc = _ACC[str(logits.dtype)]
        size = list(label.shape)
        nll, lse = jt.code([size, size], [logits.dtype, logits.dtype], [logits, label],
                           cpu_header=_CPU_HEADER, data={"align_corners": int(align_corners)},
                           cpu_src=f"upce::forward<in0_type, {acc}>(in0_p, in1_p, out0_p, out1_p, "
                                   f"{_dims('in1')});")
        self.saved = logits, label, lse.stop_grad(), align_corners
        return nll

    def grad(self, grad_nll):
        logits, label, lse, align_corners = self.saved
        acc = _ACC[str(logits.dtype)]
        grad_logits = jt.code(logits.shape, logits.dtype, [logits, label, lse, grad_nll.cast(logits.dtype)],
                              cpu_header=_CPU_HEADER, data={"align_corners": int(align_corners)},
                              cpu_src=f"upce::backward<in0_type, {acc}>(in0_p, in1_p, in2_p, in3_p, out0_p, "
                                      f"{_dims('in1')});")
        return grad_logits, None, None


def reference_upsampled_nll(logits, label, align_corners=False):
    """The same per-pixel loss from Jittor ops (materialises the upsampled logits)."""
    size = tuple(label.shape[1:])
    if tuple(logits.shape[2:]) != size:
        logits = nn.interpolate(logits, size=size, mode="bilinear", align_corners=align_corners)
    log_prob = nn.log_softmax(logits, dim=1)
    return -jt.gather(log_prob, 1, label.unsqueeze(1)).squeeze(1)


def upsampled_nll(logits, label, align_corners=False):
    """-log softmax(bilinear upsample of ``logits`` to the label size)[label] per pixel: [B, H, W].

    ``logits``: jt.Var [B, K, h, w]; ``label``: numpy or jt.Var [B, H, W] of class ids in [0, K)
    (callers put a valid id on ignored pixels and weight them 0).
    """
    if len(logits.shape) != 4:
        raise ValueError(f"upsampled_nll: logits must be [B, K, h, w], got shape {list(logits.shape)}")
    label = np.asarray(label.numpy() if isinstance(label, jt.Var) else label)
    if label.ndim != 3 or label.shape[0] != logits.shape[0]:
        raise ValueError(f"upsampled_nll: label must be [B, H, W] with B = {logits.shape[0]}, "
                         f"got shape {list(label.shape)}")
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"upsampled_nll: label must hold integer class ids, got dtype {label.dtype}")
    if label.size and (label.min() < 0 or label.max() >= logits.shape[1]):
        raise ValueError(f"upsampled_nll: label values must lie in [0, {logits.shape[1]}), got "
                         f"[{label.min()}, {label.max()}]")
    label = jt.array(label.astype(np.int32))
    if jt.flags.use_cuda or str(logits.dtype) not in _ACC:
        return reference_upsampled_nll(logits, label, align_corners)
    return _UpsampledNLL()(logits, label, bool(align_corners))
