"""benchmarks/model.py: argument checks (CUDA absent is a one-line error, never a CPU fallback),
the step configurations and schedule estimate of the GPU table, and one tiny end-to-end run of both
frameworks; benchmarks/inference.py: argument checks and a tiny run."""
import json
import os
import subprocess
import sys

import pytest

from scripts import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "model.py")
INFERENCE_SCRIPT = os.path.join(ROOT, "benchmarks", "inference.py")


def load_benchmark():
    return load_script("benchmarks/model.py")


def run(*argv, timeout=60, script=SCRIPT):
    return subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=dict(os.environ, CCNET_QUIET="1"))


@pytest.mark.skipif(load_benchmark().cuda_unavailable_reason() is None, reason="a CUDA GPU is usable here")
def test_cuda_without_a_gpu_is_a_one_line_error(tmp_path):
    out = tmp_path / "model_cuda.json"
    for argv in (["--device", "cuda"], ["--device", "cuda", "--amp"]):
        done = run(*argv, "--json", str(out))
        assert done.returncode != 0
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "--device cuda" in lines[0] and "not falling back to CPU" in lines[0]
        assert not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["--amp"], "--amp needs --device cuda"),
    (["--crop", "0"], "--crop must be >= 1, got 0"),
    (["--batch-size", "-2"], "--batch-size must be >= 1, got -2"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
])
def test_bad_arguments_are_rejected(argv, message):
    done = run(*argv)
    assert done.returncode == 2 and message in done.stderr


def test_step_configurations(monkeypatch):
    bench = load_benchmark()
    monkeypatch.setattr(bench, "cuda_unavailable_reason", lambda: None)   # as on a GPU machine
    cuda = bench.parse_args(["--device", "cuda", "--amp"])
    assert bench.step_configs(cuda) == [("ade20k", 150, 512, 8), ("cityscapes", 19, 769, 4)]
    assert bench.step_configs(bench.parse_args([])) == [("ade20k", 150, 512, 1)]
    custom = bench.parse_args(["--device", "cuda", "--crop", "256", "--batch-size", "2"])
    assert bench.step_configs(custom) == [("custom", 150, 256, 2)]


def test_schedule_estimate(capsys):
    bench = load_benchmark()
    rows = {("ade20k", "resnet101", "jittor"): {"images_per_s": 32.0},
            ("cityscapes", "resnet101", "jittor"): {"images_per_s": 1.0}}
    bench.print_recipe_estimate(rows)
    # 80000 iterations x 16 images / 32 images per second = 40000 s = 11.1 h
    assert "jittor resnet101: 1 GPU 11.1 h, 4 GPUs 2.8 h, 8 GPUs 1.4 h" in capsys.readouterr().out


def test_tiny_run_of_both_frameworks(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    done = run("--backbones", "resnet18", "--crop", "48", "--classes", "5", "--steps", "1", "--threads", "1",
               "--jittor-tensor-peak", "--json", str(out), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    jittor, torch_row = sorted(record["results"], key=lambda r: r["framework"])
    assert (jittor["framework"], torch_row["framework"]) == ("jittor", "torch")
    assert jittor["params"] == torch_row["params"] > 1e6          # same network
    # same weights, image and labels: the first losses differ only through the dropout masks
    assert jittor["losses"][0] == pytest.approx(torch_row["losses"][0], rel=0.05)
    for row in (jittor, torch_row):
        assert len(row["step_s"]) == 1 and row["step_s"][0] > 0 and row["peak_rss_mib"] > 100
    assert 0 < jittor["jittor_tensor_peak_mib"] < jittor["peak_rss_mib"]
    assert "| custom 5 cls, 48px, batch 1 | jittor | resnet18 |" in done.stdout


@pytest.mark.parametrize("argv,message", [
    (["--images", "0"], "--images must be >= 1, got 0"),
    (["--width", "-1"], "--width must be >= 1, got -1"),
    (["--backbone", "van_b2"], "invalid choice: 'van_b2'"),
])
def test_inference_bad_arguments_are_rejected(argv, message):
    done = run(*argv, script=INFERENCE_SCRIPT)
    assert done.returncode == 2 and message in done.stderr


def test_inference_tiny_run_of_both_frameworks(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "inference.json"
    done = run("--backbone", "resnet18", "--classes", "4", "--height", "40", "--width", "53", "--images", "1",
               "--threads", "1", "--json", str(out), timeout=600, script=INFERENCE_SCRIPT)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    assert set(summary) == {"jittor", "torch"}
    for row in summary.values():
        assert row["images_per_s"] > 0 and row["cpu_s_per_image"] > 0 and row["peak_rss_mib"] > 100
    # same weights, same images: the same predictions (random weights, so accuracy is near chance)
    assert summary["jittor"]["pixel_accuracy"] == pytest.approx(summary["torch"]["pixel_accuracy"], abs=1e-3)
    assert "| jittor |" in done.stdout and "| torch |" in done.stdout
