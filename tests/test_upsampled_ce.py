"""upsampled_nll (models/upsampled_ce.py): values and gradients against PyTorch's
F.cross_entropy(F.interpolate(...)) in float64 and against the Jittor-op formulation in float32,
odd sizes, both align_corners rules, up- and downsampling, batch independence, bad labels."""
import numpy as np
import pytest

import jittor as jt

from models.upsampled_ce import reference_upsampled_nll, upsampled_nll

torch = pytest.importorskip("torch")
F = torch.nn.functional

SHAPES = [  # (B, K, h, w, H, W)
    (2, 5, 4, 6, 13, 17),      # upsampling by odd factors
    (1, 3, 7, 5, 3, 4),        # downsampling
    (1, 4, 1, 1, 5, 3),        # a single source pixel
    (1, 4, 5, 3, 1, 1),        # a single output pixel
    (1, 6, 8, 8, 64, 64),      # CCNet's 8x
]


def float32_exact(array):
    """float64 values float32 holds exactly (jt.array rounds float64 input to float32)."""
    return array.astype(np.float32).astype(np.float64)


def case(shape, seed=0):
    b, k, h, w, out_h, out_w = shape
    rng = np.random.RandomState(seed)
    logits = float32_exact(rng.randn(b, k, h, w) * 3)
    label = rng.randint(0, k, (b, out_h, out_w))
    weight = float32_exact(rng.rand(b, out_h, out_w))
    weight[rng.rand(b, out_h, out_w) < 0.3] = 0            # ignored pixels carry weight 0
    return logits, label, weight


def jittor_loss_and_grad(logits, label, weight, align_corners, dtype="float64", op=upsampled_nll):
    x = jt.array(logits).cast(dtype)
    nll = op(x, label if op is upsampled_nll else jt.array(label.astype(np.int32)), align_corners)
    grad = jt.grad((nll * jt.array(weight).cast(dtype)).sum(), x)
    return nll.numpy(), grad.numpy()


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_torch_interpolate_then_cross_entropy_float64(shape, align_corners):
    logits, label, weight = case(shape)
    nll, grad = jittor_loss_and_grad(logits, label, weight, align_corners)
    x = torch.from_numpy(logits).requires_grad_()
    up = F.interpolate(x, size=shape[4:], mode="bilinear", align_corners=align_corners)
    expected = F.cross_entropy(up, torch.from_numpy(label), reduction="none")
    (expected * torch.from_numpy(weight)).sum().backward()
    np.testing.assert_allclose(nll, expected.detach().numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(grad, x.grad.numpy(), rtol=0, atol=1e-12)


def test_matches_the_jittor_op_formulation_float32():
    shape = (2, 150, 8, 8, 64, 64)
    logits, label, weight = case(shape, seed=1)
    nll, grad = jittor_loss_and_grad(logits, label, weight, False, "float32")
    ref_nll, ref_grad = jittor_loss_and_grad(logits, label, weight, False, "float32", reference_upsampled_nll)
    np.testing.assert_allclose(nll, ref_nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=1e-5 * np.abs(ref_grad).max())


def test_each_image_is_computed_on_its_own():
    logits, label, weight = case((4, 7, 4, 4, 32, 32), seed=2)
    whole = jittor_loss_and_grad(logits, label, weight, False, "float32")
    halves = [jittor_loss_and_grad(logits[s], label[s], weight[s], False, "float32")
              for s in (slice(0, 2), slice(2, 4))]
    for i in range(2):
        np.testing.assert_array_equal(whole[i], np.concatenate([h[i] for h in halves]))


def test_bad_labels_and_shapes_are_reported():
    x = jt.zeros((1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"label values must lie in \[0, 3\), got \[0, 3\]"):
        upsampled_nll(x, np.array([[[0, 3]]]))
    with pytest.raises(ValueError, match=r"label values must lie in \[0, 3\)"):
        upsampled_nll(x, np.array([[[-1, 0]]]))
    with pytest.raises(ValueError, match=r"label must be \[B, H, W\] with B = 1, got shape \[2, 4, 4\]"):
        upsampled_nll(x, np.zeros((2, 4, 4), np.int64))
    with pytest.raises(ValueError, match="integer class ids"):
        upsampled_nll(x, np.zeros((1, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"logits must be \[B, K, h, w\], got shape \[3, 2, 2\]"):
        upsampled_nll(jt.zeros((3, 2, 2)), np.zeros((1, 4, 4), np.int64))
