"""The training loop: ``Trainer(config, resumed).run()`` wires dataset, model, loss, optimiser,
schedule, logging and checkpoints for one run described by a ``RunConfig``.

Reproducibility: batch t is a pure function of (seed, t) (datasets/stream.py) and so is the
dropout seed of step t, so a resumed run replays exactly what an uninterrupted run does, and N MPI
ranks together see the same global batch as one process.
"""
import math
import os
import signal
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import jittor as jt
from tqdm import tqdm

import datasets
from datasets.stream import BatchStream, sample_seed
from models.losses import SegLoss
from utils import distributed as dist, supervisor
from utils.checkpoint import (Checkpoint, CheckpointError, build_model_from_checkpoint, load_backbone_weights,
                              save_checkpoint)
from utils.evaluation import EvaluationStopped, evaluate
from utils.logger import CURVES_NAME, LOG_NAME, TrainLogger
from utils.lr import PolyLR
from utils.outputs import temp_files
from utils.threads import set_cpu_threads

from .config import RunConfig
from .state import load_optimizer_state, optimizer_state, rng_state, set_rng_state
from .step import sgd_step

LATEST = "latest.pkl"
BEST = "best.pkl"
DEBUG = "debug_nonfinite_iter{}.pkl"        # the checkpoint of a step whose loss was not finite
RUN_FILES = (LOG_NAME, CURVES_NAME, LATEST, BEST, DEBUG.format("*"))   # what a run writes into its work dir


def run_files(work_dir: str | os.PathLike) -> list[Path]:
    """The files of a run (this program's names only) present in ``work_dir``, with temporary
    files a killed run left behind."""
    work_dir = Path(work_dir)
    found = sorted(p for pattern in RUN_FILES for p in work_dir.glob(pattern) if p.is_file())
    return found + temp_files(work_dir, RUN_FILES)


def resume_path(source: str) -> str:
    """The checkpoint ``--resume`` means: a file, or a work dir's latest checkpoint."""
    return os.path.join(source, LATEST) if os.path.isdir(source) else source


def open_resume(source: str) -> Checkpoint:
    """The training checkpoint to continue (read once); a ValueError saying why it cannot be."""
    path = resume_path(source)
    if not os.path.isfile(path):
        raise ValueError(f"--resume {source}: no checkpoint at {path}")
    try:
        checkpoint = Checkpoint(path)
    except CheckpointError as err:
        raise ValueError(f"--resume {path}: {err}") from None
    if not isinstance(checkpoint.raw, dict) or "iteration" not in checkpoint.raw or "optimizer" not in checkpoint.raw:
        raise ValueError(f"--resume {path}: not a training checkpoint of train.py (no iteration / optimizer "
                         f"state); to start from weights, use --pretrained for a backbone")
    return checkpoint


