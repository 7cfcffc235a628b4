"""Clip model (models/ccnet3d.py), clip demo set (datasets/demo_clips.py) and their train.py / test.py
runs: T = 1 equals the image model, frames meet only in the attention, the same augmentation for
every frame of a clip, errors that name the shape or the file."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import jittor as jt

from datasets.base import BadSampleError, DatasetError
from datasets.demo_clips import (BLUE, GREY_BLUE, GREY_RED, RED, DemoClipsDataset, ensure_demo_clips,
                                 generate, make_clip)
from models import build_model
from models.ccnet3d import TemporalCCNet
from models.losses import SegLoss
from utils.inference import clip_inference

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(base_channels=8, head_channels=16, aux_channels=16)
TINY_SPLITS = {"training": 4, "validation": 2}


def tiny(temporal=True, recurrence=2, gamma=0.5, **opts):
    jt.set_global_seed(0)
    model = build_model("resnet18", 5, recurrence=recurrence, temporal=temporal, **{**TINY, **opts})
    jt.sync(list(model.state_dict().values()))          # lazy init: materialise before any reseed
    if recurrence:
        model.head.cca.gamma.update(jt.array([gamma]))
        model.head.cca.gamma.sync()      # Jittor 1.3.11: a fresh 1-element Var must be synced first
    return model


def clip_batch(seed, shape=(2, 3, 3, 40, 48)):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.fixture(scope="module")
def clip_root(tmp_path_factory):
    return ensure_demo_clips(tmp_path_factory.mktemp("clips") / "set", splits=TINY_SPLITS)


# ----------------------------------------------------------------------------------- model
def test_single_frame_clip_equals_the_image_model_with_the_same_weights():
    clip_model, image_model = tiny(temporal=True, dropout=0.0), tiny(temporal=False, dropout=0.0)
    clip_state, image_state = clip_model.state_dict(), image_model.state_dict()
    assert list(clip_state) == list(image_state)                       # head.cca.* included
    assert all(tuple(clip_state[k].shape) == tuple(image_state[k].shape) for k in clip_state)
    image_model.load_state_dict(clip_state)
    x = clip_batch(0, (2, 1, 3, 40, 48))
    for train in (True, False):
        clip_model.train() if train else clip_model.eval()
        image_model.train() if train else image_model.eval()
        ours, theirs = clip_model(jt.array(x)), image_model(jt.array(x[:, 0]))
        for a, b in zip(ours if train else [ours], theirs if train else [theirs]):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recurrence", [0, 2])
def test_frames_meet_only_in_the_attention(recurrence):
    model = tiny(recurrence=recurrence)
    model.eval()                                      # BatchNorm on running statistics: no batch coupling
    x = clip_batch(1)
    changed = x.copy()
    changed[0, 0] = clip_batch(2, x[0, 0].shape)      # clip 0, frame 0
    before, after = model(jt.array(x)).numpy(), model(jt.array(changed)).numpy()
    assert before.shape == (6, 5, 40, 48)             # [B*T, K, H, W], clip b frame t at b*T + t
    frame0_change = np.abs(before[0] - after[0]).max()
    frame2_change = np.abs(before[2] - after[2]).max()
    assert frame0_change > 1e-4
    np.testing.assert_array_equal(before[3:], after[3:])          # the other clip never sees it
    if recurrence:
        assert frame2_change > 1e-3 * frame0_change   # reached along the temporal line (an untrained
    else:                                             # model's logits barely vary: relative bound)
        assert frame2_change == 0.0                   # R = 0: frames are independent


def test_training_outputs_fit_seg_loss_and_gradients_reach_every_part():
    model = tiny(ccl_dim=4)
    model.train()
    main, aux, ccl = model(jt.array(clip_batch(3)))
    assert [list(main.shape), list(aux.shape), list(ccl.shape)] == [[6, 5, 6, 7], [6, 5, 6, 7], [6, 4, 6, 7]]
    labels = jt.array(np.random.default_rng(4).integers(0, 5, size=(6, 40, 48)).astype(np.int32))
    loss, _ = SegLoss(5)([main, aux, ccl], labels)
    names = ["backbone.conv1.weight", "head.conva.0.weight", "head.cca.query_conv.weight",
             "head.cca.key_conv.weight", "head.cca.value_conv.weight", "head.cca.gamma",
             "head.bottleneck.3.weight", "dsn.3.weight"]
    params = dict(model.named_parameters())
    grads = jt.grad(loss, [params[n] for n in names])
    for name, grad in zip(names, grads):
        g = grad.numpy()
        assert np.isfinite(g).all() and np.abs(g).max() > 0, name


@pytest.mark.parametrize("shape", [(2, 3, 40, 48), (1, 2, 4, 40, 48), (1, 2, 3, 40, 48, 1)])
def test_bad_clip_shapes_are_value_errors_naming_the_shape(shape):
    model = tiny()
    with pytest.raises(ValueError, match=r"clips \[B, T, 3, H, W\].*" + r"\[" + ", ".join(map(str, shape))):
        model(jt.zeros(shape))


def test_temporal_option_goes_through_build_model():
    assert isinstance(tiny(), TemporalCCNet) and tiny().temporal
    assert not isinstance(tiny(temporal=False), TemporalCCNet)
    with pytest.raises(ValueError, match="temporal must be True or False"):
        build_model("resnet18", 5, temporal="yes", **TINY)


def test_clip_inference_image_model_segments_frames_like_the_clip_model_without_attention():
    clip_model, image_model = tiny(recurrence=0), tiny(temporal=False, recurrence=0)
    image_model.load_state_dict(clip_model.state_dict())
    clip_model.eval(), image_model.eval()
    frames = clip_batch(5, (3, 3, 40, 48))
    ours = clip_inference(clip_model, frames, flip=True).numpy()
    theirs = clip_inference(image_model, frames, flip=True).numpy()
    assert ours.shape == (3, 5, 40, 48)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- data
def test_generation_is_deterministic_and_the_label_depends_on_frame_zero(tmp_path):
    generate(tmp_path / "a", splits={"training": 2})
    generate(tmp_path / "b", splits={"training": 2})
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 2 * 3 * 2
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    frames, labels = make_clip(np.random.default_rng(7))
    for colour, grey in ((RED, GREY_RED), (BLUE, GREY_BLUE)):
        for t in (1, 2):
            np.testing.assert_array_equal(labels[0] == colour, labels[t] == grey)
    grey = (labels[1] == GREY_RED) | (labels[1] == GREY_BLUE)
    assert grey.any() and not np.isin(labels[0], (GREY_RED, GREY_BLUE)).any()
    # later frames: both grey classes look alike (same mean colour within noise)
    means = [frames[1][labels[1] == c].mean() for c in (GREY_RED, GREY_BLUE) if (labels[1] == c).any()]
    assert np.ptp(means) < 3.0


def test_augmentation_is_the_same_for_every_frame_of_a_clip(clip_root):
    dataset = DemoClipsDataset(clip_root, split="train", mode="train", crop_size=64)
    for seed in range(4):
        np.random.seed(seed)
        images, labels = dataset[seed % 4]
        assert images.shape == (3, 3, 64, 64) and labels.shape == (3, 64, 64)
        objects = [np.isin(labels[t], (RED, BLUE, GREY_RED, GREY_BLUE)) for t in range(3)]
        assert objects[0].any()
        np.testing.assert_array_equal(objects[0], objects[1])
        np.testing.assert_array_equal(objects[1], objects[2])
        # the photometric change is shared too: a grey object has one colour in frames 1 and 2
        grey = objects[1] & (labels[1] != 255)
        np.testing.assert_allclose(images[1][:, grey].mean(1), images[2][:, grey].mean(1), atol=0.1)
    with pytest.raises(ValueError, match="cat_max_ratio"):
        DemoClipsDataset(clip_root, split="train", cat_max_ratio=0.75)


def test_broken_clips_are_errors_naming_the_file(clip_root, tmp_path):
    import shutil
    root = tmp_path / "broken"
    shutil.copytree(clip_root, root)
    clip = root / "validation" / "clip_00001"
    (clip / "label_2.png").unlink()
    with pytest.raises(DatasetError, match=r"clip_00001.*label_2\.png"):
        DemoClipsDataset(root, split="val", mode="test")
    with pytest.warns(UserWarning, match="clip_00001"):
        dataset = DemoClipsDataset(root, split="val", mode="test", skip_bad=True)
    assert len(dataset.samples) == 1
    frame = root / "validation" / "clip_00000" / "frame_1.png"
    frame.write_bytes(frame.read_bytes()[:100])
    with pytest.raises(BadSampleError, match=r"clip_00000.frame_1\.png"):
        dataset.load_raw(0)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(frame)
    with pytest.raises(BadSampleError, match="frame_1.png is 8x8"):
        dataset.load_raw(0)


# ----------------------------------------------------------------------------------- scripts
def run_script(*args):
    env = dict(os.environ, CCNET_QUIET="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_train_and_test_scripts_on_clips(clip_root, tmp_path):
    work = tmp_path / "work"
    out = run_script("train.py", "--dataset", "demo_clips", "--data-root", str(clip_root), "--iters", "2",
                     "--batch-size", "2", "--crop-size", "48", "--num-workers", "0", "--eval-interval", "2",
                     "--work-dir", str(work), "--no-progress", "--model-opt", "base_channels=8",
                     "--model-opt", "head_channels=16", "--model-opt", "aux_channels=16")
    assert out.returncode == 0, out.stderr[-3000:]
    val = [json.loads(line) for line in open(work / "log.jsonl") if '"val"' in line][-1]
    from utils.checkpoint import Checkpoint
    assert Checkpoint(str(work / "best.pkl")).config.options["temporal"] is True

    result = tmp_path / "result.json"
    out = run_script("test.py", "--checkpoint", str(work / "best.pkl"), "--dataset", "demo_clips",
                     "--data-root", str(clip_root), "--out", str(result), "--save-pred", str(tmp_path / "pred"),
                     "--no-progress")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads(result.read_text())
    assert "grey/was-red" in metrics["per_class"] and metrics["num_images"] == 2
    assert metrics["mIoU"] == pytest.approx(val["mIoU"], abs=1e-9)      # same model, same clips
    assert sorted(p.name for p in (tmp_path / "pred").glob("*.png"))[:3] == \
        ["clip_00000_0.png", "clip_00000_1.png", "clip_00000_2.png"]
