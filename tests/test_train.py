"""train.py end to end on tiny data: flags, logs, checkpoints, exact resume, faults."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_folder_dataset(root, classes=3, n_train=8, n_val=2, size=64, seed=0):
    """A tiny 'folder' dataset: horizontal bands of classes 0..C-1 under noisy colours, no
    ignored pixels (so the loss is a plain mean over all pixels)."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "classes.json"), "w") as f:
        json.dump({"classes": [f"c{i}" for i in range(classes)]}, f)
    for split, count in (("train", n_train), ("val", n_val)):
        os.makedirs(os.path.join(root, "images", split), exist_ok=True)
        os.makedirs(os.path.join(root, "masks", split), exist_ok=True)
        for i in range(count):
            bands = rng.integers(0, classes, size=4)
            label = np.repeat(bands, size // 4)[:, None].repeat(size, axis=1).astype(np.uint8)
            image = (rng.normal(0, 20, (size, size, 3)) + 60 * label[..., None] + 40).clip(0, 255)
            Image.fromarray(image.astype(np.uint8)).save(os.path.join(root, "images", split, f"s{i}.png"))
            Image.fromarray(label).save(os.path.join(root, "masks", split, f"s{i}.png"))
    return root


def tiny_flags(data, work_dir, **overrides):
    """Flags of a run that takes seconds: ResNet-18 with 8 base channels, 32 px crops."""
    flags = {"--dataset": "folder", "--data-root": str(data), "--backbone": "resnet18",
             "--crop-size": "32", "--batch-size": "2", "--iters": "6", "--lr": "0.02",
             "--num-workers": "0", "--eval-interval": "3", "--save-interval": "3", "--log-interval": "1",
             "--eval-max-images": "2", "--work-dir": str(work_dir)}
    flags.update({k: str(v) for k, v in overrides.items()})
    argv = [item for pair in flags.items() for item in pair]
    return argv + ["--model-opt", "base_channels=8", "--model-opt", "head_channels=16",
                   "--model-opt", "aux_channels=16", "--no-progress"]


def run_train(argv, timeout=300):
    env = dict(os.environ, CCNET_QUIET="1")
    return subprocess.run([sys.executable, "train.py"] + argv, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def read_records(work_dir):
    with open(os.path.join(work_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(work_dir):
    return {r["iter"]: r["loss"] for r in read_records(work_dir) if r["type"] == "train"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder_dataset(str(tmp_path_factory.mktemp("data")), classes=3, n_train=8, n_val=2)


# ----------------------------------------------------------------------------------- flags
def test_help_documents_every_flag():
    out = run_train(["--help"], timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--backbone", "--dataset", "--data-root", "--recurrence", "--crop-size", "--batch-size",
                 "--iters", "--lr", "--momentum", "--weight-decay", "--power", "--min-lr", "--aux-weight",
                 "--ohem", "--ccl", "--pretrained", "--resume", "--work-dir", "--eval-interval",
                 "--save-interval", "--seed", "--num-workers", "--amp", "--dropout", "--model-opt", "--stop-at"):
        assert flag in out.stdout, flag
    # Defaults shown are the ADE20K recipe; the demo preset is described.
    for text in ("default: 80000", "default: 0.01", "default: 0.0005", "default: 0.0001", "default: 16",
                 "default: 512", "default: 0.4", "default: 0.9", "--dataset demo uses"):
        assert text in " ".join(out.stdout.split()), text      # argparse wraps lines


def test_defaults_are_the_ade20k_recipe_and_flags_beat_presets():
    import train
    args = train.parse_args([])
    assert (args.dataset, args.backbone, args.recurrence) == ("ade20k", "resnet101", 2)
    assert (args.lr, args.momentum, args.weight_decay, args.power, args.min_lr) == (0.01, 0.9, 5e-4, 0.9, 1e-4)
    assert (args.iters, args.batch_size, args.crop_size, args.aux_weight) == (80000, 16, 512, 0.4)
    demo = train.parse_args(["--dataset", "demo"])
    for key, value in train.PRESETS["demo"].items():
        assert getattr(demo, key) == value, key
    mixed = train.parse_args(["--dataset", "demo", "--iters", "7", "--backbone", "resnet50",
                              "--model-opt", "base_channels=32", "--model-opt", "head_act=relu"])
    assert (mixed.iters, mixed.backbone, mixed.crop_size) == (7, "resnet50", train.PRESETS["demo"]["crop_size"])
    assert mixed.model_opts["base_channels"] == 32 and mixed.model_opts["head_act"] == "relu"
    assert mixed.work_dir == os.path.join("work_dirs", "demo_resnet50_r2")


def test_renamed_flags_still_work_and_say_so(capsys):
    import train
    config = train.parse_args(["--eval-crop", "64", "--val-images", "3"])
    assert (config.eval_window, config.eval_max_images) == (64, 3)
    err = capsys.readouterr().err.splitlines()
    assert err == ["train.py: --eval-crop is deprecated, use --eval-window (same meaning)",
                   "train.py: --val-images is deprecated, use --eval-max-images (same meaning)"]
    config = train.parse_args(["--eval-window", "64", "--eval-max-images", "3"])
    assert (config.eval_window, config.eval_max_images) == (64, 3) and capsys.readouterr().err == ""
    assert "--eval-crop" not in train.build_parser().format_help()


def test_resume_settings_come_from_the_checkpoint_unless_given(tmp_path, capsys):
    """A checkpoint of the earlier format (settings recorded as eval_crop / val_images): its
    settings and its model apply, explicit flags win, --model-opt changes single options, and
    the seed stays the checkpoint's."""
    import models
    import train
    from utils.checkpoint import save_checkpoint
    model = models.build_model("resnet18", 3, recurrence=1, base_channels=8, head_channels=16, aux_channels=16,
                               dropout=0.2)
    recorded = {"dataset": "folder", "data_root": "/data", "lr": 0.5, "iters": 9, "seed": 5, "backbone": "resnet18",
                "eval_crop": 64, "val_images": 2, "stop_at": 3, "work_dir": "/elsewhere"}
    path = save_checkpoint(tmp_path / "run" / "latest.pkl", {
        "state_dict": model.state_dict(), "optimizer": {}, "iteration": 1, "seed": 5,
        "meta": {"args": recorded}}, config=model.config)
    config = train.parse_args(["--resume", str(tmp_path / "run")])
    assert (config.dataset, config.data_root, config.lr, config.iters, config.seed) == ("folder", "/data", 0.5, 9, 5)
    assert (config.eval_window, config.eval_max_images, config.stop_at) == (64, 2, None)
    assert (config.backbone, config.recurrence, config.dropout) == ("resnet18", 1, 0.2)
    assert config.model_opts["head_channels"] == 16 and config.work_dir == str(tmp_path / "run")
    config = train.parse_args(["--resume", str(path), "--lr", "0.1", "--seed", "7", "--model-opt", "head_channels=32"])
    assert (config.lr, config.seed, config.model_opts["head_channels"], config.model_opts["base_channels"]) == \
        (0.1, 5, 32, 8)
    assert "trained with --seed 5" in capsys.readouterr().err
    assert config.model_config(3).options == dict(model.config.options, head_channels=32, stem="deep")


@pytest.mark.parametrize("argv,message", [
    (["--iters", "0"], "--iters"),
    (["--min-lr", "0.5"], "--min-lr"),
    (["--model-opt", "base_channels"], "KEY=VALUE"),
    (["--dropout", "1.0"], "--dropout"),
])
def test_bad_flags_are_rejected(argv, message, capsys):
    import train
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------------- data order
class NoisyDataset:
    """Stands in for a SegDataset: sample i is i plus augmentation noise from NumPy's global RNG."""
    samples = list(range(10))
    num_samples = 10

    def __getitem__(self, index):
        image = np.full((3, 2, 2), float(index), np.float32) + np.random.rand(3, 2, 2).astype(np.float32)
        label = np.full((2, 2), index + int(100 * np.random.rand()), np.int32)
        return image, label


def test_batch_stream_is_a_function_of_seed_and_iteration():
    from datasets.stream import BatchStream
    full = BatchStream(NoisyDataset(), 4, seed=3, shard=(0, 4))
    sequential = [full.next_batch(t)[:2] for t in range(7)]             # crosses 2 epochs of 10
    # Every sample once per epoch: 7 batches of 4 = 28 positions = 2.8 epochs.
    picked = [i for t in range(5) for i, _ in full.indices(t)]
    assert sorted(picked[:10]) == list(range(10)) and sorted(picked[10:20]) == list(range(10))
    # Jumping straight to iteration 5 (a resume) gives the very same batch.
    jumped = BatchStream(NoisyDataset(), 4, seed=3, shard=(0, 4)).next_batch(5)
    np.testing.assert_array_equal(jumped[0], sequential[5][0])
    np.testing.assert_array_equal(jumped[1], sequential[5][1])
    # Two ranks' shards together are the single-process batch, augmentation included.
    halves = [BatchStream(NoisyDataset(), 4, seed=3, shard=s).next_batch(2) for s in ((0, 2), (2, 4))]
    np.testing.assert_array_equal(np.concatenate([h[0] for h in halves]), sequential[2][0])
    # Worker processes change nothing.
    pooled = BatchStream(NoisyDataset(), 4, seed=3, shard=(0, 4), num_workers=2)
    try:
        for t in (0, 1, 2):
            images, labels, waited = pooled.next_batch(t)
            np.testing.assert_array_equal(images, sequential[t][0])
            np.testing.assert_array_equal(labels, sequential[t][1])
            assert waited >= 0
    finally:
        pooled.close()
    # Another seed, another order.
    other = BatchStream(NoisyDataset(), 4, seed=4, shard=(0, 4))
    assert [other.indices(t) for t in range(3)] != [full.indices(t) for t in range(3)]


def test_sgd_step_drops_the_gradients_and_updates_like_optimizer_step():
    import jittor as jt
    from training.step import sgd_step
    rng = np.random.RandomState(0)
    x_np, start = rng.randn(8, 3).astype(np.float32), rng.randn(3, 2).astype(np.float32)
    runs = []
    for step in ("sgd_step", "optimizer.step"):
        weight = jt.array(start)
        optimizer = jt.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
        for _ in range(3):
            loss = (jt.matmul(jt.array(x_np), weight).sqr()).mean()
            if step == "sgd_step":
                sgd_step(optimizer, loss)
                assert "grads" not in optimizer.param_groups[0]   # nothing parameter-sized kept
            else:
                optimizer.step(loss)
        runs.append((weight.numpy(), optimizer.param_groups[0]["values"][0].numpy()))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])        # momentum buffers too
    assert not np.array_equal(runs[0][0], start)


@pytest.mark.timeout(60)
def test_batch_stream_survives_a_killed_worker():
    """A worker killed from outside (pkill, a scheduler's SIGTERM to the whole job) gives a clear
    error, and closing the stream returns (multiprocessing.Pool.terminate() used to hang here)."""
    import threading
    from datasets.stream import BatchStream
    stream = BatchStream(NoisyDataset(), 4, seed=3, shard=(0, 4), num_workers=1)
    stream.next_batch(0)
    for pid in list(stream._pool._processes):
        os.kill(pid, signal.SIGTERM)
    time.sleep(1.0)
    with pytest.raises(RuntimeError, match="data-loading worker died"):
        for t in range(1, 4):
            stream.next_batch(t)
    closer = threading.Thread(target=stream.close, daemon=True)
    closer.start()
    closer.join(20)
    assert not closer.is_alive(), "BatchStream.close() hung after a worker was killed"


# ----------------------------------------------------------------------------------- end to end
def test_stop_and_resume_replays_the_uninterrupted_run_exactly(data, tmp_path):
    from utils.checkpoint import read_checkpoint
    # Dropout on and a worker process: their randomness must be replayed too.
    whole = tmp_path / "whole"
    out = run_train(tiny_flags(data, whole, **{"--num-workers": 1}))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Warning" not in out.stderr, "a library warning the user cannot act on:\n" + out.stderr
    split = tmp_path / "split"
    out = run_train(tiny_flags(data, split, **{"--num-workers": 1, "--stop-at": 4}))
    assert out.returncode == 0, out.stderr[-3000:]
    assert read_checkpoint(str(split / "latest.pkl"))["iteration"] == 4
    # Resume with the work dir alone: every other setting comes from the checkpoint.
    out = run_train(["--resume", str(split), "--no-progress"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stderr

    expected, got = train_losses(whole), train_losses(split)
    assert sorted(got) == list(range(1, 7))                 # each iteration logged exactly once
    assert got == expected                                  # bit-identical losses, before and after
    a = read_checkpoint(str(whole / "latest.pkl"))
    b = read_checkpoint(str(split / "latest.pkl"))
    assert a["iteration"] == b["iteration"] == 6
    for key, value in a["state_dict"].items():
        np.testing.assert_array_equal(b["state_dict"][key], value, err_msg=key)
    for key, value in a["optimizer"]["momentum_buffers"].items():
        np.testing.assert_array_equal(b["optimizer"]["momentum_buffers"][key], value, err_msg=key)
    assert np.abs(np.concatenate([v.ravel() for v in a["optimizer"]["momentum_buffers"].values()])).max() > 0

    # Logs, curves, checkpoints: validation at 3 and 6, best = highest val mIoU.
    records = read_records(split)
    vals = [r for r in records if r["type"] == "val"]
    assert [r["iter"] for r in vals] == [3, 6]
    assert all(0 <= r["mIoU"] <= 1 and len(r["IoU"]) == 3 for r in vals)
    train_records = [r for r in records if r["type"] == "train"]
    assert all(r["lr"] > 0 and r["step_time"] > 0 and r["data_time"] >= 0 for r in train_records)
    assert train_records[0]["lr"] == pytest.approx(0.02)
    assert [r["event"] for r in records if r["type"] == "event"] == ["stopped", "resume", "done"]
    best = read_checkpoint(str(split / "best.pkl"))
    assert best["best_mIoU"] == pytest.approx(max(r["mIoU"] for r in vals))
    assert best["arch"]["backbone"] == "resnet18" and best["arch"]["base_channels"] == 8
    with open(split / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not list(split.glob("*.tmp*"))                   # atomic writes leave no temp files


def test_nonfinite_loss_stops_with_a_debug_checkpoint(data, tmp_path):
    work = tmp_path / "wd"
    out = run_train(tiny_flags(data, work, **{"--lr": "1e30", "--min-lr": 0, "--eval-interval": 0}))
    assert out.returncode == 3, out.stderr[-3000:]
    events = [r for r in read_records(work) if r["type"] == "event"]
    assert events[-1]["event"] == "nonfinite_loss"
    bad_iter = events[-1]["iter"]
    assert f"at iteration {bad_iter}" in out.stderr and "training stopped" in out.stderr
    assert (work / f"debug_nonfinite_iter{bad_iter}.pkl").is_file()
    assert max(train_losses(work), default=0) <= bad_iter   # nothing logged after the bad step


# ----------------------------------------------------------------------------------- bad input
def _trainer_error(argv):
    import train
    with pytest.raises(SystemExit) as info:
        train.Trainer(train.parse_args(argv))
    return str(info.value)


def test_missing_pretrained_file_fails_before_training(data, tmp_path):
    message = _trainer_error(tiny_flags(data, tmp_path / "wd") + ["--pretrained", str(tmp_path / "nope.pth")])
    assert "--pretrained" in message and "nope.pth" in message and "no such file" in message
    assert not (tmp_path / "wd" / "log.jsonl").exists()     # stopped before the log was started


def test_checkpoint_that_does_not_fit_fails_before_training(data, tmp_path):
    work = tmp_path / "wd"
    out = run_train(tiny_flags(data, work, **{"--stop-at": 1, "--eval-interval": 0}))
    assert out.returncode == 0, out.stderr[-3000:]
    # Same work dir, but a wider backbone given explicitly: the weights cannot fit.
    message = _trainer_error(["--resume", str(work), "--model-opt", "base_channels=16", "--no-progress"])
    assert "does not fit" in message and "latest.pkl" in message
    assert max(train_losses(work)) == 1                     # the failed resume trained nothing
    import train
    with pytest.raises(SystemExit):
        train.parse_args(["--resume", str(tmp_path / "missing")])


def test_pretrained_v1c_backbone_gets_its_stem_and_the_run_resumes(data, tmp_path):
    """OpenMMLab V1c weights have a narrower deep stem: the model is built with it (no flag
    needed), the checkpoint records it, and resuming rebuilds the same model."""
    from utils.checkpoint import read_checkpoint
    work = tmp_path / "wd"
    weights = os.path.join(ROOT, "tests", "fixtures", "resnet_mmseg_v1c.pth")
    flags = tiny_flags(data, work, **{"--backbone": "resnet50", "--iters": 2, "--eval-interval": 0})
    flags += ["--model-opt", "base_channels=2", "--model-opt", "head_channels=8", "--model-opt", "aux_channels=4"]
    out = run_train(flags + ["--pretrained", weights, "--stop-at", "1"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "loaded" in out.stdout and "OpenMMLab ResNetV1c" in out.stdout
    assert read_checkpoint(str(work / "latest.pkl"))["arch"]["stem_widths"] == (1, 1, 2)
    out = run_train(["--resume", str(work), "--no-progress"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert read_checkpoint(str(work / "latest.pkl"))["iteration"] == 2


def test_amp_on_cpu_is_a_clear_error(data, tmp_path):
    import jittor as jt
    if jt.flags.use_cuda:
        pytest.skip("CUDA available: --amp is allowed")
    message = _trainer_error(tiny_flags(data, tmp_path / "wd") + ["--amp"])
    assert "--amp needs CUDA" in message


def test_ohem_and_category_consistent_loss_train(data, tmp_path):
    work = tmp_path / "wd"
    out = run_train(tiny_flags(data, work, **{"--iters": 2, "--eval-interval": 0}) + ["--ohem", "--ccl"])
    assert out.returncode == 0, out.stderr[-3000:]
    record = [r for r in read_records(work) if r["type"] == "train"][-1]
    for term in ("main", "aux", "ccl_var", "ccl_dis", "ccl_reg"):
        assert np.isfinite(record[term]), term
    # total = main + 0.4 aux + 1 var + 1 dis + 0.001 reg (the logged terms are the same step's)
    expected = record["main"] + 0.4 * record["aux"] + record["ccl_var"] + record["ccl_dis"] + 0.001 * record["ccl_reg"]
    assert record["loss"] == pytest.approx(expected, rel=1e-5)
