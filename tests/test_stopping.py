"""Ctrl-C / SIGTERM at any moment of a training run, in subprocesses: the process ends within a few
seconds with exit status 130 / 143 and one line saying what was saved, no process prints a
traceback, nothing is left running, and where a checkpoint was written ``--resume`` continues bit
for bit (utils/supervisor.py, training/trainer.py)."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_train import ROOT, make_folder_dataset, read_records, run_train, tiny_flags, train_losses

SLACK = 4.0          # seconds allowed beyond the stop grace on a loaded 2-core machine


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder_dataset(str(tmp_path_factory.mktemp("data")), classes=3, n_train=8, n_val=2)


def descendants(pid):
    """Every process below ``pid`` (from /proc)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid):
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Run:
    """train.py (or ``script``) in a subprocess: the supervisor and its child."""

    def __init__(self, argv, grace=None, env=None, launcher=(), script="train.py"):
        env = dict(os.environ, CCNET_QUIET="1", **(env or {}))
        if grace is not None:
            env["CCNET_STOP_GRACE"] = str(grace)
        self.proc = subprocess.Popen([*launcher, sys.executable, script] + argv, cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.processes = []

    def wait_until(self, condition, timeout=300, poll=0.05):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the script ended early ({self.proc.returncode}):\n"
                                     + self.proc.communicate()[1][-3000:])
            if condition():
                return
            time.sleep(poll)
        self.end()
        raise AssertionError("the condition was not met in time")

    def stop(self, signum, then=None):
        """Send ``signum`` to the process the user started (and ``then()``, if given, after 50 ms:
        two signals at once would merge into one); returns (exit status, seconds from the first
        signal to the exit, stderr)."""
        self.processes = descendants(self.proc.pid)
        start = time.time()
        self.proc.send_signal(signum)
        if then is not None:
            time.sleep(0.05)
            then()
        try:
            _, err = self.proc.communicate(timeout=120)
        finally:
            self.end()
        return self.proc.returncode, time.time() - start, err

    def end(self):
        """SIGTERM, not SIGKILL: Jittor ends the test process when a child of it dies of SIGKILL."""
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)

    def leftovers(self):
        time.sleep(0.5)
        return [pid for pid in self.processes if alive(pid)]


def last_line(err):
    return err.strip().splitlines()[-1]


def weights(path):
    from utils.checkpoint import read_checkpoint
    state = read_checkpoint(str(path))
    return state, {**state["state_dict"], **{"momentum/" + k: v for k, v in state["optimizer"]["momentum_buffers"].items()}}


def saved_iteration(path):
    """The iteration of the checkpoint at ``path`` (None while there is none: it appears by rename)."""
    from utils.checkpoint import read_checkpoint
    return read_checkpoint(str(path))["iteration"] if path.exists() else None


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ----------------------------------------------------------------------------------- moments
def test_stop_during_set_up_saves_nothing_and_says_so(data, tmp_path):
    run = Run(tiny_flags(data, tmp_path / "wd", **{"--num-workers": 1}))
    time.sleep(1.0)                                     # importing Jittor, building the data and model
    code, seconds, err = run.stop(signal.SIGINT)
    assert code == 130 and seconds < SLACK, err
    assert last_line(err) == "train.py: SIGINT: ended at once; nothing saved"
    assert "Traceback" not in err and run.leftovers() == []


def test_stop_during_a_long_first_step_ends_within_the_grace(data, tmp_path):
    """A step longer than the grace (as a CCNet-R101 CPU step, ~30 s): the process is ended."""
    work = tmp_path / "wd"
    flags = tiny_flags(data, work, **{"--crop-size": 512, "--batch-size": 8, "--num-workers": 1,
                                       "--eval-interval": 0})
    run = Run(flags, grace=1)
    run.wait_until(lambda: (work / "log.jsonl").exists())          # set-up done, the first step starts
    time.sleep(0.3)
    code, seconds, err = run.stop(signal.SIGTERM)
    assert not train_losses(work), "the first step finished before the signal: make it longer"
    assert code == 143 and seconds < 1 + SLACK, err
    assert last_line(err) == "train.py: no clean stop within 1 s, ended; nothing saved"
    assert "Traceback" not in err and run.leftovers() == []


