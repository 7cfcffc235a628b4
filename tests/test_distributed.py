"""Multi-process training with Jittor's MPI: 2 ranks on CPU must equal 1 process on the full batch.

Why they can be equal at all: both see the same global batch (BatchStream seeds every sample by
its slot in the global batch), BatchNorm averages mean and mean-of-squares over ranks (equal
shards -> the full-batch statistics), gradients are averaged over ranks (equal shards, no ignored
pixels -> the full-batch mean loss), and dropout is off (``--dropout 0``): its random masks are
drawn per rank and could not match a single process.

The learning rate is small and the run short on purpose: float round-off (2e-7 after one step)
grows fast through BatchNorm on such tiny batches, and how fast depends on the CPU's vector unit
and on the kernels (max abs weight difference at lr 0.005: 1e-6 to 9e-5 after 3 steps on one
machine, 2e-5 after 2 steps on an AVX2 machine; at lr 0.002 on that machine: 1.5e-8 after 2 steps).
2 steps at lr 0.002 stay well inside 1e-5.
"""
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from test_train import ROOT, make_folder_dataset

from utils import distributed as dist

MPIRUN = shutil.which("mpirun")

HARNESS = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {root!r})
    import numpy as np
    import train
    from utils import distributed as dist
    out_dir, argv = sys.argv[1], sys.argv[2:]
    trainer = train.Trainer(train.parse_args(argv))
    code = trainer.run()
    state = {{k: v.numpy() for k, v in trainer.model.state_dict().items()}}
    np.savez(os.path.join(out_dir, f"weights_{{dist.world_size()}}_{{dist.rank()}}.npz"), **state)
    sys.exit(code)
""")


def common_flags(data, work_dir):
    return ["--dataset", "folder", "--data-root", str(data), "--backbone", "resnet18",
            "--model-opt", "base_channels=8", "--model-opt", "head_channels=16", "--model-opt", "aux_channels=16",
            "--crop-size", "32", "--batch-size", "4", "--iters", "2", "--lr", "0.002", "--dropout", "0",
            "--num-workers", "0", "--eval-interval", "0", "--log-interval", "1", "--eval-max-images", "1",
            "--work-dir", str(work_dir), "--no-progress"]


def test_shard_bounds_split_the_global_batch():
    assert [dist.shard_bounds(8, r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert dist.shard_bounds(5, 0, 1) == (0, 5)
    with pytest.raises(ValueError, match=r"--batch-size 6 is not divisible .* \(4\)"):
        dist.shard_bounds(6, 0, 4)


def test_single_process_helpers_are_identity():
    assert (dist.rank(), dist.world_size(), dist.is_main(), dist.in_mpi()) == (0, 1, True, False)
    assert dist.all_reduce_mean(2.5) == 2.5
    assert dist.any_rank(False) is False and dist.any_rank(True) is True
    assert dist.broadcast_int(7) == 7


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not found (Debian: apt-get install openmpi-bin libopenmpi-dev)")
def test_two_ranks_match_one_process_on_the_full_batch(tmp_path):
    data = make_folder_dataset(tmp_path / "data", classes=3, n_train=8, n_val=1, size=64)
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS.format(root=ROOT))
    env = dict(os.environ, CCNET_QUIET="1", OMP_NUM_THREADS="1",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_mpi_yield_when_idle="1", OMPI_MCA_rmaps_base_oversubscribe="1")

    single = subprocess.run([sys.executable, str(harness), str(tmp_path)]
                            + common_flags(data, tmp_path / "wd1"), env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run([MPIRUN, "-np", "2", "--oversubscribe", sys.executable, str(harness), str(tmp_path)]
                           + common_flags(data, tmp_path / "wd2"), env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stdout[-2000:] + multi.stderr[-3000:]

    w1 = np.load(tmp_path / "weights_1_0.npz")
    r0 = np.load(tmp_path / "weights_2_0.npz")
    r1 = np.load(tmp_path / "weights_2_1.npz")
    assert sorted(w1.files) == sorted(r0.files) == sorted(r1.files)
    compared = 0
    for key in w1.files:
        np.testing.assert_array_equal(r0[key], r1[key], err_msg=f"ranks disagree on {key}")
        np.testing.assert_allclose(r0[key], w1[key], rtol=0, atol=1e-5,
                                   err_msg=f"2 ranks vs 1 process differ on {key}")
        compared += 1
    assert compared > 50           # parameters and BN buffers of the whole model
    # The run really trained (otherwise equal weights would prove nothing).
    assert max(np.abs(w1[k]).max() for k in w1.files if k.endswith("running_mean")) > 0

    # Rank 0 alone wrote the log: every iteration appears exactly once, and the losses (averaged
    # over ranks) equal the single process's full-batch losses.
    import json
    def losses(path):
        records = [json.loads(line) for line in open(path)]
        return [(r["iter"], r["loss"]) for r in records if r["type"] == "train"]
    single_losses, multi_losses = losses(tmp_path / "wd1" / "log.jsonl"), losses(tmp_path / "wd2" / "log.jsonl")
    assert [i for i, _ in multi_losses] == [1, 2]
    np.testing.assert_allclose([l for _, l in multi_losses], [l for _, l in single_losses], rtol=1e-5)
    assert (tmp_path / "wd2" / "latest.pkl").is_file()


@pytest.mark.skipif(MPIRUN is None, reason="mpirun not found (Debian: apt-get install openmpi-bin libopenmpi-dev)")
def test_batch_not_divisible_by_ranks_is_an_error(tmp_path):
    data = make_folder_dataset(tmp_path / "data", classes=3, n_train=4, n_val=1, size=64)
    env = dict(os.environ, CCNET_QUIET="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    flags = common_flags(data, tmp_path / "wd")
    flags[flags.index("--batch-size") + 1] = "3"
    run = subprocess.run([MPIRUN, "-np", "2", "--oversubscribe", sys.executable, "train.py"] + flags,
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "--batch-size 3 is not divisible by the number of MPI processes (2)" in run.stdout + run.stderr
