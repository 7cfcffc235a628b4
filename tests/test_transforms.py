"""Augmentation: geometry keeps image and label aligned, labels stay valid, mmseg semantics."""
import numpy as np
import pytest
from scipy.ndimage import maximum_filter, minimum_filter

from datasets import transforms as T

PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255],
                    [255, 0, 255]], np.uint8)


def blocky_pair(seed=0, shape=(6, 10), block=16):
    """A label of 16x16 blocks (classes 0..5, one ignore block) and the image painted from it,
    so the label can be read back from the pixels after any geometric transform."""
    blocks = np.random.default_rng(seed).integers(0, len(PALETTE), size=shape)
    label = np.kron(blocks, np.ones((block, block), int)).astype(np.int32)
    label[:block, :block] = 255
    image = np.where((label == 255)[..., None], 128, PALETTE[np.minimum(label, 5)]).astype(np.uint8)
    return image, label


def aligned_fraction(chw, label):
    """Among labelled pixels whose 5x5 neighbourhood has one class (bilinear blending only
    touches class borders), the fraction whose colour is that class's colour."""
    rgb = T.denormalize(chw)
    uniform = (minimum_filter(label, 5) == maximum_filter(label, 5, mode="constant", cval=255)) & (label != 255)
    match = np.abs(rgb.astype(int) - PALETTE[np.minimum(label, 5)].astype(int)).max(-1) <= 3
    return match[uniform].mean(), int(uniform.sum())


def test_normalize_matches_formula_and_layout():
    rgb = np.random.default_rng(1).integers(0, 256, size=(5, 7, 3)).astype(np.uint8)
    out = T.normalize(rgb)
    assert out.shape == (3, 5, 7) and out.dtype == np.float32
    mean, std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    for c in range(3):
        np.testing.assert_allclose(out[c], (rgb[..., c] - mean[c]) / std[c], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(T.denormalize(out), rgb)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        T.normalize(rgb[..., 0])


def test_rescale_size_follows_mmseg_keep_ratio():
    # ADE20K image 375x500 (HxW) with img_scale (2048, 512): the short side reaches 512.
    assert T.rescale_size((375, 500), (2048, 512)) == (512, 683)
    # A very wide image is limited by its long side instead.
    assert T.rescale_size((100, 1000), (2048, 512)) == (205, 2048)
    assert T.rescale_size((10, 20), 1.5) == (15, 30)
    image = np.zeros((375, 500, 3), np.uint8)
    assert T.resize_keep_ratio(image, (2048, 512)).shape == (512, 683, 3)
    assert T.resize_keep_ratio(np.zeros((375, 500), np.int32), (2048, 512), nearest=True).shape == (512, 683)


def test_nearest_resize_never_invents_labels():
    label = np.random.default_rng(2).choice([0, 3, 7, 255], size=(13, 17)).astype(np.int32)
    for hw in [(26, 34), (7, 9), (40, 11)]:
        out = T.resize(label, hw, nearest=True)
        assert out.shape == hw and out.dtype == np.int32
        assert set(np.unique(out)) <= {0, 3, 7, 255}
    np.testing.assert_array_equal(T.resize(label, (26, 34), nearest=True), np.kron(label, np.ones((2, 2), int)))


@pytest.mark.parametrize("crop", [(80, 120), (128, 128)])
def test_training_pipeline_keeps_image_and_label_aligned(crop):
    image, label = blocky_pair()
    transform = T.build_train_transform(crop, base_size=None, ratio_range=(0.5, 2.0), photometric=False)
    flips = 0
    for seed in range(60):
        chw, lab = transform(image, label, np.random.default_rng(seed))
        assert chw.shape == (3,) + crop and chw.dtype == np.float32
        assert lab.shape == crop and lab.dtype == np.int32
        fraction, checked = aligned_fraction(chw, lab)
        assert checked > 50 and fraction == 1.0, f"seed {seed}: only {fraction:.3f} of pixels aligned"
        flips += int(T.RandomFlip(0.5)(image, label, np.random.default_rng(seed))[1][0, -1] == 255)
    # The check can fail: a label flipped without its image is detected.
    chw, lab = transform(image, label, np.random.default_rng(0))
    assert aligned_fraction(chw, lab[:, ::-1])[0] < 0.7


def test_padding_uses_zero_image_and_ignore_label():
    image, label = blocky_pair(shape=(2, 3))                      # 32x48, smaller than the crop
    transform = T.Compose([T.Normalize(), T.Pad((40, 64))])
    chw, lab = transform(image, label, None)
    assert chw.shape == (3, 40, 64) and lab.shape == (40, 64)
    assert np.all(chw[:, 32:, :] == 0) and np.all(chw[:, :, 48:] == 0)
    assert np.all(lab[32:, :] == 255) and np.all(lab[:, 48:] == 255)
    np.testing.assert_array_equal(lab[:32, :48], label)


def test_labels_stay_valid_under_full_augmentation():
    image, label = blocky_pair(seed=3)
    valid = set(range(len(PALETTE))) | {255}
    transform = T.build_train_transform(64, base_size=(160, 96), photometric=True)
    for seed in range(40):
        chw, lab = transform(image, label, np.random.default_rng(seed))
        assert set(np.unique(lab).tolist()) <= valid
        assert np.isfinite(chw).all()


def test_random_resize_ratio_is_relative_to_base_scale():
    image, label = blocky_pair()                                   # 96x160
    resize = T.RandomResize(base_size=(320, 192), ratio_range=(0.5, 2.0))
    sizes = [resize(image, label, np.random.default_rng(s))[0].shape[:2] for s in range(200)]
    ratios = np.array([h / 192 for h, w in sizes])
    assert ratios.min() >= 0.49 and ratios.max() <= 2.01
    assert ratios.min() < 0.6 and ratios.max() > 1.9
    assert all(abs(w / h - 160 / 96) < 0.05 for h, w in sizes)     # aspect ratio kept


def test_cat_max_ratio_avoids_single_class_crops():
    label = np.zeros((64, 256), np.int32)
    label[:, 205:] = 1                                             # 20% of the image is class 1
    image = PALETTE[label].astype(np.uint8)

    def single_class_crops(ratio):
        crop = T.RandomCrop((64, 64), cat_max_ratio=ratio)
        return sum(len(np.unique(crop(image, label, np.random.default_rng(s))[1])) == 1 for s in range(100))

    assert single_class_crops(1.0) > 60          # a plain random crop mostly misses class 1
    assert single_class_crops(0.75) < 30         # the rule retries up to 10 times


def test_photometric_distortion_changes_colours_only():
    image, label = blocky_pair(seed=4)
    distort = T.PhotoMetricDistortion()
    changed = 0
    for seed in range(20):
        out, lab = distort(image, label, np.random.default_rng(seed))
        assert out.dtype == np.uint8 and out.shape == image.shape
        assert lab is label
        changed += int(not np.array_equal(out, image))
    assert changed >= 15
    # A hue shift keeps grey pixels grey (saturation 0) and moves saturated colours.
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 200
    hsv_only = T.PhotoMetricDistortion(brightness_delta=0, contrast_range=(1, 1), saturation_range=(1, 1))
    moved = [hsv_only(red, label[:4, :4], np.random.default_rng(s))[0] for s in range(20)]
    assert any(m[0, 0, 1] > 20 or m[0, 0, 2] > 20 for m in moved)


def test_bad_sizes_are_rejected_clearly():
    with pytest.raises(ValueError, match="crop_size"):
        T.RandomCrop((0, 5))
    with pytest.raises(ValueError, match="ratio_range"):
        T.RandomResize(None, (2.0, 0.5))