def test_stop_between_steps_saves_and_resume_continues_bit_for_bit(data, tmp_path):
    flags = dict(**{"--iters": 20, "--eval-interval": 10, "--save-interval": 0, "--num-workers": 2})
    whole = tmp_path / "whole"
    out = run_train(tiny_flags(data, whole, **flags))
    assert out.returncode == 0, out.stderr[-3000:]

    work = tmp_path / "wd"
    run = Run(tiny_flags(data, work, **flags), grace=60)
    run.wait_until(lambda: (work / "log.jsonl").exists() and len(train_losses(work)) >= 3)
    code, seconds, err = run.stop(signal.SIGINT)
    assert code == 130 and seconds < SLACK, err
    state, _ = weights(work / "latest.pkl")
    done = state["iteration"]
    assert 3 <= done < 20 and max(train_losses(work)) == done
    assert last_line(err) == (f"stopped by SIGINT after iteration {done}; resumable checkpoint {work / 'latest.pkl'}; "
                              f"continue with: python train.py --resume {work}")
    assert "Traceback" not in err and run.leftovers() == []

    out = run_train(["--resume", str(work), "--no-progress"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert train_losses(work) == train_losses(whole)
    assert_same_weights(weights(work / "latest.pkl")[1], weights(whole / "latest.pkl")[1])


def test_unsupervised_a_stop_still_finishes_the_step_and_saves(data, tmp_path):
    """CCNET_SUPERVISE=0 (one process, e.g. for breakpoint()): SIGINT to the trainer (not to its
    whole group: Jittor's compile workers end themselves on SIGINT, and Jittor then ends the
    process) still stops it after the step, with its loader workers."""
    work = tmp_path / "wd"
    run = Run(tiny_flags(data, work, **{"--iters": 500, "--eval-interval": 0, "--save-interval": 0,
                                        "--num-workers": 2}), env={"CCNET_SUPERVISE": "0"})
    run.wait_until(lambda: (work / "log.jsonl").exists() and len(train_losses(work)) >= 3)
    code, seconds, err = run.stop(signal.SIGINT)
    assert code == 130 and seconds < SLACK, err
    assert last_line(err).startswith("stopped by SIGINT after iteration") and "Traceback" not in err
    assert run.leftovers() == []


def test_stop_during_validation_owes_it_to_the_resumed_run(data, tmp_path):
    """Validation dominates this run (many large validation images, tiny steps): a stop lands in
    it, the checkpoint records the validation as owed, and the resumed run does it first."""
    val_heavy = make_folder_dataset(str(tmp_path / "data"), classes=3, n_train=4, n_val=24, size=128)
    flags = {"--iters": 3, "--eval-interval": 1, "--save-interval": 1, "--eval-max-images": 24}
    whole = tmp_path / "whole"
    out = run_train(tiny_flags(val_heavy, whole, **flags))
    assert out.returncode == 0, out.stderr[-3000:]

    work = tmp_path / "wd"
    run = Run(tiny_flags(val_heavy, work, **flags), grace=60)
    run.wait_until(lambda: saved_iteration(work / "latest.pkl") == 2, poll=0.01)   # validation 2 follows
    code, seconds, err = run.stop(signal.SIGINT)
    assert code == 130 and seconds < SLACK, err
    state, _ = weights(work / "latest.pkl")
    assert state["pending_eval"] == state["iteration"] == 2, "the stop did not land in validation 2"
    assert [r["iter"] for r in read_records(work) if r["type"] == "val"] == [1]

    out = run_train(["--resume", str(work), "--no-progress"])
    assert out.returncode == 0, out.stderr[-3000:]
    vals = lambda w: [(r["iter"], r["mIoU"]) for r in read_records(w) if r["type"] == "val"]
    assert vals(work) == vals(whole) and [i for i, _ in vals(work)] == [1, 2, 3]
    assert_same_weights(weights(work / "latest.pkl")[1], weights(whole / "latest.pkl")[1])
    assert_same_weights(weights(work / "best.pkl")[1], weights(whole / "best.pkl")[1])


def test_a_second_signal_while_a_checkpoint_is_written_keeps_the_last_complete_one(data, tmp_path):
    """A model whose checkpoint takes a while to write, saved after every step: the second Ctrl-C
    arrives while a temporary checkpoint file is being written."""
    work = tmp_path / "wd"
    flags = tiny_flags(data, work, **{"--iters": 500, "--save-interval": 1, "--eval-interval": 0})
    flags += ["--model-opt", "base_channels=64"]        # ~90 MB per checkpoint with the momentum
    run = Run(flags, grace=60)
    run.wait_until(lambda: (work / "latest.pkl").exists())
    run.wait_until(lambda: any(work.glob(".latest.pkl.*.tmp")), poll=0.001)
    writing = []

    def second_ctrl_c():
        writing.append(any(work.glob(".latest.pkl.*.tmp")))
        run.proc.send_signal(signal.SIGINT)
    code, seconds, err = run.stop(signal.SIGINT, then=second_ctrl_c)
    assert writing == [True], "no checkpoint was being written at the second signal"
    assert code == 130 and seconds < SLACK, err
    assert not list(work.glob(".*.tmp"))                             # removed by the supervisor
    state, _ = weights(work / "latest.pkl")                          # complete, loadable
    assert last_line(err).startswith("train.py: SIGINT, then SIGINT: ended at once; last checkpoint "
                                     f"{work / 'latest.pkl'} (iteration {state['iteration']})")
    assert "Traceback" not in err and run.leftovers() == []


# ----------------------------------------------------------------------------------- compile
def _compiler_running(pids):
    for pid in pids:
        try:
            if "cc1plus" in Path(f"/proc/{pid}/cmdline").read_text():
                return True
        except OSError:
            pass
    return False


@pytest.mark.parametrize("moment", ["set-up", "first step"])
def test_stop_while_jittor_compiles_operators(data, tmp_path, moment):
    """A test-owned Jittor cache (``cache_name``: Jittor's core is compiled into it once, minutes)
    whose compiled operators are deleted first, so that building the model and the first step
    compile them in Jittor's process pool; the stop comes while a compiler runs."""
    env = {"cache_name": "ccnet_tests/compile"}
    warm = subprocess.run([sys.executable, "-c", "from utils import runtime; runtime.activate(verbose=False); "
                           "import jittor_utils; print(jittor_utils.cache_path)"],
                          cwd=ROOT, env=dict(os.environ, **env), capture_output=True, text=True, timeout=3600)
    assert warm.returncode == 0, warm.stderr[-3000:]
    cache = Path(warm.stdout.strip().splitlines()[-1])
    assert cache.parts[-2:] == ("ccnet_tests", "compile")
    shutil.rmtree(cache / "jit", ignore_errors=True)                 # only this test's own kernels

    work = tmp_path / "wd"
    run = Run(tiny_flags(data, work, **{"--num-workers": 1}), grace=2, env=env)
    in_first_step = moment == "first step"
    run.wait_until(lambda: (work / "log.jsonl").exists() == in_first_step
                   and _compiler_running(descendants(run.proc.pid)), timeout=600, poll=0.1)
    code, seconds, err = run.stop(signal.SIGINT)
    assert code == 130 and seconds < 2 + SLACK, err
    expected = "no clean stop within 2 s, ended" if in_first_step else "SIGINT: ended at once"
    assert last_line(err) == f"train.py: {expected}; nothing saved"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert run.leftovers() == []


# ----------------------------------------------------------------------------------- mpirun
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI's mpirun is not installed")
def test_stop_under_mpirun_stops_every_rank_at_one_step(data, tmp_path):
    """Ctrl-C reaches mpirun, which sends SIGTERM to the ranks: they agree on the step to stop
    after, rank 0 saves and says so; mpirun's own exit status is 1."""
    work = tmp_path / "wd"
    flags = tiny_flags(data, work, **{"--iters": 500, "--eval-interval": 0, "--save-interval": 0,
                                       "--batch-size": 4})
    mpi = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    run = Run(flags, grace=30, env=mpi, launcher=("mpirun", "-np", "2"))
    run.wait_until(lambda: (work / "log.jsonl").exists() and len(train_losses(work)) >= 3)
    code, seconds, err = run.stop(signal.SIGINT)
    assert code != 0 and seconds < SLACK, err
    state, _ = weights(work / "latest.pkl")
    assert last_line(err) == (f"stopped by SIGTERM after iteration {state['iteration']}; resumable checkpoint "
                              f"{work / 'latest.pkl'}; continue with: python train.py --resume {work}")
    assert err.count("stopped by") == 1 and "Traceback" not in err and run.leftovers() == []
    out = subprocess.run(["mpirun", "-np", "2", sys.executable, "train.py", "--resume", str(work),
                          "--iters", str(state["iteration"] + 2), "--no-progress"],
                         cwd=ROOT, env=dict(os.environ, CCNET_QUIET="1", **mpi), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert weights(work / "latest.pkl")[0]["iteration"] == state["iteration"] + 2


# ----------------------------------------------------------------------------------- test.py
def test_ctrl_c_during_test_py_ends_it_quietly(tmp_path):
    import jittor as jt
    import models
    from utils.checkpoint import save_checkpoint
    data = make_folder_dataset(str(tmp_path / "data"), classes=3, n_train=1, n_val=200, size=128)
    jt.set_global_seed(0)
    checkpoint = save_checkpoint(tmp_path / "tiny.pkl", models.build_model("resnet18", 3, base_channels=8,
                                                                           head_channels=16, aux_channels=16))
    preds = tmp_path / "preds"
    run = Run(["--checkpoint", str(checkpoint), "--dataset", "folder", "--data-root", data, "--save-pred",
               str(preds), "--no-progress"], script="test.py")
    run.wait_until(lambda: preds.exists() and len(list(preds.glob("*.png"))) >= 2)
    code, seconds, err = run.stop(signal.SIGINT)
    assert code == 130 and seconds < SLACK, err
    assert last_line(err) == "test.py: SIGINT: ended at once" and "Traceback" not in err
    assert run.leftovers() == []
