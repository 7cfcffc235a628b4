"""Train CCNet: poly-LR SGD, periodic validation, resumable checkpoints, multi-process via MPI.

    python train.py --dataset demo                                   # built-in demo set, CPU, minutes
    python train.py --dataset ade20k --data-root data/ADEChallengeData2016 \
        --backbone resnet101 --pretrained resnet101-imagenet.pth      # the ADE20K recipe
    mpirun -np 4 python train.py ...                                 # 4 processes share each batch
    python train.py --resume work_dirs/ade20k_resnet101_r2           # continue where it stopped

This file reads the flags; ``training.RunConfig`` turns them (with the dataset's preset and a
resumed checkpoint) into the run's settings and ``training.Trainer`` runs it. Defaults are the
ADE20K recipe of mmsegmentation: SGD momentum 0.9, lr 0.01, weight decay 5e-4, poly power 0.9
down to 1e-4, 80k iterations, batch 16, crop 512, auxiliary loss weight 0.4.
"""
import argparse
import ast
import sys

if __name__ == "__main__":
    from utils.supervisor import supervise
    # before Jittor starts: training runs in a child, this process handles Ctrl-C / SIGTERM
    supervise(if_killed="nothing saved")

from utils import runtime  # noqa: E402

runtime.activate()

from training import PRESETS, RECIPE, RunConfig, Trainer, open_resume  # noqa: E402
from utils.checkpoint import Checkpoint  # noqa: E402
from utils.cli import add_renamed_flag  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """train.py's flags; every default is None (or False): ``RunConfig`` fills in the rest."""
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train CCNet (criss-cross attention) for semantic segmentation.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Presets: --dataset demo uses " + _describe(PRESETS["demo"]) + "; --dataset cityscapes uses "
               + _describe(PRESETS["cityscapes"]) + ". Any flag given explicitly overrides a preset.")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None,
                   help=f"dataset name: ade20k, cityscapes, folder, demo, demo_clips (default: {RECIPE['dataset']})")
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
    g.add_argument("--model-opt", action="append", default=None, metavar="KEY=VALUE",
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
    g.add_argument("--seed", type=int, default=None, help="random seed: data order, augmentation, init, "
                                                         f"dropout (default: {RECIPE['seed']})")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads; runs are bit-identical only with the same count (oneDNN splits some "
                        "gradient sums by thread). Default: OMP_NUM_THREADS, else every core; a resumed run "
                        "keeps its checkpoint's")
    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--work-dir", default=None,
                   help="where log.jsonl, curves.png and checkpoints go (default: work_dirs/<dataset>_<backbone>_r<R>)")
    g.add_argument("--eval-interval", type=int, default=None,
                   help=f"validate every N iterations and at the end, 0 = only at the end "
                        f"(default: {RECIPE['eval_interval']})")
    g.add_argument("--eval-mode", choices=("whole", "slide"), default=None,
                   help="validation inference: whole image or sliding window (test.py's --mode; default: whole)")
    g.add_argument("--eval-window", type=int, default=None, help="sliding-window size (test.py's --window)")
    add_renamed_flag(g, "--eval-crop", "--eval-window", type=int)
    g.add_argument("--eval-stride", type=int, default=None, help="sliding-window stride (test.py's --stride)")
    g.add_argument("--eval-max-images", type=int, default=None,
                   help="validate on the first N images only (test.py's --max-images; default: all)")
    add_renamed_flag(g, "--val-images", "--eval-max-images", type=int)
    g.add_argument("--save-interval", type=int, default=None,
                   help=f"write the 'latest' checkpoint every N iterations (default: {RECIPE['save_interval']})")
    g.add_argument("--log-interval", type=int, default=None,
                   help=f"log the mean loss every N iterations (default: {RECIPE['log_interval']})")
    g.add_argument("--stop-at", type=int, default=None, metavar="ITER",
                   help="stop after this iteration with a resumable checkpoint, e.g. to split a long run "
                        "into jobs (the LR schedule still follows --iters)")
    g.add_argument("--resume", default=None, metavar="CHECKPOINT_OR_WORK_DIR",
                   help="continue a run: a checkpoint file, or a work dir (uses its latest.pkl)")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in a --work-dir that holds another run: its log, curves and checkpoints "
                        "are removed first (default: stop and name them; other files are never touched)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in batch jobs)")
    return p


def _describe(preset: dict) -> str:
    return ", ".join(f"{k.replace('_', '-')} {v}" for k, v in preset.items() if k != "model_opts") + \
        ("".join(f", model-opt {k}={v}" for k, v in (preset.get("model_opts") or {}).items()))


def _model_opts(parser: argparse.ArgumentParser, items: list[str] | None) -> dict:
    """``--model-opt KEY=VALUE`` items as a dict; VALUE a Python literal, or else a bare string."""
    opts = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            parser.error(f"--model-opt expects KEY=VALUE, got {item!r}")
        try:
            opts[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            opts[key] = text
    return opts


def configure(argv: list[str] | None = None) -> tuple[RunConfig, Checkpoint | None]:
    """(RunConfig, the resumed checkpoint or None) from the command line; bad flags exit with a
    usage error naming them."""
    parser = build_parser()
    args = parser.parse_args(argv)
    flags = vars(args)
    # every flag defaults to None (a switch to False): what is set was given on the command line
    explicit = {name for name, value in flags.items() if value is not None and value is not False}
    explicit = {"model_opts" if name == "model_opt" else name for name in explicit}
    flags["model_opts"] = _model_opts(parser, flags.pop("model_opt"))
    try:
        resumed = open_resume(args.resume) if args.resume else None
        config = RunConfig.from_flags(flags, explicit, resumed)
    except ValueError as err:
        parser.error(str(err))
    if "seed" in explicit and args.seed != config.seed:
        print(f"note: the checkpoint was trained with --seed {config.seed}; continuing with that seed",
              file=sys.stderr)
    recorded_threads = ((resumed.raw.get("meta") or {}).get("args") or {}).get("threads") if resumed else None
    if recorded_threads and recorded_threads != config.threads:
        print(f"note: the checkpoint was trained with --threads {recorded_threads}, this run uses "
              f"{config.threads}: it will not repeat an uninterrupted run bit for bit", file=sys.stderr)
    return config, resumed


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """The RunConfig the command line describes."""
    return configure(argv)[0]


def main(argv: list[str] | None = None) -> int:
    config, resumed = configure(argv)
    try:
        trainer = Trainer(config, resumed)
    except KeyboardInterrupt:                     # a second Ctrl-C during set-up (unsupervised)
        print("stopped during set-up; nothing saved", file=sys.stderr)
        return 130
    return trainer.run()


if __name__ == "__main__":
    sys.exit(main())
