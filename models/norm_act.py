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
"""
import utils  # noqa: F401  (configures Jittor before it is imported)
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


class _BatchNormActTraining(jt.Function):
    """Training-mode BatchNorm (batch statistics) followed by an activation.

    Returns (output, batch mean, batch variance); the statistics are for the running averages
    and carry no gradient."""

    def __init__(self, activation, eps, sync):
        self.activation, self.eps, self.sync = activation, eps, sync

    def execute(self, x, weight, bias):
        dims = [0] + list(range(2, x.ndim))
        mean = jt.mean(x, dims=dims)
        mean_sq = jt.mean(x * x, dims=dims)
        if self.sync and jt.in_mpi:
            mean, mean_sq = mean.mpi_all_reduce("mean"), mean_sq.mpi_all_reduce("mean")
        var = (mean_sq - mean * mean).maximum(0.0)
        inv_std = 1.0 / jt.sqrt(var + self.eps)
        scale = weight * inv_std
        shift = bias - mean * scale
        out = ACTIVATIONS[self.activation][0](x * scale.broadcast(x, dims) + shift.broadcast(x, dims))
        slope_from_output = ACTIVATIONS[self.activation][1]
        self.saved = x, mean, inv_std, weight, (out if slope_from_output else None)
        return out, mean.detach(), var.detach()

    def grad(self, grad_out, *unused_stat_grads):
        x, mean, inv_std, weight, out = self.saved
        dims = [0] + list(range(2, x.ndim))
        slope_from_output = ACTIVATIONS[self.activation][1]
        grad_norm = slope_from_output(grad_out, out) if slope_from_output else grad_out
        x_hat = (x - mean.broadcast(x, dims)) * inv_std.broadcast(x, dims)
        grad_bias = grad_norm.sum(dims)
        grad_weight = (grad_norm * x_hat).sum(dims)
        count = x.numel() // x.shape[1]
        mean_grad, mean_grad_x_hat = grad_bias / count, grad_weight / count
        if self.sync and jt.in_mpi:      # the statistics were over all ranks' pixels
            mean_grad = mean_grad.mpi_all_reduce("mean")
            mean_grad_x_hat = mean_grad_x_hat.mpi_all_reduce("mean")
        grad_x = (weight * inv_std).broadcast(x, dims) * (
            grad_norm - mean_grad.broadcast(x, dims) - x_hat * mean_grad_x_hat.broadcast(x, dims))
        return grad_x, grad_weight, grad_bias


class BatchNormAct(nn.BatchNorm2d):
    """BatchNorm followed by an activation ("relu", "leaky_relu" or "identity") in one module."""

    def __init__(self, num_features, activation="relu"):
        super().__init__(num_features)
        self.activation = check_activation(activation)

    def execute(self, x):
        if not self.is_train:
            return ACTIVATIONS[self.activation][0](super().execute(x))
        out, mean, var = _BatchNormActTraining(self.activation, self.eps, self.sync)(x, self.weight, self.bias)
        self.running_mean.update(self.running_mean + (mean - self.running_mean) * self.momentum)
        self.running_var.update(self.running_var + (var - self.running_var) * self.momentum)
        return out
