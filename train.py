"""Train CCNet: poly-LR SGD, periodic validation, resumable checkpoints, multi-process via MPI.

    python train.py --dataset demo                                   # built-in demo set, CPU, minutes
    python train.py --dataset ade20k --data-root data/ADEChallengeData2016 \
        --backbone resnet101 --pretrained resnet101-imagenet.pth      # the ADE20K recipe
    mpirun -np 4 python train.py ...                                 # 4 processes share each batch
    python train.py --resume work_dirs/ade20k_resnet101_r2           # continue where it stopped

Defaults are the ADE20K recipe (mmsegmentation, DESIGN.md section 5): SGD momentum 0.9, lr 0.01,
weight decay 5e-4, poly power 0.9 down to 1e-4, 80k iterations, batch 16, crop 512, auxiliary
loss weight 0.4. ``--dataset demo`` switches to a small preset; flags given explicitly always win.

Reproducibility: batch t of the run is a pure function of (seed, t) - which samples (per-epoch
permutations) and the augmentation randomness of each sample (a seed per (t, slot)) - and the
dropout seed of step t is too. So a resumed run replays exactly what an uninterrupted run does,
data-loader workers cannot reorder anything, and N MPI ranks together see the same global batch
as one process.
"""
import argparse
import ast
import math
import multiprocessing
import os
import random
import signal
import sys
import time
from collections import OrderedDict, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from utils import runtime

jt = runtime.activate()

from tqdm import tqdm  # noqa: E402

from utils import distributed as dist  # noqa: E402
from utils.logger import TrainLogger  # noqa: E402
from utils.lr import PolyLR  # noqa: E402

LATEST = "latest.pkl"
BEST = "best.pkl"

# The ADE20K recipe (DESIGN.md section 5); these are the flag defaults.
RECIPE = dict(
    dataset="ade20k", backbone="resnet101", recurrence=2, crop_size=512, batch_size=16, iters=80000,
    lr=0.01, momentum=0.9, weight_decay=5e-4, power=0.9, min_lr=1e-4, aux_weight=0.4,
    eval_interval=8000, save_interval=8000, log_interval=10, num_workers=4, dropout=0.1,
    eval_mode="whole", eval_crop=None, eval_stride=None, val_images=None, model_opts=None,
)

# Presets: values that replace the recipe defaults for a dataset (explicit flags still win).
PRESETS = {
    "cityscapes": dict(crop_size=769, batch_size=8, iters=60000, weight_decay=1e-4, min_lr=0.0,
                       eval_mode="slide", eval_crop=769, eval_stride=513, eval_interval=6000,
                       save_interval=6000),
    # Small enough to train on 2 CPU cores in minutes (1000 iterations). The demo's context classes
    # depend on markers 54-100 px away (datasets/demo.py). resnet10's receptive field does not
    # reach them, so only attention can (resnet18's dilated stages reach them in part, and the
    # plain head then leaves the attention unused); gamma starts at 1, not at the official 0,
    # because at gamma = 0 every attention weight starts with a zero gradient and 1000 steps do
    # not get it moving (measured: README, "Training").
    "demo": dict(backbone="resnet10", crop_size=128, batch_size=8, iters=1000, lr=0.02,
                 weight_decay=1e-4, min_lr=1e-4, eval_interval=100, save_interval=100,
                 log_interval=5, num_workers=1,
                 model_opts={"base_channels": 16, "head_channels": 64, "aux_channels": 64,
                             "cca_gamma_init": 1.0}),
    # Clips of 3 frames (datasets/demo_clips.py): the class of a grey object is the colour it had in
    # frame 0, so the temporal model (models/ccnet3d.py) must look along T. A batch is 4 clips.
    # resnet10 and gamma = 1 as in "demo": with resnet18 or gamma = 0 the attention stayed uniform.
    "demo_clips": dict(backbone="resnet10", crop_size=96, batch_size=4, iters=600, lr=0.02,
                       weight_decay=1e-4, min_lr=1e-4, eval_interval=100, save_interval=100,
                       log_interval=5, num_workers=1,
                       model_opts={"temporal": True, "base_channels": 16, "head_channels": 64,
                                   "aux_channels": 64, "cca_gamma_init": 1.0}),
}


