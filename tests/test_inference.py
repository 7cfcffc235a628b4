"""Test-time inference (utils/inference.py): sliding window, scales, flip; evaluate()."""
import numpy as np
import pytest

import jittor as jt
from jittor import nn

from utils.inference import _scaled_size, inference, tile_boxes


class Pointwise(nn.Module):
    """A per-pixel model (1x1 conv): its output at a pixel depends on that pixel only, so any
    correct tiling / padding / averaging reproduces whole-image inference exactly."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.num_classes = num_classes

    def execute(self, x):
        return self.conv(x)


@pytest.fixture(scope="module")
def tiny_ccnet():
    import models
    jt.set_global_seed(0)
    model = models.build_model("resnet18", 5, recurrence=2, base_channels=8)
    model.head.cca.gamma.update(jt.array([0.7]).float32())   # make the attention count
    model.head.cca.gamma.sync()
    model.eval()
    return model


def _image(h, w, seed=0):
    return np.random.default_rng(seed).standard_normal((3, h, w)).astype(np.float32)


def test_tiles_cover_the_image_like_the_official_tiling():
    # Cityscapes with the official 769 tiles, stride 513: 2 rows x 4 columns, last ones shifted back.
    boxes = tile_boxes(1024, 2048, (769, 769), (513, 513))
    assert len(boxes) == 8
    assert boxes[0] == (0, 769, 0, 769) and boxes[-1] == (1024 - 769, 1024, 2048 - 769, 2048)
    covered = np.zeros((1024, 2048), int)
    for y1, y2, x1, x2 in boxes:
        assert y2 - y1 == 769 and x2 - x1 == 769
        covered[y1:y2, x1:x2] += 1
    assert covered.min() >= 1
    assert tile_boxes(300, 400, (512, 512), (341, 341)) == [(0, 300, 0, 400)]   # image < window


def test_slide_equals_whole_when_one_window_covers_the_image(tiny_ccnet):
    image = _image(40, 56)
    whole = inference(tiny_ccnet, image).numpy()
    slide = inference(tiny_ccnet, image, mode="slide", crop_size=(40, 56), stride=(20, 20)).numpy()
    assert whole.shape == (5, 40, 56)
    np.testing.assert_allclose(slide, whole, rtol=1e-5, atol=1e-5)


def test_slide_averages_overlaps_and_drops_padding():
    jt.set_global_seed(1)
    model = Pointwise()
    model.eval()
    image = _image(23, 37, seed=1)
    whole = inference(model, image).numpy()
    for crop, stride in (((10, 16), (7, 9)), ((30, 50), (20, 20)), (8, 5)):   # overlap, padding, ints
        slide = inference(model, image, mode="slide", crop_size=crop, stride=stride).numpy()
        np.testing.assert_allclose(slide, whole, rtol=1e-5, atol=1e-5)


def test_flip_and_scales_combine_probabilities():
    jt.set_global_seed(2)
    model = Pointwise()
    model.eval()
    image = _image(16, 20, seed=2)
    logits = inference(model, image).numpy()
    probs = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)
    # a per-pixel model is flip-equivariant: averaging the flipped view changes nothing
    flipped = inference(model, image, flip=True).numpy()
    np.testing.assert_allclose(np.exp(flipped), probs, rtol=1e-5, atol=1e-6)
    flipped_logits = inference(model, image, flip=True, average="logit").numpy()
    np.testing.assert_allclose(flipped_logits, logits, rtol=1e-5, atol=1e-5)
    # two scales: the result is log of the mean of the two views' probabilities
    half = inference(model, image, scales=(0.5,)).numpy()
    half_probs = np.exp(half - half.max(0)) / np.exp(half - half.max(0)).sum(0)
    both = inference(model, image, scales=(0.5, 1.0)).numpy()
    np.testing.assert_allclose(np.exp(both), (half_probs + probs) / 2, rtol=1e-5, atol=1e-6)


def test_multiscale_flip_slide_keep_shapes(tiny_ccnet):
    image = _image(33, 45, seed=3)
    batch = np.stack([image, image[:, ::-1, :]])
    for kwargs in (dict(scales=(0.75, 1.0, 1.25), flip=True),
                   dict(mode="slide", crop_size=24, stride=16, scales=(0.5, 1.5), flip=True),
                   dict(scales=(1.0,), base_size=(64, 48))):
        out = inference(tiny_ccnet, batch, **kwargs).numpy()
        assert out.shape == (2, 5, 33, 45) and np.isfinite(out).all()
        if len(kwargs.get("scales", ())) > 1:        # log-probabilities: softmax sums to 1 already
            np.testing.assert_allclose(np.exp(out).sum(1), 1.0, rtol=1e-5)


def test_base_size_matches_the_dataset_resize_rule():
    from datasets.transforms import rescale_size
    for hw in ((375, 500), (512, 683), (1024, 2048), (33, 45)):
        for scale in (0.5, 1.0, 1.75):
            assert _scaled_size(*hw, scale, (2048, 512)) == rescale_size(hw, (2048 * scale, 512 * scale))


def test_bad_arguments_are_explained(tiny_ccnet):
    image = _image(8, 8)
    with pytest.raises(ValueError, match="crop_size"):
        inference(tiny_ccnet, image, mode="slide")
    with pytest.raises(ValueError, match="mode"):
        inference(tiny_ccnet, image, mode="tiles")
    with pytest.raises(ValueError, match="scales"):
        inference(tiny_ccnet, image, scales=(0.0,))
    with pytest.raises(ValueError, match=r"\[3,H,W\]"):
        inference(tiny_ccnet, np.zeros((1, 8, 8), np.float32))


class _ListDataset:
    """Just what evaluate() needs: samples, load_raw, num_classes, ignore_index."""
    num_classes = 4
    ignore_index = 255

    def __init__(self, images, labels):
        self.images, self.labels = images, labels
        self.samples = [(f"img{i}.jpg", f"img{i}.png") for i in range(len(images))]

    def load_raw(self, i):
        return self.images[i], self.labels[i]


def test_evaluate_matches_metrics_of_its_own_predictions():
    from datasets.transforms import normalize
    from utils.evaluation import evaluate
    from utils.metrics import ConfusionMatrix
    jt.set_global_seed(3)
    model = Pointwise()
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((12, 17), (20, 9))]
    labels = [rng.integers(0, 4, im.shape[:2]).astype(np.int32) for im in images]
    labels[0][:3] = 255
    dataset = _ListDataset(images, labels)
    seen = {}
    model.train()
    result = evaluate(model, dataset, progress=False, on_prediction=lambda i, p, rgb, lab: seen.setdefault(i, p))
    assert model.is_training()                     # train/eval state restored for train.py
    expected = ConfusionMatrix(4)
    for i, image in enumerate(images):
        pred = inference(model, normalize(image)).numpy().argmax(0)
        np.testing.assert_array_equal(seen[i], pred)
        expected.update(pred, labels[i])
    assert result["num_images"] == 2
    assert result["mIoU"] == pytest.approx(expected.summary()["mIoU"])
    assert result["aAcc"] == pytest.approx(expected.summary()["aAcc"])
