"""demo.py end to end (tiny random checkpoint) and the attention-map maths it draws."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import jittor as jt

from utils import visualize

ROOT = Path(__file__).resolve().parents[1]
ARCH = dict(backbone="resnet18", num_classes=11, recurrence=2, base_channels=8, head_channels=32,
            aux_channels=32)


def run_demo(*args):
    env = dict(os.environ, CCNET_QUIET="1")
    return subprocess.run([sys.executable, "demo.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import models
    from utils.checkpoint import save_checkpoint
    jt.set_global_seed(0)
    model = models.build_model(**ARCH)
    model.head.cca.gamma.update(jt.array([0.5]).float32())
    model.head.cca.gamma.sync()
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pkl", model)


def test_demo_writes_segmentation_overlay_and_attention(checkpoint, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in (("a.png", (40, 56)), ("b.jpg", (33, 47))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / name)
    (images / "notes.txt").write_text("not an image")          # ignored: not an image suffix
    out = tmp_path / "out"
    proc = run_demo(str(images), "--checkpoint", str(checkpoint), "--dataset", "demo",
                    "--out-dir", str(out), "--attention", "30", "20")
    assert proc.returncode == 0, proc.stderr
    for stem, (h, w) in (("a", (40, 56)), ("b", (33, 47))):
        seg = np.asarray(Image.open(out / f"{stem}_seg.png"))
        assert seg.shape == (h, w, 3)
        palette = {tuple(c) for c in __import__("datasets").DATASETS["demo"].PALETTE}
        assert {tuple(c) for c in seg.reshape(-1, 3)} <= palette        # only class colours
        assert np.asarray(Image.open(out / f"{stem}_overlay.png")).shape == (h, w, 3)
        attention = Image.open(out / f"{stem}_attention.png")
        assert attention.size[0] > 2 * attention.size[1]               # three panels side by side
        assert (out / f"{stem}_attention.png").stat().st_size < 300_000
    assert "a.png" in proc.stdout and "b.jpg" in proc.stdout


def test_demo_names_an_undecodable_image(checkpoint, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    proc = run_demo(str(bad), "--checkpoint", str(checkpoint), "--dataset", "demo", "--out-dir", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot decode image" in proc.stderr and "broken.jpg" in proc.stderr


def test_attention_point_outside_the_image_is_explained(checkpoint, tmp_path):
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "x.png")
    proc = run_demo(str(tmp_path / "x.png"), "--checkpoint", str(checkpoint), "--dataset", "demo",
                    "--out-dir", str(tmp_path / "o"), "--attention", "30", "5")
    assert proc.returncode == 2 and "outside" in proc.stderr and "30x20" in proc.stderr


# ----------------------------------------------------------------------------- attention maths
def _dense_one_loop(attention):
    """[HW, HW] matrix M1[u, p] built straight from ca_weight's layout, position by position."""
    _, h, w = attention.shape
    dense = np.zeros((h * w, h * w))
    for y in range(h):
        for x in range(w):
            for i in range(w):                         # row part: (y, i)
                dense[y * w + x, y * w + i] += attention[i, y, x]
            for j in range(h - 1):                     # column part: (j or j+1, x), skipping y
                row = j if j < y else j + 1
                dense[y * w + x, row * w + x] += attention[w + j, y, x]
    return dense


def test_two_loop_map_is_the_product_of_the_loops():
    rng = np.random.default_rng(0)
    h, w = 4, 5
    first, second = (visualize.attention_from_qk(rng.standard_normal((3, h, w)), rng.standard_normal((3, h, w)))
                     for _ in range(2))
    m1, m2 = _dense_one_loop(first), _dense_one_loop(second)
    for y, x in ((0, 0), (2, 3), (3, 4)):
        np.testing.assert_allclose(visualize.one_loop_map(first, y, x).ravel(), m1[y * w + x])
        two = visualize.two_loop_map(first, second, y, x)
        np.testing.assert_allclose(two.ravel(), (m2 @ m1)[y * w + x], atol=1e-12)
        assert (two > 0).all() and two.sum() == pytest.approx(1.0)     # whole image, still a distribution


def test_attention_from_qk_matches_the_attention_module():
    from models.cc_attention import CrissCrossAttention
    jt.set_global_seed(1)
    module = CrissCrossAttention(16)
    module.gamma.update(jt.array([1.0]).float32())
    module.gamma.sync()
    x = jt.array(np.random.default_rng(2).standard_normal((1, 16, 5, 6)).astype(np.float32))
    attention = visualize.attention_from_qk(module.query_conv(x).numpy()[0], module.key_conv(x).numpy()[0])
    value = module.value_conv(x).numpy()[0]
    expected = module(x).numpy()[0] - x.numpy()[0]            # gamma * aggregation
    dense = _dense_one_loop(attention)
    np.testing.assert_allclose((value.reshape(16, -1) @ dense.T).reshape(16, 5, 6), expected, atol=1e-4)


def test_capture_attention_returns_each_loop_in_the_design_layout():
    """Both loops, as the model runs them: loop 1 sees conva's output, loop 2 loop 1's output."""
    import models
    jt.set_global_seed(3)
    model = models.build_model(**ARCH)
    cca = model.head.cca
    cca.gamma.update(jt.array([0.8]).float32())
    cca.gamma.sync()
    model.eval()
    image = np.random.default_rng(5).standard_normal((3, 40, 48)).astype(np.float32)
    loops = visualize.capture_attention(model, image)
    assert "execute" not in cca.__dict__ and not cca.keep_attention      # module left as it was
    context = model.head.conva(model.backbone(jt.array(image[None]))[3])
    h, w = context.shape[2:]
    assert len(loops) == 2 and loops[0].shape == (h + w - 1, h, w)
    for attention in loops:
        expected = visualize.attention_from_qk(cca.query_conv(context).numpy()[0], cca.key_conv(context).numpy()[0])
        np.testing.assert_allclose(attention, expected, atol=1e-5)
        context = cca(context)