# ----------------------------------------------------------------------------------- flags
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Train CCNet (criss-cross attention) for semantic segmentation.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Presets: --dataset demo uses " + _describe(PRESETS["demo"]) + "; --dataset cityscapes uses "
               + _describe(PRESETS["cityscapes"]) + ". Any flag given explicitly overrides a preset.")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=RECIPE["dataset"],
                   help="dataset name: ade20k, cityscapes, folder, demo, demo_clips (default: %(default)s)")
    g.add_argument("--data-root", default=None,
                   help="dataset folder (the demo set is generated into $CCNET_HOME/demo when omitted)")
    g.add_argument("--crop-size", type=int, default=None,
                   help=f"training crop, pixels (default: {RECIPE['crop_size']})")
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"global batch size, split over MPI processes (default: {RECIPE['batch_size']})")
    g.add_argument("--num-workers", type=int, default=None,
                   help=f"data-loading worker processes per rank, 0 = load in the main process "
                        f"(default: {RECIPE['num_workers']})")
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default=None,
                   help=f"backbone name, e.g. resnet18/50/101, van_b0..van_b3 (default: {RECIPE['backbone']})")
    g.add_argument("--recurrence", type=int, default=None,
                   help="R, times the criss-cross attention is applied; 0 = plain conv head (default: 2)")
    g.add_argument("--dropout", type=float, default=None,
                   help="Dropout2d probability in both heads (default: 0.1; 0 makes steps deterministic)")
    g.add_argument("--model-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="extra option for models.build_model, repeatable, VALUE a Python literal "
                        "(e.g. --model-opt base_channels=32 --model-opt head_act='relu')")
    g.add_argument("--pretrained", default=None,
                   help="ImageNet backbone weights (file, URL or known name) loaded before training")
    g = p.add_argument_group("optimisation")
    g.add_argument("--iters", type=int, default=None, help=f"training iterations (default: {RECIPE['iters']})")
    g.add_argument("--lr", type=float, default=None, help=f"base learning rate (default: {RECIPE['lr']})")
    g.add_argument("--momentum", type=float, default=None, help=f"SGD momentum (default: {RECIPE['momentum']})")
    g.add_argument("--weight-decay", type=float, default=None,
                   help=f"SGD weight decay (default: {RECIPE['weight_decay']})")
    g.add_argument("--power", type=float, default=None, help=f"poly LR power (default: {RECIPE['power']})")
    g.add_argument("--min-lr", type=float, default=None,
                   help=f"poly LR floor reached at the last iteration (default: {RECIPE['min_lr']})")
    g.add_argument("--aux-weight", type=float, default=None,
                   help=f"weight of the auxiliary (dsn) loss (default: {RECIPE['aux_weight']})")
    g.add_argument("--ohem", action="store_true",
                   help="online hard example mining on the main loss (threshold 0.7, min kept 100000)")
    g.add_argument("--ccl", action="store_true",
                   help="add the category consistent loss of the TPAMI paper (projects the RCCA output to 16 dims)")
    g.add_argument("--amp", action="store_true", help="automatic mixed precision (CUDA only)")
    g.add_argument("--seed", type=int, default=0, help="random seed: data order, augmentation, init, dropout "
                                                      "(default: %(default)s)")
    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--work-dir", default=None,
                   help="where log.jsonl, curves.png and checkpoints go (default: work_dirs/<dataset>_<backbone>_r<R>)")
    g.add_argument("--eval-interval", type=int, default=None,
                   help=f"validate every N iterations and at the end, 0 = only at the end "
                        f"(default: {RECIPE['eval_interval']})")
    g.add_argument("--eval-mode", choices=("whole", "slide"), default=None,
                   help="validation inference: whole image or sliding window (default: whole)")
    g.add_argument("--eval-crop", type=int, default=None, help="sliding-window tile size")
    g.add_argument("--eval-stride", type=int, default=None, help="sliding-window stride")
    g.add_argument("--val-images", type=int, default=None,
                   help="validate on the first N images only (quick checks; default: all)")
    g.add_argument("--save-interval", type=int, default=None,
                   help=f"write the 'latest' checkpoint every N iterations (default: {RECIPE['save_interval']})")
    g.add_argument("--log-interval", type=int, default=None,
                   help=f"log the mean loss every N iterations (default: {RECIPE['log_interval']})")
    g.add_argument("--stop-at", type=int, default=None, metavar="ITER",
                   help="stop after this iteration with a resumable checkpoint, e.g. to split a long run "
                        "into jobs (the LR schedule still follows --iters)")
    g.add_argument("--resume", default=None, metavar="CHECKPOINT_OR_WORK_DIR",
                   help="continue a run: a checkpoint file, or a work dir (uses its latest.pkl)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in batch jobs)")
    args = p.parse_args(argv)
    if args.resume:
        inherit_from_checkpoint(args, p, argv)
    return resolve_defaults(args, p)