class Trainer:
    """Wires dataset, model, loss, optimiser, schedule, logging and checkpoints for one run."""

    def __init__(self, config: RunConfig, resumed: Checkpoint | None = None) -> None:
        self.config = config
        self.resumed = open_resume(config.resume) if config.resume and resumed is None else resumed
        self.main = dist.is_main()
        self.stop_requested = None         # the signal that asked this run to stop
        self.pending_eval = None           # iteration whose validation a stop interrupted
        self.last_saved = None             # (path, iteration) of the newest resumable checkpoint
        self.resumed_from = None           # (path, iteration) of the checkpoint this run continues
        self.best_miou = -1.0
        self.start_iter = 0
        # Ctrl-C, and SIGTERM from a job scheduler or mpirun: finish the step, save, exit. Processes
        # forked from now on inherit the handler (see _request_stop).
        self.main_pid = os.getpid()
        self._previous_handlers = {sig: signal.signal(sig, self._request_stop) for sig in supervisor.STOP_SIGNALS}
        try:
            self._claim_work_dir()
            set_cpu_threads(config.threads)
            self._check_device()
            self._build_data()
            self._build_model()
            self.logger = TrainLogger(config.work_dir, enabled=self.main)
            if self.resumed is not None:
                self._resume()
            else:
                self.logger.start_fresh()
                self.logger.log({"type": "config", "iter": 0, **config.record()})
        except BaseException:
            self._restore_handlers()
            raise

    # -- set-up ------------------------------------------------------------------------
    def _claim_work_dir(self):
        """The work dir holds one run: a fresh run (or a resumed one writing somewhere else than
        its checkpoint's folder) does not mix its log and checkpoints with another run's files
        there, unless ``--overwrite`` says to remove them first. Files of other names are kept."""
        config = self.config
        work_dir = Path(config.work_dir)
        if work_dir.exists() and not work_dir.is_dir():
            raise SystemExit(f"train.py: error: --work-dir {work_dir} is a file, not a folder")
        continuing = self.resumed is not None and Path(self.resumed.path).resolve().parent == work_dir.resolve()
        previous = [] if continuing else run_files(work_dir)
        # rank 0 decides for all: the others must not see the files it starts writing
        if dist.broadcast_int(int(bool(previous) and not config.overwrite)):
            names = ", ".join(p.name for p in previous) or "found by rank 0"
            raise SystemExit(f"train.py: error: --work-dir {work_dir} holds another run ({names}); continue it "
                             f"with --resume {work_dir}, pass --overwrite to remove that run's files first (no "
                             f"others), or choose another --work-dir")
        if previous and self.main:
            for path in previous:
                path.unlink()
            print(f"--overwrite: removed the earlier run's {', '.join(p.name for p in previous)} from {work_dir}",
                  file=sys.stderr)

    def _check_device(self):
        config = self.config
        if config.amp:
            if not jt.flags.use_cuda:
                raise SystemExit("--amp needs CUDA: Jittor's mixed precision on CPU falls off oneDNN "
                                 "(orders of magnitude slower convolutions). Run without --amp on CPU.")
            jt.flags.auto_mixed_precision_level = 4      # fp16 where safe, sums/exp in fp32
        self.shard = dist.shard_bounds(config.batch_size)

    def _build_data(self):
        config = self.config
        try:
            self.train_set = datasets.build_dataset(config.dataset, data_root=config.data_root, split="train",
                                                    mode="train", crop_size=config.crop_size)
            self.val_set = datasets.build_dataset(config.dataset, data_root=config.data_root, split="val",
                                                  mode="test", crop_size=config.crop_size)
        except (datasets.DatasetError, FileNotFoundError, NotADirectoryError) as err:
            raise SystemExit(f"train.py: error: {str(err).strip()}") from None
        self.num_classes = int(self.train_set.num_classes)
        self.batches = BatchStream(self.train_set, config.batch_size, config.seed, self.shard,
                                   num_workers=config.num_workers, prefetch=2)

    def _build_model(self):
        config = self.config
        # Identical initial weights on all ranks: same seed everywhere, then rank 0's values.
        jt.set_global_seed(config.seed, different_seed_for_mpi=False)
        self.model = self._fresh_model() if self.resumed is None else self._resumed_model()
        dist.broadcast_module(self.model)
        self.model.train()
        # SegLoss adds the category consistent terms when the model returns CCL features (ccl_dim).
        self.criterion = SegLoss(self.num_classes, ignore_index=getattr(self.train_set, "ignore_index", 255),
                                 aux_weight=config.aux_weight, ohem=config.ohem)
        params = self.model.parameters()
        self.param_names = {id(p): n for n, p in self.model.named_parameters()}
        self.optimizer = jt.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                      weight_decay=config.weight_decay)
        self.scheduler = PolyLR(self.optimizer, config.lr, config.iters, power=config.power, min_lr=config.min_lr)

    def _fresh_model(self):
        """The run's model; with ``--pretrained``, its backbone weights loaded."""
        pretrained = self._open_pretrained()
        model = self.config.model_config(self.num_classes, pretrained and pretrained.options).build()
        # Jittor initialises weights lazily: without this sync the random init would run inside
        # the first training step, after that step's jt.set_seed, i.e. from another seed.
        jt.sync(list(model.state_dict().values()))
        if pretrained is not None:
            try:
                load_backbone_weights(model, pretrained, log=self.log)
            except CheckpointError as err:
                raise SystemExit(f"--pretrained {self.config.pretrained} cannot be loaded into the "
                                 f"{self.config.backbone} backbone: {err}") from None
        return model

    def _resumed_model(self):
        """The resumed run's model with its weights (keys and shapes checked)."""
        config = self.config
        try:
            return build_model_from_checkpoint(self.resumed, config=config.model_config(self.num_classes),
                                               log=self.log)
        except CheckpointError as err:
            raise SystemExit(f"--resume {self.resumed.path} does not fit the model of this run "
                             f"(--backbone {config.backbone} --recurrence {config.recurrence}, "
                             f"{self.num_classes} classes): {err}") from None

    def _open_pretrained(self):
        """The ``--pretrained`` checkpoint (read before the model is built: its stem decides the
        model's), or None."""
        source = self.config.pretrained
        if not source:
            return None
        looks_like_file = os.sep in source or source.endswith((".pth", ".pt", ".pkl", ".bin", ".tar"))
        if "://" not in source and looks_like_file and not os.path.isfile(source):
            raise SystemExit(f"--pretrained {source}: no such file")
        try:
            return Checkpoint(source)
        except CheckpointError as err:
            raise SystemExit(f"--pretrained {source} cannot be loaded into the {self.config.backbone} "
                             f"backbone: {err}") from None

    def log(self, line: str) -> None:
        """Progress lines of the checkpoint loaders: printed by rank 0 only."""
        if self.main:
            print(line)

    # -- checkpoints -------------------------------------------------------------------
    def state(self, iteration: int) -> dict[str, Any]:
        return {
            "state_dict": {k: v.numpy() for k, v in self.model.state_dict().items()},
            "optimizer": optimizer_state(self.optimizer, self.param_names),
            "iteration": iteration,
            "best_mIoU": self.best_miou,
            "rng": rng_state(),
            "seed": self.config.seed,
            "pending_eval": self.pending_eval,
            "meta": {"dataset": self.config.dataset, "backbone": self.config.backbone,
                     "recurrence": self.config.recurrence, "num_classes": self.num_classes,
                     "classes": list(getattr(self.train_set, "CLASSES", ())), "args": self.config.record()},
        }

    def save(self, name: str, iteration: int) -> str:
        """Write a checkpoint atomically (rank 0 only); returns its path."""
        path = os.path.join(self.config.work_dir, name)
        if self.main:
            save_checkpoint(path, self.state(iteration), config=self.model.config)
            if name in (LATEST, BEST) and (self.last_saved is None or iteration > self.last_saved[1] or name == LATEST):
                self.last_saved = (path, iteration)
                supervisor.report(if_killed=self._saved_line())
        return path

    def _saved_line(self):
        """What a stop right now leaves behind, for the one line printed when the run ends."""
        if self.last_saved is not None:
            path, iteration = self.last_saved
            return f"last checkpoint {path} (iteration {iteration}); continue with: python train.py --resume {path}"
        if self.resumed_from is not None:
            path, iteration = self.resumed_from
            return f"nothing saved since resuming {path} (iteration {iteration}), which is unchanged"
        return "nothing saved"

    def _resume(self):
        """Continue the resumed run: the model holds its weights already; here the optimizer,
        the RNGs, the iteration and the best mIoU so far."""
        state, path = self.resumed.raw, self.resumed.path
        load_optimizer_state(self.optimizer, self.param_names, state.get("optimizer"), path)
        set_rng_state(state.get("rng"))
        self.start_iter = int(state["iteration"])
        self.best_miou = float(state.get("best_mIoU", -1.0))
        self.pending_eval = state.get("pending_eval")
        self.resumed_from = (str(path), self.start_iter)
        if self.start_iter > self.config.iters:
            raise SystemExit(f"--resume {path}: the checkpoint is at iteration {self.start_iter}, "
                             f"beyond --iters {self.config.iters}")
        self.resumed = None                                 # its weights are in the model now
        self.logger.resume(self.start_iter)
        self.logger.log({"type": "event", "iter": self.start_iter, "event": "resume", "from": str(path)})
        if self.main:
            print(f"resumed from {path} at iteration {self.start_iter}", file=sys.stderr)

    # -- loop --------------------------------------------------------------------------
    def train_step(self, iteration: int) -> tuple[dict[str, float], float, float | None]:
        """One SGD step on global batch ``iteration``; returns (loss terms, wait s, step s)."""
        images, labels, waited = self.batches.next_batch(iteration)
        start = time.perf_counter()
        lr = self.scheduler.step(iteration)
        # Dropout randomness of step t depends on (seed, t) only, so resuming replays it.
        jt.set_seed(sample_seed(self.config.seed, iteration, -1 % (2 ** 31)))
        if not getattr(self.model, "temporal", False):
            images = images.reshape((-1,) + images.shape[-3:])  # clips for an image model: frames
        labels = labels.reshape((-1,) + labels.shape[-2:])      # clips: one label map per frame
        outputs = self.model(jt.array(images))
        loss, terms = self.criterion(outputs, jt.array(labels))
        # every term averaged over ranks in one collective: NaN anywhere -> NaN everywhere
        means = dict(zip(terms, dist.all_reduce_mean(list(terms.values()))))
        record = {"loss": means["loss"], "lr": lr, **means}
        if not math.isfinite(record["loss"]):
            return record, waited, None
        sgd_step(self.optimizer, loss)
        return record, waited, time.perf_counter() - start

    def evaluate(self, iteration: int) -> dict[str, Any]:
        config = self.config
        limit = config.eval_max_images
        indices = range(min(limit, len(self.val_set.samples))) if limit else None
        result = evaluate(self.model, self.val_set, mode=config.eval_mode, crop_size=config.eval_window,
                          stride=config.eval_stride, progress=False, indices=indices,
                          should_stop=lambda: self.stop_requested is not None)
        self.model.train()
        self.pending_eval = None
        miou = float(result["mIoU"])
        record = {"type": "val", "iter": iteration, "mIoU": miou, "mAcc": float(result["mAcc"]),
                  "aAcc": float(result["aAcc"]), "IoU": [float(x) for x in result["IoU"]]}
        self.logger.log(record)
        self.logger.plot()
        if miou > self.best_miou:
            self.best_miou = miou
            self.save(BEST, iteration)
        return record

    def run(self) -> int:
        """Train until ``--iters`` (or a stop); returns the exit status (0 done, 130 / 143 stopped
        by SIGINT / SIGTERM, 3 the loss diverged)."""
        config = self.config
        supervisor.report(stoppable=True, if_killed=self._saved_line(),
                          temporaries=[os.path.join(config.work_dir, f".{name}.*.tmp") for name in RUN_FILES])
        bar = tqdm(total=config.iters, initial=self.start_iter, desc="train", unit="it", dynamic_ncols=True,
                   disable=not self.main or config.no_progress)
        window, totals = [], {"wait": 0.0, "step": 0.0}
        iteration = self.start_iter
        try:
            stop_at = config.iters if config.stop_at is None else min(config.stop_at, config.iters)
            if self.pending_eval == iteration:               # the validation a stop interrupted
                self._validate(iteration, bar)
            while iteration < config.iters:
                if iteration >= stop_at:
                    return self._interrupted(iteration, reason="--stop-at")
                if dist.any_rank(self.stop_requested is not None):      # all ranks stop at the same step
                    return self._interrupted(iteration)
                record, waited, step_time = self.train_step(iteration)
                if step_time is None:
                    return self._diverged(iteration, record)
                iteration += 1
                totals["wait"] += waited
                totals["step"] += step_time
                window.append((record, waited, step_time))
                bar.update(1)
                share = totals["wait"] / max(1e-9, totals["wait"] + totals["step"])
                bar.set_postfix(OrderedDict(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                            data_wait=f"{100 * share:.1f}%"))
                if iteration % config.log_interval == 0 or iteration == config.iters:
                    self._log_window(iteration, window)
                    window = []
                if config.save_interval and iteration % config.save_interval == 0 and iteration < config.iters:
                    self.save(LATEST, iteration)
                if (config.eval_interval and iteration % config.eval_interval == 0) or iteration == config.iters:
                    self._validate(iteration, bar)
            if self.pending_eval is not None:                # stopped during the last validation
                return self._interrupted(iteration)
            self.save(LATEST, iteration)
            share = totals["wait"] / max(1e-9, totals["wait"] + totals["step"])
            self.logger.log({"type": "event", "iter": iteration, "event": "done",
                             "data_wait_share": share, "best_mIoU": self.best_miou})
            if self.main:
                print(f"done: {iteration} iterations, best val mIoU {100 * self.best_miou:.2f}, "
                      f"data wait {100 * share:.1f}% of step time; work dir {config.work_dir}", file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            return self._interrupted(iteration, hard=True)
        finally:
            bar.close()
            self.batches.close()
            self._restore_handlers()

    def _validate(self, iteration, bar):
        """Validate after ``iteration`` unless a stop interrupts it (then it is owed: saved as
        ``pending_eval`` and run first when the run is resumed)."""
        try:
            record = self.evaluate(iteration)
        except EvaluationStopped:
            self.pending_eval = iteration
            return
        if self.main:
            bar.write(f"iter {iteration}: val mIoU {100 * record['mIoU']:.2f}")

    def _log_window(self, iteration, window):
        count = len(window)
        record = {"type": "train", "iter": iteration}
        keys = [k for k in window[-1][0] if isinstance(window[-1][0][k], (int, float))]
        for key in keys:
            record[key] = sum(r[0].get(key, 0.0) for r in window) / count
        record["lr"] = window[-1][0]["lr"]
        record["data_time"] = sum(w for _, w, _ in window) / count
        record["step_time"] = sum(s for _, _, s in window) / count
        self.logger.log(record)

    # -- stopping: Ctrl-C / SIGTERM, --stop-at, a non-finite loss --------------------------
    def _restore_handlers(self):
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)

    def _request_stop(self, signum, frame):
        if os.getpid() != self.main_pid:
            # A process forked from this one (Jittor's compile pool): stopping is the main
            # process's business, but SIGTERM is how a pool ends its workers, quietly.
            if signum == signal.SIGTERM:
                os._exit(0)
            return
        if self.stop_requested is not None:          # a second signal (unsupervised): stop at once
            raise KeyboardInterrupt
        self.stop_requested = signum

    def _interrupted(self, iteration, reason=None, hard=False):
        """Stop before step ``iteration + 1``: save a resumable checkpoint, say so in one line."""
        name = signal.Signals(self.stop_requested or signal.SIGINT).name
        code = 0 if reason == "--stop-at" else supervisor.exit_status(self.stop_requested or signal.SIGINT)
        if hard:
            # A second signal landed inside a step: the weights may already hold this step's
            # update while the counter does not, so nothing is saved.
            if self.main:
                print(f"\n{name} again during iteration {iteration + 1}: stopped at once; {self._saved_line()}",
                      file=sys.stderr)
            return code
        reason = reason or name
        if iteration == self.start_iter and reason != "--stop-at":
            if self.main:
                print(f"stopped by {reason} before the first step finished; {self._saved_line()}", file=sys.stderr)
            return code
        path = self.save(LATEST, iteration)
        self.logger.log({"type": "event", "iter": iteration, "event": "stopped", "reason": reason})
        if self.main:
            print(f"stopped by {reason} after iteration {iteration}; resumable checkpoint {path}; continue with: "
                  f"python train.py --resume {self.config.work_dir}", file=sys.stderr)
        return code

    def _diverged(self, iteration, record):
        path = self.save(DEBUG.format(iteration), iteration)
        self.logger.log({"type": "event", "iter": iteration, "event": "nonfinite_loss",
                         "loss": record["loss"], "batch": [i for i, _ in self.batches.indices(iteration)]})
        if self.main:
            print(f"error: the loss became {record['loss']} at iteration {iteration} (lr {record['lr']:.3g}); "
                  f"training stopped. The weights before this step are in {path} "
                  f"(the batch's sample indices are in {self.logger.path}). Try a lower --lr.", file=sys.stderr)
        return 3
