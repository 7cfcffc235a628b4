"""BatchNorm + activation and ReLU whose backward keeps only what PyTorch's keeps.

Jittor differentiates ``act(batch_norm(x))`` op by op, so a training step holds, per BatchNorm,
its input, the normalised map before the activation and the activation's output. The
``jt.Function``s here say what the backward needs instead: BatchNorm keeps its input and the
per-channel statistics, the activation is differentiated from its output (which the next
convolution keeps anyway). In CCNet-R101 that is three feature maps less per bottleneck.

``BatchNormAct(num_features, activation)`` is a ``jittor.nn.BatchNorm2d`` (same parameters and
running statistics, so checkpoints are unchanged) that applies ``activation`` after normalising;
``relu(x)`` is ReLU differentiated from its output. Training statistics are Jittor's (biased
variance E[x^2] - E[x]^2, also in the running variance) and are averaged over MPI ranks like
``nn.BatchNorm2d(sync=True)``; the gradients are the same to float round-off.

Speed: on CPU the statistics, the normalisation and the two backward passes are OpenMP kernels
(per-channel sums in double); Jittor's own reduce and element-wise kernels use one thread.
"""
import jittor as jt
from jittor import nn


def _leaky_slope_from_output(grad, out):
    return jt.ternary(out > 0, grad, grad * 0.01)


def _relu_slope_from_output(grad, out):
    return jt.ternary(out > 0, grad, jt.zeros_like(grad))


# name -> (activation, its derivative applied to an incoming gradient, read from the output).
# Each is monotone with act(n) > 0 exactly when n > 0, so the output tells the slope.
ACTIVATIONS = {
    "leaky_relu": (lambda x: nn.leaky_relu(x, 0.01), _leaky_slope_from_output),
    "relu": (nn.relu, _relu_slope_from_output),
    "identity": (lambda x: x, None),
}