# Flags that describe this invocation, not the run: never taken from a checkpoint.
NOT_INHERITED = {"resume", "stop_at", "no_progress", "model_opt", "pretrained"}


def _explicit_flags(parser, argv):
    """Destinations the user set on the command line (parse again with every default suppressed)."""
    defaults = {action.dest: action.default for action in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for action in parser._actions:
            action.default = defaults[action.dest]


def resume_path(source):
    return os.path.join(source, LATEST) if os.path.isdir(source) else source


def inherit_from_checkpoint(args, parser, argv):
    """``--resume``: flags not given explicitly take the checkpoint's values (same run, same
    schedule, same data order); the work dir defaults to the checkpoint's folder."""
    from utils.checkpoint import read_checkpoint
    path = resume_path(args.resume)
    if not os.path.isfile(path):
        parser.error(f"--resume {args.resume}: no checkpoint at {path}")
    state = read_checkpoint(path)
    if not isinstance(state, dict) or "iteration" not in state or "optimizer" not in state:
        parser.error(f"--resume {path}: not a training checkpoint of train.py (no iteration / optimizer "
                     f"state); to start from weights, use --pretrained for a backbone")
    args._resume_state = state
    saved = dict((state.get("meta") or {}).get("args") or {})
    explicit = _explicit_flags(parser, argv)
    for key, value in saved.items():
        if key not in explicit and key not in NOT_INHERITED and hasattr(args, key):
            setattr(args, key, value)
    if "model_opt" not in explicit and isinstance(saved.get("model_opts"), dict):
        args._inherited_model_opts = saved["model_opts"]
    if "work_dir" not in explicit:
        args.work_dir = os.path.dirname(os.path.abspath(path))


def _describe(preset):
    return ", ".join(f"{k.replace('_', '-')} {v}" for k, v in preset.items() if k != "model_opts") + \
        ("".join(f", model-opt {k}={v}" for k, v in (preset.get("model_opts") or {}).items()))


def resolve_defaults(args, parser=None):
    """Fill flags left unset: explicit flag > dataset preset > ADE20K recipe."""
    preset = PRESETS.get(args.dataset, {})
    for key, value in RECIPE.items():
        if key in ("dataset", "model_opts"):
            continue
        if getattr(args, key, None) is None:
            setattr(args, key, preset.get(key, value))
    opts = dict(getattr(args, "_inherited_model_opts", None) or preset.get("model_opts") or {})
    for item in args.model_opt:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            _fail(parser, f"--model-opt expects KEY=VALUE, got {item!r}")
        try:
            opts[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            opts[key] = text                    # a bare word is a string
    args.model_opts = opts
    checks = [("--iters", args.iters >= 1), ("--batch-size", args.batch_size >= 1),
              ("--crop-size", args.crop_size >= 8), ("--lr", args.lr > 0),
              ("--num-workers", args.num_workers >= 0), ("--recurrence", args.recurrence >= 0),
              ("--eval-interval", args.eval_interval >= 0), ("--save-interval", args.save_interval >= 0),
              ("--log-interval", args.log_interval >= 1), ("--min-lr", 0 <= args.min_lr <= args.lr),
              ("--dropout", 0 <= args.dropout < 1)]
    for flag, ok in checks:
        if not ok:
            _fail(parser, f"invalid value for {flag}: {getattr(args, flag[2:].replace('-', '_'))}")
    if args.work_dir is None:
        args.work_dir = os.path.join("work_dirs", f"{args.dataset}_{args.backbone}_r{args.recurrence}")
    return args


def _fail(parser, message):
    if parser is not None:
        parser.error(message)
    raise SystemExit(message)


# ----------------------------------------------------------------------------------- data
def _sample_seed(seed, iteration, slot):
    """Seed of the augmentation of sample ``slot`` of global batch ``iteration``."""
    return int(np.random.SeedSequence([seed, iteration, slot]).generate_state(1)[0])


def _load_sample(dataset, index, sample_seed):
    """dataset[index] with its randomness fixed by ``sample_seed`` (whatever RNG it draws from)."""
    # The datasets draw their augmentation generator from NumPy's global RNG (python's `random`
    # too, for any transform that uses it), so seeding both here fixes the sample.
    random.seed(sample_seed)
    np.random.seed(sample_seed % (2 ** 32))
    image, label = dataset[index]
    return np.asarray(image, dtype=np.float32), np.asarray(label, dtype=np.int32)


_WORKER_DATASET = None


def _worker_init(dataset):
    global _WORKER_DATASET
    _WORKER_DATASET = dataset
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the main process's business
    os.environ["OMP_NUM_THREADS"] = "1"


def _worker_load(index, sample_seed):
    return _load_sample(_WORKER_DATASET, index, sample_seed)


class BatchStream:
    """Global batch ``t`` = samples ``t*B .. t*B+B-1`` of an endless stream made of per-epoch
    permutations (epoch e shuffled by ``default_rng([seed, e])``); this rank loads its shard.

    Stateless in ``t``: resuming at iteration t needs only t. Workers load samples ahead
    (``prefetch`` batches) through a process pool; ``next_batch`` reports how long the main
    process had to wait for data.
    """

    def __init__(self, dataset, batch_size, seed, shard, num_workers=0, prefetch=2):
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shard = shard
        # Jittor's len(dataset) counts batches; the samples are what we shuffle.
        self.size = int(getattr(dataset, "num_samples", None) or len(dataset.samples))
        if self.size == 0:
            raise ValueError(f"the training set {type(dataset).__name__} is empty")
        self._perms = {}
        self._pool = None
        self._pending = deque()
        self._next_to_submit = None
        self.prefetch = max(1, prefetch)
        if num_workers > 0:
            # An executor, not multiprocessing.Pool: when a worker is killed (pkill, a scheduler's
            # SIGTERM to the whole job, the OOM killer) the executor reports it, where
            # Pool.terminate() would wait forever on a queue lock the dead worker held.
            self._pool = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("fork"),
                                             initializer=_worker_init, initargs=(dataset,))

    def _permutation(self, epoch):
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        return self._perms[epoch]

    def indices(self, iteration):
        """(dataset index, augmentation seed) of each sample of this rank's shard of batch t."""
        out = []
        for slot in range(*self.shard):
            position = iteration * self.batch_size + slot
            epoch, offset = divmod(position, self.size)
            out.append((int(self._permutation(epoch)[offset]), _sample_seed(self.seed, iteration, slot)))
        return out

    def _submit(self, iteration):
        tasks = self.indices(iteration)
        if self._pool is None:
            self._pending.append((iteration, tasks))
        else:
            self._pending.append((iteration, [self._pool.submit(_worker_load, *t) for t in tasks]))

    def next_batch(self, iteration):
        """(images [b,3,h,w] float32, labels [b,h,w] int32, seconds waited) for iteration t."""
        try:
            return self._next_batch(iteration)
        except BrokenProcessPool as err:
            raise RuntimeError("a data-loading worker died (killed by a signal or out of memory); "
                               "--num-workers 0 loads in the main process and shows any error") from err

    def _next_batch(self, iteration):
        if self._next_to_submit is None or not self._pending or self._pending[0][0] != iteration:
            self._pending.clear()              # first call, or a jump: start prefetching at t
            self._next_to_submit = iteration
        while self._next_to_submit < iteration + self.prefetch:
            self._submit(self._next_to_submit)
            self._next_to_submit += 1
        start = time.perf_counter()
        _, items = self._pending.popleft()
        if self._pool is None:
            samples = [_load_sample(self.dataset, index, s) for index, s in items]
        else:
            samples = [item.result() for item in items]
        images = np.stack([s[0] for s in samples])
        labels = np.stack([s[1] for s in samples])
        waited = time.perf_counter() - start
        return images, labels, waited

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


# ----------------------------------------------------------------------------------- step
def sgd_step(optimizer, loss):
    """Gradients of ``loss`` and the SGD update, executed; then the gradients are dropped.

    Jittor's optimizer keeps them in ``param_groups[i]["grads"]`` until the next step, so the
    next forward pass would run with a parameter-sized buffer that nothing reads again (PyTorch's
    ``zero_grad(set_to_none=True)`` frees the same). The next ``step`` creates them afresh."""
    optimizer.step(loss)
    jt.sync_all(True)
    for group in optimizer.param_groups:
        group.pop("grads", None)


# ----------------------------------------------------------------------------------- state
def optimizer_state(optimizer, names):
    """Momentum buffers by parameter name (Jittor's own optimizer.state_dict() omits them)."""
    buffers = {}
    for group in optimizer.param_groups:
        for param, value in zip(group["params"], group["values"]):
            buffers[names[id(param)]] = value.numpy().copy()
    return {"momentum_buffers": buffers, "n_step": optimizer.n_step}


def load_optimizer_state(optimizer, names, state, source):
    buffers = state.get("momentum_buffers") if isinstance(state, dict) else None
    if buffers is None:
        raise ValueError(f"{source}: checkpoint has no optimizer momentum buffers; cannot resume exactly")
    for group in optimizer.param_groups:
        for param, value in zip(group["params"], group["values"]):
            name = names[id(param)]
            if name not in buffers:
                raise ValueError(f"{source}: optimizer state lacks the momentum buffer of {name}")
            array = np.asarray(buffers[name].numpy() if isinstance(buffers[name], jt.Var) else buffers[name])
            if tuple(array.shape) != tuple(value.shape):
                raise ValueError(f"{source}: momentum buffer of {name} has shape {tuple(array.shape)}, "
                                 f"the model needs {tuple(value.shape)}")
            value.update(jt.array(array.astype(np.float32)))
            value.sync()
    optimizer.n_step = int(state.get("n_step", 0))


def rng_state():
    return {"numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state):
    if not state:
        return
    if "numpy" in state:
        np.random.set_state(tuple(state["numpy"]))
    if "python" in state:
        python = state["python"]
        random.setstate((python[0], tuple(python[1]), python[2]))


# ----------------------------------------------------------------------------------- training
class Trainer:
    """Wires dataset, model, loss, optimiser, schedule, logging and checkpoints for one run."""

    def __init__(self, args):
        self.args = args
        self.main = dist.is_main()
        self.stop_requested = False
        self.best_miou = -1.0
        self.start_iter = 0
        self._check_device()
        self._build_data()
        self._build_model()
        self.logger = TrainLogger(args.work_dir, enabled=self.main)
        if args.resume:
            self._resume(args.resume)
        else:
            self.logger.start_fresh()
            self.logger.log({"type": "config", "iter": 0, **_config_record(args)})

    # -- set-up ------------------------------------------------------------------------
    def _check_device(self):
        args = self.args
        if args.amp:
            if not jt.flags.use_cuda:
                raise SystemExit("--amp needs CUDA: Jittor's mixed precision on CPU falls off oneDNN "
                                 "(~1000x slower convolutions). Run without --amp on CPU.")
            jt.flags.auto_mixed_precision_level = 4      # fp16 where safe, sums/exp in fp32
        self.shard = dist.shard_bounds(args.batch_size)

    def _build_data(self):
        import datasets
        args = self.args
        self.train_set = datasets.build_dataset(args.dataset, data_root=args.data_root, split="train",
                                                mode="train", crop_size=args.crop_size)
        self.val_set = datasets.build_dataset(args.dataset, data_root=args.data_root, split="val",
                                              mode="test", crop_size=args.crop_size)
        self.num_classes = int(self.train_set.num_classes)
        self.batches = BatchStream(self.train_set, args.batch_size, args.seed, self.shard,
                                   num_workers=args.num_workers, prefetch=2)

    def _build_model(self):
        import models
        from models.losses import SegLoss
        args = self.args
        # Identical initial weights on all ranks: same seed everywhere, then rank 0's values.
        jt.set_global_seed(args.seed, different_seed_for_mpi=False)
        opts = dict(args.model_opts)
        opts.setdefault("dropout", args.dropout)
        if args.ccl:
            opts.setdefault("ccl_dim", 16)
        self.arch = dict(backbone=args.backbone, num_classes=self.num_classes, recurrence=args.recurrence, **opts)
        self.model = models.build_model(args.backbone, self.num_classes, recurrence=args.recurrence, **opts)
        # Jittor initialises weights lazily: without this sync the random init would run inside
        # the first training step, after that step's jt.set_seed, i.e. from another seed.
        jt.sync(list(self.model.state_dict().values()))
        if args.pretrained and not args.resume:       # resuming: the checkpoint has the weights
            from utils.checkpoint import load_backbone_weights
            from utils.checkpoint import CheckpointError
            source = args.pretrained
            looks_like_file = os.sep in source or source.endswith((".pth", ".pt", ".pkl", ".bin", ".tar"))
            if "://" not in source and looks_like_file and not os.path.isfile(source):
                raise SystemExit(f"--pretrained {source}: no such file")
            try:
                load_backbone_weights(self.model, source, log=print if self.main else _quiet)
            except (CheckpointError, FileNotFoundError) as err:
                raise SystemExit(f"--pretrained {source} cannot be loaded into the {args.backbone} "
                                 f"backbone: {err}") from None
        dist.broadcast_module(self.model)
        self.model.train()
        # SegLoss adds the category consistent terms when the model returns CCL features (ccl_dim).
        self.criterion = SegLoss(self.num_classes, ignore_index=getattr(self.train_set, "ignore_index", 255),
                                 aux_weight=args.aux_weight, ohem=args.ohem)
        params = self.model.parameters()
        self.param_names = {id(p): n for n, p in self.model.named_parameters()}
        self.optimizer = jt.optim.SGD(params, lr=args.lr, momentum=args.momentum,
                                      weight_decay=args.weight_decay)
        self.scheduler = PolyLR(self.optimizer, args.lr, args.iters, power=args.power, min_lr=args.min_lr)

    # -- checkpoints -------------------------------------------------------------------
    def state(self, iteration):
        return {
            "state_dict": {k: v.numpy() for k, v in self.model.state_dict().items()},
            "optimizer": optimizer_state(self.optimizer, self.param_names),
            "iteration": iteration,
            "best_mIoU": self.best_miou,
            "rng": rng_state(),
            "seed": self.args.seed,
            "meta": {"dataset": self.args.dataset, "backbone": self.args.backbone,
                     "recurrence": self.args.recurrence, "num_classes": self.num_classes,
                     "classes": list(getattr(self.train_set, "CLASSES", ())), "args": _config_record(self.args)},
        }

    def save(self, name, iteration):
        """Write a checkpoint atomically (rank 0 only); returns its path."""
        from utils.checkpoint import save_checkpoint
        path = os.path.join(self.args.work_dir, name)
        if self.main:
            save_checkpoint(path, self.state(iteration), arch=self.arch)
        return path

    def _resume(self, source):
        from utils.checkpoint import CheckpointError, Prepared, load_checkpoint, read_checkpoint
        path = resume_path(source)
        state = getattr(self.args, "_resume_state", None) or read_checkpoint(path)
        try:                                                              # checks keys, shapes
            load_checkpoint(self.model, Prepared(path, raw=state), log=print if self.main else _quiet)
        except CheckpointError as err:
            raise SystemExit(f"--resume {path} does not fit the model built from the flags "
                             f"(--backbone {self.args.backbone} --recurrence {self.args.recurrence}, "
                             f"{self.num_classes} classes): {err}") from None
        load_optimizer_state(self.optimizer, self.param_names, state.get("optimizer"), path)
        if int(state.get("seed", self.args.seed)) != self.args.seed:
            print(f"note: the checkpoint was trained with --seed {state['seed']}; continuing with that seed",
                  file=sys.stderr)
            self.args.seed = int(state["seed"])
            self.batches.seed = self.args.seed
        set_rng_state(state.get("rng"))
        self.args._resume_state = None                     # the weights are in the model now
        self.start_iter = int(state["iteration"])
        self.best_miou = float(state.get("best_mIoU", -1.0))
        if self.start_iter > self.args.iters:
            raise SystemExit(f"--resume {path}: the checkpoint is at iteration {self.start_iter}, "
                             f"beyond --iters {self.args.iters}")
        dist.broadcast_module(self.model)
        self.logger.resume(self.start_iter)
        self.logger.log({"type": "event", "iter": self.start_iter, "event": "resume", "from": path})
        if self.main:
            print(f"resumed from {path} at iteration {self.start_iter}", file=sys.stderr)

    # -- loop --------------------------------------------------------------------------
    def _request_stop(self, signum, frame):
        if self.stop_requested:                       # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.stop_requested = True
        if self.main:
            print("\ninterrupt: finishing this iteration, then writing a resumable checkpoint "
                  "(Ctrl-C again to abort without saving)", file=sys.stderr)

    def train_step(self, iteration):
        """One SGD step on global batch ``iteration``; returns (loss terms, wait s, step s)."""
        images, labels, waited = self.batches.next_batch(iteration)
        start = time.perf_counter()
        lr = self.scheduler.step(iteration)
        # Dropout randomness of step t depends on (seed, t) only, so resuming replays it.
        jt.set_seed(_sample_seed(self.args.seed, iteration, -1 % (2 ** 31)))
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

    def evaluate(self, iteration):
        from utils.evaluation import evaluate
        args = self.args
        indices = range(min(args.val_images, len(self.val_set.samples))) if args.val_images else None
        result = evaluate(self.model, self.val_set, mode=args.eval_mode, crop_size=args.eval_crop,
                          stride=args.eval_stride, progress=False, indices=indices)
        self.model.train()
        miou = float(result["mIoU"])
        record = {"type": "val", "iter": iteration, "mIoU": miou, "mAcc": float(result["mAcc"]),
                  "aAcc": float(result["aAcc"]), "IoU": [float(x) for x in result["IoU"]]}
        self.logger.log(record)
        self.logger.plot()
        if miou > self.best_miou:
            self.best_miou = miou
            self.save(BEST, iteration)
        return record

    def run(self):
        args = self.args
        # Ctrl-C, and SIGTERM from a job scheduler or mpirun: finish the step, save, exit.
        previous_handlers = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(total=args.iters, initial=self.start_iter, desc="train", unit="it", dynamic_ncols=True,
                   disable=not self.main or args.no_progress)
        window, totals = [], {"wait": 0.0, "step": 0.0}
        iteration = self.start_iter
        last_val = None
        try:
            stop_at = args.iters if args.stop_at is None else min(args.stop_at, args.iters)
            while iteration < args.iters:
                if iteration >= stop_at:
                    return self._interrupted(iteration, reason="--stop-at")
                if dist.any_rank(self.stop_requested):      # all ranks stop at the same step
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
                if iteration % args.log_interval == 0 or iteration == args.iters:
                    self._log_window(iteration, window)
                    window = []
                if args.save_interval and iteration % args.save_interval == 0 and iteration < args.iters:
                    self.save(LATEST, iteration)
                if (args.eval_interval and iteration % args.eval_interval == 0) or iteration == args.iters:
                    last_val = self.evaluate(iteration)
                    bar.write(f"iter {iteration}: val mIoU {100 * last_val['mIoU']:.2f}") if self.main else None
            self.save(LATEST, iteration)
            share = totals["wait"] / max(1e-9, totals["wait"] + totals["step"])
            self.logger.log({"type": "event", "iter": iteration, "event": "done",
                             "data_wait_share": share, "best_mIoU": self.best_miou})
            if self.main:
                print(f"done: {iteration} iterations, best val mIoU {100 * self.best_miou:.2f}, "
                      f"data wait {100 * share:.1f}% of step time; work dir {args.work_dir}", file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            return self._interrupted(iteration, hard=True)
        finally:
            bar.close()
            self.batches.close()
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)

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

    def _interrupted(self, iteration, reason="interrupt", hard=False):
        if hard:
            # A second Ctrl-C landed somewhere inside a step: the weights may already hold this
            # step's update while the counter does not, so nothing is saved.
            if self.main:
                print(f"\naborted during iteration {iteration + 1}; nothing saved. The last checkpoint "
                      f"is {os.path.join(self.args.work_dir, LATEST)} (if one was written).", file=sys.stderr)
            return 130
        path = self.save(LATEST, iteration)
        self.logger.log({"type": "event", "iter": iteration, "event": "stopped", "reason": reason})
        if self.main:
            print(f"stopped ({reason}) after iteration {iteration}; resumable checkpoint: {path}\n"
                  f"continue with: python train.py --resume {self.args.work_dir} (and the same flags)",
                  file=sys.stderr)
        return 0 if reason == "--stop-at" else 130

    def _diverged(self, iteration, record):
        name = f"debug_nonfinite_iter{iteration}.pkl"
        path = self.save(name, iteration)
        self.logger.log({"type": "event", "iter": iteration, "event": "nonfinite_loss",
                         "loss": record["loss"], "batch": [i for i, _ in self.batches.indices(iteration)]})
        if self.main:
            print(f"error: the loss became {record['loss']} at iteration {iteration} (lr {record['lr']:.3g}); "
                  f"training stopped. The weights before this step are in {path} "
                  f"(the batch's sample indices are in {self.logger.path}). Try a lower --lr.", file=sys.stderr)
        return 3


def _quiet(*args, **kwargs):
    """A log function for the ranks that do not print."""


def _config_record(args):
    return {k: v for k, v in vars(args).items() if k != "model_opt" and not k.startswith("_")}


def main(argv=None):
    args = parse_args(argv)
    trainer = Trainer(args)
    return trainer.run()


if __name__ == "__main__":
    sys.exit(main())
