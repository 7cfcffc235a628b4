"""Every place the programs write to: a user's file there survives every command, and a second run
does not overwrite the results of a first one unless told to (``--overwrite``).

Paths covered here: the demo generator's --data-root (train.py), the work dir (train.py), --out and
--save-pred (test.py), --out-dir (demo.py, python -m utils.figures), --out (python -m datasets.demo /
datasets.demo_clips), the checkpoint cache (URLs), and the temporary files of atomic writes.
"""
import http.server
import scripts
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import jittor as jt

from test_demo_dataset import file_hashes, user_folder
from test_train import make_folder_dataset, read_records, run_train, tiny_flags

ROOT = Path(__file__).resolve().parents[1]
SENTINEL = "mine.txt"


def sentinel(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SENTINEL).write_text("the user's own file")
    return folder / SENTINEL


def survives(path):
    return path.read_text() == "the user's own file"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder_dataset(str(tmp_path_factory.mktemp("data")), classes=3, n_train=4, n_val=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import models
    from utils.checkpoint import save_checkpoint
    jt.set_global_seed(0)
    model = models.build_model("resnet18", 3, recurrence=2, base_channels=8, head_channels=16, aux_channels=16)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pkl", model)


# ------------------------------------------------------------------------------ train.py
def test_train_on_a_users_folder_as_demo_root_touches_nothing(tmp_path):
    """The reported data loss: --dataset demo --data-root <the user's ADE20K-layout folder>."""
    mine = tmp_path / "mine"
    before = user_folder(mine)
    out = run_train(["--dataset", "demo", "--data-root", str(mine), "--work-dir", str(tmp_path / "wd"),
                     "--no-progress"], timeout=300)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith(f"train.py: error: demo set: {mine} is neither empty")
    assert "Traceback" not in out.stderr
    assert file_hashes(mine) == before and not (tmp_path / "wd").exists()


def _trainer(argv):
    import train
    return train.Trainer(train.parse_args(argv))


def test_a_work_dir_holding_another_run_is_refused_and_replaced_only_with_overwrite(data, tmp_path, capsys):
    work = tmp_path / "wd"
    mine = sentinel(work)
    flags = tiny_flags(data, work, **{"--iters": 2, "--eval-interval": 0, "--save-interval": 1})
    out = run_train(flags)
    assert out.returncode == 0, out.stderr[-3000:]
    log_before = (work / "log.jsonl").read_bytes()
    latest_before = (work / "latest.pkl").read_bytes()
    (work / "debug_nonfinite_iter7.pkl").write_bytes(b"of the first run")
    (work / ".latest.pkl.abc123.tmp").write_bytes(b"left by a killed save")

    with pytest.raises(SystemExit) as info:        # a second fresh run into the same work dir
        _trainer(flags)
    message = str(info.value)
    assert f"--work-dir {work} holds another run" in message and "latest.pkl" in message
    assert "--overwrite" in message and f"--resume {work}" in message
    assert (work / "log.jsonl").read_bytes() == log_before and (work / "latest.pkl").read_bytes() == latest_before

    trainer = _trainer(flags + ["--overwrite"])          # told to: the first run's files go first
    assert "removed the earlier run's" in capsys.readouterr().err
    assert not (work / "debug_nonfinite_iter7.pkl").exists() and not (work / ".latest.pkl.abc123.tmp").exists()
    assert not (work / "latest.pkl").exists() and survives(mine)
    trainer.batches.close()

    out = run_train(flags + ["--overwrite"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r["type"] for r in read_records(work)].count("config") == 1      # one run's log, not two
    # Continuing the run in its own work dir needs no flag.
    out = run_train(["--resume", str(work), "--iters", "3", "--no-progress"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert survives(mine)
    # Resuming into another run's work dir is refused like a fresh run.
    other = tmp_path / "other"
    other.mkdir()
    (other / "log.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit, match="holds another run"):
        _trainer(["--resume", str(work / "latest.pkl"), "--work-dir", str(other), "--no-progress"])
    assert (other / "log.jsonl").read_text() == "{}\n"


def test_a_work_dir_that_is_a_file_is_an_error(data, tmp_path):
    (tmp_path / "wd").write_text("a file")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        _trainer(tiny_flags(data, tmp_path / "wd"))


# ------------------------------------------------------------------------------ test.py
def load_script(name):
    return scripts.load_script(f"{name}.py")


def test_test_py_outputs_are_not_overwritten_without_overwrite(data, checkpoint, tmp_path, capsys):
    test_script = load_script("test")
    preds = tmp_path / "preds"
    mine = sentinel(preds)
    results = tmp_path / "results.json"
    argv = ["--checkpoint", str(checkpoint), "--dataset", "folder", "--data-root", str(data), "--split", "val",
            "--out", str(results), "--save-pred", str(preds), "--no-progress"]
    test_script.main(argv)
    written = file_hashes(preds)
    assert sorted(written) == sorted([SENTINEL, "s0.png", "s1.png", "overlay/s0.png", "overlay/s1.png"])
    results.write_text("my edited results")
    with pytest.raises(SystemExit) as info:
        test_script.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{results}" in err and "exist already; pass --overwrite" in err
    assert results.read_text() == "my edited results" and file_hashes(preds) == written
    # --save-pred alone: only its own files count
    (preds / "s1.png").unlink()
    with pytest.raises(SystemExit):
        test_script.main(argv[:-5] + ["--save-pred", str(preds), "--no-progress"])
    assert f"{preds / 's0.png'}" in capsys.readouterr().err
    test_script.main(argv + ["--overwrite"])
    assert results.read_text().startswith("{") and survives(mine)
    assert not [p for p in tmp_path.rglob("*.tmp")]


# ------------------------------------------------------------------------------ demo.py
def test_demo_py_out_dir(checkpoint, tmp_path, capsys):
    demo_script = load_script("demo")
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.full((24, 32, 3), 90, np.uint8)).save(inputs / "a.png")
    out = tmp_path / "out"
    mine = sentinel(out)
    argv = [str(inputs), "--checkpoint", str(checkpoint), "--dataset", "folder", "--out-dir", str(out)]
    demo_script.main(argv)
    first = file_hashes(out)
    assert sorted(first) == ["a_overlay.png", "a_seg.png", SENTINEL]
    with pytest.raises(SystemExit):
        demo_script.main(argv)
    assert "a_seg.png" in capsys.readouterr().err and file_hashes(out) == first
    demo_script.main(argv + ["--overwrite"])
    assert survives(mine)
    # two inputs that would write the same pictures: an error even with --overwrite
    Image.fromarray(np.full((24, 32, 3), 90, np.uint8)).save(inputs / "a.jpg")
    with pytest.raises(SystemExit):
        demo_script.main(argv + ["--overwrite"])
    assert "would be written twice" in capsys.readouterr().err


# ------------------------------------------------------------------------------ pictures
def test_figures_and_sample_pictures_need_overwrite(tmp_path, capsys, monkeypatch):
    from datasets import demo as demo_set
    from utils import figures
    out = tmp_path / "images"
    mine = sentinel(out)
    figures.main(["--out-dir", str(out)])
    picture = (out / "criss_cross.png").read_bytes()
    with pytest.raises(SystemExit, match="criss_cross.png exists already; pass --overwrite"):
        figures.main(["--out-dir", str(out)])
    figures.main(["--out-dir", str(out), "--overwrite"])
    assert (out / "criss_cross.png").read_bytes() == picture and survives(mine)

    monkeypatch.setenv("CCNET_HOME", str(tmp_path / "home"))
    samples = out / "samples.png"
    samples.write_text("my picture")
    monkeypatch.setattr(demo_set, "DEMO_SPLITS", {"training": 2, "validation": 2})
    with pytest.raises(SystemExit):
        demo_set.main(["--out", str(samples), "--num", "2"])
    assert "exists already" in capsys.readouterr().err and samples.read_text() == "my picture"
    assert not (tmp_path / "home").exists()                   # refused before generating anything
    demo_set.main(["--out", str(samples), "--num", "2", "--overwrite"])
    assert samples.read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------ cache, temp files
class _Files(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        body = self.path.encode() * 100          # each URL its own content
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_two_urls_with_one_file_name_are_two_cached_files(tmp_path, monkeypatch):
    from utils.checkpoint.load import resolve_source
    monkeypatch.setenv("CCNET_HOME", str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        a = resolve_source(f"{base}/a/model.pth", progress=False)
        b = resolve_source(f"{base}/b/model.pth", progress=False)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert a != b and a.read_bytes() == b"/a/model.pth" * 100 and b.read_bytes() == b"/b/model.pth" * 100
    assert resolve_source(f"{base}/a/model.pth", progress=False) == a        # cached: no server needed


def test_an_interrupted_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    from utils.checkpoint import read_checkpoint, save_checkpoint
    from utils.checkpoint import save as save_module
    path = save_checkpoint(tmp_path / "latest.pkl", {"iteration": 1})
    real = save_module.jt.save

    def torn(state, name):
        with open(name, "wb") as f:
            f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(save_module.jt, "save", torn)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"iteration": 2})
    monkeypatch.setattr(save_module.jt, "save", real)
    assert read_checkpoint(str(path))["iteration"] == 1
    assert sorted(os.listdir(tmp_path)) == ["latest.pkl"]              # the temporary file is gone