def check_activation(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return name


class _ReLU(jt.Function):
    def execute(self, x):
        self.out = nn.relu(x)
        return self.out

    def grad(self, grad_out):
        return _relu_slope_from_output(grad_out, self.out)


def relu(x):
    """max(x, 0); its backward reads the output, so the input need not be kept."""
    return _ReLU()(x)


# ---------------------------------------------------------------------------------------------
# The four per-channel passes of BatchNorm + activation. On CPU they are OpenMP kernels (Jittor's
# own reduce and element-wise kernels run on one thread); elsewhere, and with
# ``use_cpu_kernels = False``, the same arithmetic in Jittor ops. Maps are viewed as [N, C, S].
# ---------------------------------------------------------------------------------------------
use_cpu_kernels = True
ACTIVATION_KINDS = {"identity": 0, "relu": 1, "leaky_relu": 2}

_CPU_HEADER = r"""
namespace bnact {
// act(v) and d act / d v read from the output (act(v) > 0 exactly when v > 0)
template <typename T> inline T act(T v, int kind) {
    return kind == 0 || v > 0 ? v : (kind == 1 ? T(0) : v * T(0.01));
}
template <typename T> inline T slope(T y, int kind) {
    return kind == 0 || y > 0 ? T(1) : (kind == 1 ? T(0) : T(0.01));
}
}
"""

# out0[0, c] = mean of in0[:, c, :], out0[1, c] = mean of its squares (double sums per channel)
_MOMENTS_SRC = r"""
    const int N = in0_shape0, C = in0_shape1; const long S = in0_shape2;
    #pragma omp parallel for schedule(dynamic)
    for (int c = 0; c < C; ++c) {
        double sum = 0, sum_sq = 0;
        for (int n = 0; n < N; ++n) {
            const in0_type* x = in0_p + ((long)n * C + c) * S;
            for (long i = 0; i < S; ++i) { const double v = x[i]; sum += v; sum_sq += v * v; }
        }
        out0_p[c] = (out0_type)(sum / ((double)N * S));
        out0_p[C + c] = (out0_type)(sum_sq / ((double)N * S));
    }
"""

# out0 = act(in0 * in1[c] + in2[c])
_NORMALIZE_SRC = r"""
    const int N = in0_shape0, C = in0_shape1; const long S = in0_shape2; const int kind = data["act"];
    #pragma omp parallel for schedule(static)
    for (long nc = 0; nc < (long)N * C; ++nc) {
        const int c = nc % C; const in0_type scale = in1_p[c], shift = in2_p[c];
        const in0_type* x = in0_p + nc * S; out0_type* y = out0_p + nc * S;
        for (long i = 0; i < S; ++i) y[i] = bnact::act<in0_type>(x[i] * scale + shift, kind);
    }
"""

# in0 grad_out, in1 output (or x for identity), in2 x, in3 mean, in4 inv_std:
# out0[0, c] = sum of gn, out0[1, c] = sum of gn * x_hat, gn = grad_out * act'
_GRAD_MOMENTS_SRC = r"""
    const int N = in0_shape0, C = in0_shape1; const long S = in0_shape2; const int kind = data["act"];
    #pragma omp parallel for schedule(dynamic)
    for (int c = 0; c < C; ++c) {
        const double mean = in3_p[c], inv_std = in4_p[c];
        double sum = 0, sum_x_hat = 0;
        for (int n = 0; n < N; ++n) {
            const long off = ((long)n * C + c) * S;
            const in0_type* g = in0_p + off; const in1_type* o = in1_p + off; const in2_type* x = in2_p + off;
            for (long i = 0; i < S; ++i) {
                const double gn = (double)g[i] * bnact::slope<in1_type>(o[i], kind);
                sum += gn; sum_x_hat += gn * (((double)x[i] - mean) * inv_std);
            }
        }
        out0_p[c] = (out0_type)sum;
        out0_p[C + c] = (out0_type)sum_x_hat;
    }
"""

# grad_x = weight * inv_std * (gn - mean(gn) - x_hat * mean(gn * x_hat)); in5 [3, C] holds
# weight * inv_std, mean(gn), mean(gn * x_hat)
_GRAD_INPUT_SRC = r"""
    const int N = in0_shape0, C = in0_shape1; const long S = in0_shape2; const int kind = data["act"];
    #pragma omp parallel for schedule(static)
    for (long nc = 0; nc < (long)N * C; ++nc) {
        const int c = nc % C;
        const in0_type mean = in3_p[c], inv_std = in4_p[c];
        const in0_type k = in5_p[c], mean_g = in5_p[C + c], mean_gx = in5_p[2 * C + c];
        const in0_type* g = in0_p + nc * S; const in1_type* o = in1_p + nc * S; const in2_type* x = in2_p + nc * S;
        out0_type* gx = out0_p + nc * S;
        for (long i = 0; i < S; ++i) {
            const in0_type gn = g[i] * bnact::slope<in1_type>(o[i], kind);
            gx[i] = k * (gn - mean_g - (x[i] - mean) * inv_std * mean_gx);
        }
    }
"""


def _kernels_apply(x):
    return use_cpu_kernels and not jt.flags.use_cuda and str(x.dtype) in ("float32", "float64")


def _as_ncs(x):
    return x.reshape(x.shape[0], x.shape[1], -1)


def _per_channel(v, x):
    return v.broadcast(x, [0] + list(range(2, x.ndim)))


def channel_moments(x):
    """(mean, mean of squares) per channel of [N, C, ...]."""
    if _kernels_apply(x):
        moments = jt.code([2, x.shape[1]], x.dtype, [_as_ncs(x)], cpu_src=_MOMENTS_SRC)
        return moments[0], moments[1]
    dims = [0] + list(range(2, x.ndim))
    return jt.mean(x, dims=dims), jt.mean(x * x, dims=dims)


def scale_shift_act(x, scale, shift, activation):
    """act(x * scale[c] + shift[c])."""
    if _kernels_apply(x):
        out = jt.code(_as_ncs(x).shape, x.dtype, [_as_ncs(x), scale.cast(x.dtype), shift.cast(x.dtype)],
                      cpu_header=_CPU_HEADER, cpu_src=_NORMALIZE_SRC,
                      data={"act": ACTIVATION_KINDS[activation]})
        return out.reshape(x.shape)
    return ACTIVATIONS[activation][0](x * _per_channel(scale, x) + _per_channel(shift, x))


def _normalised_grad_sums(grad_out, out, x, mean, inv_std, activation):
    """(sum of gn, sum of gn * x_hat) per channel, gn = grad_out * act'(output)."""
    if _kernels_apply(x):
        sums = jt.code([2, x.shape[1]], x.dtype, [_as_ncs(v) for v in (grad_out, out, x)] + [mean, inv_std],
                       cpu_header=_CPU_HEADER, cpu_src=_GRAD_MOMENTS_SRC,
                       data={"act": ACTIVATION_KINDS[activation]})
        return sums[0], sums[1]
    dims = [0] + list(range(2, x.ndim))
    slope_from_output = ACTIVATIONS[activation][1]
    grad_norm = slope_from_output(grad_out, out) if slope_from_output else grad_out
    x_hat = (x - _per_channel(mean, x)) * _per_channel(inv_std, x)
    return grad_norm.sum(dims), (grad_norm * x_hat).sum(dims)


def _grad_input(grad_out, out, x, mean, inv_std, k, mean_grad, mean_grad_x_hat, activation):
    if _kernels_apply(x):
        coefficients = jt.concat([k.cast(x.dtype), mean_grad, mean_grad_x_hat])
        grad_x = jt.code(_as_ncs(x).shape, x.dtype,
                         [_as_ncs(v) for v in (grad_out, out, x)] + [mean, inv_std, coefficients],
                         cpu_header=_CPU_HEADER, cpu_src=_GRAD_INPUT_SRC,
                         data={"act": ACTIVATION_KINDS[activation]})
        return grad_x.reshape(x.shape)
    slope_from_output = ACTIVATIONS[activation][1]
    grad_norm = slope_from_output(grad_out, out) if slope_from_output else grad_out
    x_hat = (x - _per_channel(mean, x)) * _per_channel(inv_std, x)
    return _per_channel(k, x) * (grad_norm - _per_channel(mean_grad, x) - x_hat * _per_channel(mean_grad_x_hat, x))


class _BatchNormActTraining(jt.Function):
    """Training-mode BatchNorm (batch statistics) followed by an activation.

    Returns (output, batch mean, batch variance); the statistics are for the running averages
    and carry no gradient."""

    def __init__(self, activation, eps, sync):
        self.activation, self.eps, self.sync = activation, eps, sync

    def execute(self, x, weight, bias):
        mean, mean_sq = channel_moments(x)
        if self.sync and jt.in_mpi:
            mean, mean_sq = mean.mpi_all_reduce("mean"), mean_sq.mpi_all_reduce("mean")
        var = (mean_sq - mean * mean).maximum(0.0)
        inv_std = 1.0 / jt.sqrt(var + self.eps)
        scale = weight * inv_std
        out = scale_shift_act(x, scale, bias - mean * scale, self.activation)
        # the slope is read from the output; identity has slope 1 and needs nothing (x stands in)
        self.saved = x, mean, inv_std, weight, (out if ACTIVATIONS[self.activation][1] else None)
        return out, mean.detach(), var.detach()

    def grad(self, grad_out, *unused_stat_grads):
        x, mean, inv_std, weight, out = self.saved
        out = x if out is None else out
        grad_bias, grad_weight = _normalised_grad_sums(grad_out, out, x, mean, inv_std, self.activation)
        count = x.numel() // x.shape[1]
        mean_grad, mean_grad_x_hat = grad_bias / count, grad_weight / count
        if self.sync and jt.in_mpi:      # the statistics were over all ranks' pixels
            mean_grad = mean_grad.mpi_all_reduce("mean")
            mean_grad_x_hat = mean_grad_x_hat.mpi_all_reduce("mean")
        grad_x = _grad_input(grad_out, out, x, mean, inv_std, weight * inv_std, mean_grad, mean_grad_x_hat,
                             self.activation)
        return grad_x, grad_weight, grad_bias


class BatchNormAct(nn.BatchNorm2d):
    """BatchNorm followed by an activation ("relu", "leaky_relu" or "identity") in one module."""

    def __init__(self, num_features, activation="relu"):
        super().__init__(num_features)
        self.activation = check_activation(activation)

    def execute(self, x):
        if not self.is_train:
            scale = self.weight / jt.sqrt(self.running_var + self.eps)
            return scale_shift_act(x, scale, self.bias - self.running_mean * scale, self.activation)
        out, mean, var = _BatchNormActTraining(self.activation, self.eps, self.sync)(x, self.weight, self.bias)
        self.running_mean.update(self.running_mean + (mean - self.running_mean) * self.momentum)
        self.running_var.update(self.running_var + (var - self.running_var) * self.momentum)
        return out
