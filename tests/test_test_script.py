"""test.py end to end on a tiny generated ADE20K tree with a tiny random CCNet checkpoint."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import jittor as jt

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 150        # ADE20K
ARCH = dict(backbone="resnet18", num_classes=NUM_CLASSES, recurrence=2, base_channels=8,
            head_channels=32, aux_channels=32)


def run_script(*args, cwd=ROOT):
    env = dict(os.environ, CCNET_QUIET="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def ade_tree(tmp_path_factory):
    """(data root, checkpoint path, {stem: in-process prediction}) -- annotations agree with the
    model's own prediction on part of each image so that the mIoU is far from 0."""
    import models
    from datasets.transforms import normalize
    from utils.checkpoint import save_checkpoint
    from utils.inference import inference

    root = tmp_path_factory.mktemp("ade")
    jt.set_global_seed(0)
    model = models.build_model(**ARCH)
    model.head.cca.gamma.update(jt.array([0.5]).float32())
    model.head.cca.gamma.sync()
    model.eval()
    checkpoint = save_checkpoint(root / "tiny.pkl", model)

    rng = np.random.default_rng(0)
    (root / "images" / "validation").mkdir(parents=True)
    (root / "annotations" / "validation").mkdir(parents=True)
    predictions = {}
    for i in range(3):
        stem = f"ADE_val_{i + 1:08d}"
        rgb = np.zeros((32, 48, 3), np.uint8)
        rgb[:, :24] = rng.integers(0, 256, 3)           # two flat halves + noise: varied predictions
        rgb[:, 24:] = rng.integers(0, 256, 3)
        rgb = np.clip(rgb + rng.integers(-40, 40, rgb.shape), 0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(root / "images" / "validation" / f"{stem}.png")
        pred = inference(model, normalize(rgb)).numpy().argmax(0)
        predictions[stem] = pred
        other = (np.bincount(pred.ravel()).argmax() + 7) % NUM_CLASSES     # one class the model misses
        annotation = np.where(rng.random((32, 48)) < 0.6, pred, other) + 1
        annotation[:2] = 0                                # ADE20K "other": ignored
        Image.fromarray(annotation.astype(np.uint8)).save(root / "annotations" / "validation" / f"{stem}.png")
    return root, checkpoint, predictions


def _miou_from_pngs(pred_dir, annotation_dir):
    """mIoU by direct per-class counting over the saved PNGs (no code from utils.metrics)."""
    preds, labels = [], []
    for path in sorted(Path(annotation_dir).glob("*.png")):
        labels.append(np.asarray(Image.open(path)).astype(np.int64) - 1)       # 0 -> -1 = ignored
        preds.append(np.asarray(Image.open(Path(pred_dir) / path.name)).astype(np.int64) - 1)
    pred, label = np.concatenate([p.ravel() for p in preds]), np.concatenate([g.ravel() for g in labels])
    valid = label >= 0
    ious = []
    for c in range(NUM_CLASSES):
        gt_c, pred_c = (label == c) & valid, (pred == c) & valid
        union = np.sum(gt_c | pred_c)
        if union:
            ious.append(np.sum(gt_c & pred_c) / union)
    return float(np.mean(ious)), preds


def test_printed_miou_equals_miou_of_saved_predictions(ade_tree, tmp_path):
    root, checkpoint, predictions = ade_tree
    out_json, pred_dir = tmp_path / "results.json", tmp_path / "preds"
    proc = run_script("test.py", "--checkpoint", str(checkpoint), "--dataset", "ade20k", "--data-root", str(root),
                      "--base-size", "0", "--out", str(out_json), "--save-pred", str(pred_dir), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    printed = re.search(r"mIoU (\d+\.\d+)\s+mAcc (\d+\.\d+)\s+aAcc (\d+\.\d+)", proc.stdout)
    assert printed, proc.stdout
    assert re.search(r"^wall\s+(\d+\.\d+|-)\s+(\d+\.\d+|-)$", proc.stdout, re.M)   # a row with a class name
    miou, saved = _miou_from_pngs(pred_dir, root / "annotations" / "validation")
    assert 0.1 < miou < 0.9
    assert float(printed.group(1)) == pytest.approx(100 * miou, abs=0.006)
    result = json.loads(out_json.read_text())
    assert result["mIoU"] == pytest.approx(miou, abs=1e-12)
    assert result["num_images"] == 3 and len(result["per_class"]) == NUM_CLASSES
    # the saved label maps are the model's own predictions in ADE20K's encoding (index + 1)
    for stem, pred in predictions.items():
        np.testing.assert_array_equal(np.asarray(Image.open(pred_dir / f"{stem}.png")), pred + 1)
        assert np.asarray(Image.open(pred_dir / "overlay" / f"{stem}.png")).shape == (32, 48, 3)


def test_slide_flip_runs(ade_tree, tmp_path):
    root, checkpoint, _ = ade_tree
    proc = run_script("test.py", "--checkpoint", str(checkpoint), "--dataset", "ade20k", "--data-root", str(root),
                      "--base-size", "0", "--mode", "slide", "--window", "24", "--stride", "16", "--flip",
                      "--scales", "0.75", "1.0", "--max-images", "1", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "(1 images)" in proc.stdout


def test_window_flag_and_its_former_spelling(capsys):
    """--window is the sliding-window size (train.py's --crop-size is the training crop); the
    former --crop-size still works, with one line saying so."""
    from scripts import load_script
    script = load_script("test.py")
    args = script.parse_args(["--checkpoint", "x.pkl", "--mode", "slide", "--crop-size", "24", "32"])
    assert args.window == [24, 32]
    assert capsys.readouterr().err.splitlines() == ["test.py: --crop-size is deprecated, use --window (same meaning)"]
    assert script.parse_args(["--checkpoint", "x.pkl", "--mode", "slide", "--window", "24"]).window == [24]
    with pytest.raises(SystemExit):
        script.parse_args(["--checkpoint", "x.pkl", "--mode", "slide"])
    assert "--mode slide needs --window" in capsys.readouterr().err


@pytest.mark.parametrize("flags, expected", [
    (["--num-classes", "7"], r"7 classes.*head\.bottleneck\.3\.weight: checkpoint \[150,"),
    (["--backbone", "resnet34"], r"backbone resnet34.*missing keys"),
])
def test_checkpoint_that_does_not_fit_is_a_clean_error(ade_tree, flags, expected):
    root, checkpoint, _ = ade_tree
    proc = run_script("test.py", "--checkpoint", str(checkpoint), "--dataset", "ade20k", "--data-root", str(root),
                      "--no-progress", *flags)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert re.search(expected, proc.stderr, re.S), proc.stderr


def test_empty_dataset_folder_shows_the_expected_layout(ade_tree, tmp_path):
    _, checkpoint, _ = ade_tree
    empty = tmp_path / "ADEChallengeData2016"
    (empty / "images" / "validation").mkdir(parents=True)
    (empty / "annotations" / "validation").mkdir(parents=True)
    proc = run_script("test.py", "--checkpoint", str(checkpoint), "--dataset", "ade20k", "--data-root", str(empty))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no samples" in proc.stderr and "annotations/validation" in proc.stderr, proc.stderr


def test_missing_checkpoint_is_a_clean_error(ade_tree, tmp_path):
    root, _, _ = ade_tree
    proc = run_script("test.py", "--checkpoint", str(tmp_path / "nope.pkl"), "--dataset", "ade20k",
                      "--data-root", str(root))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "nope.pkl" in proc.stderr
