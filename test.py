"""Evaluate a CCNet checkpoint on a dataset split: per-class IoU / Acc, mIoU, mAcc, aAcc.

Examples::

    python test.py --checkpoint work_dirs/demo/best.pkl --dataset demo
    python test.py --checkpoint work_dirs/demo_clips/best.pkl --dataset demo_clips   # clip model (temporal)
    python test.py --checkpoint ccnet_r101_ade20k.pkl --dataset ade20k --data-root data/ADEChallengeData2016 \\
        --scales 0.5 0.75 1.0 1.25 1.5 1.75 --flip --out results.json --save-pred preds/
    python test.py --checkpoint city.pkl --dataset cityscapes --mode slide --window 769 --stride 513
    mpirun -np 2 python test.py ...          # images split over ranks, confusion matrices summed

Exit status 2 (with a one-paragraph message, no traceback) for bad flags, a checkpoint that does
not fit the model, or a dataset folder without images.
"""
import argparse
import json
import math
import sys
from pathlib import Path

from utils import runtime
from utils.cli import add_renamed_flag
from utils.outputs import OVERWRITE_HELP, atomic_write, refuse_overwrite

# mmsegmentation's test-time resize (keep ratio) per dataset; others are evaluated at native size.
DEFAULT_BASE_SIZE = {"ade20k": (2048, 512)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="test.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint file, URL or model-zoo name")
    parser.add_argument("--dataset", default="ade20k", help="dataset name (ade20k, cityscapes, folder, demo, demo_clips)")
    parser.add_argument("--data-root", default=None, help="dataset folder (default: the dataset's own)")
    parser.add_argument("--split", default="val", help="split to evaluate")
    parser.add_argument("--backbone", default=None,
                        help="backbone (default: the one recorded in the checkpoint, else resnet101)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="number of classes (default: the dataset's)")
    parser.add_argument("--recurrence", type=int, default=None,
                        help="criss-cross loops R (default: the checkpoint's, else 2)")
    parser.add_argument("--mode", choices=("whole", "slide"), default="whole", help="inference mode")
    parser.add_argument("--window", type=int, nargs="+", default=None, metavar="N",
                        help="sliding-window size (one int or H W); needed with --mode slide")
    add_renamed_flag(parser, "--crop-size", "--window", type=int, nargs="+")
    parser.add_argument("--stride", type=int, nargs="+", default=None, metavar="N",
                        help="sliding-window stride (default: 2/3 of the window, the official 1/3 overlap)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0], help="test scales")
    parser.add_argument("--flip", action="store_true", help="also average the horizontally flipped image")
    parser.add_argument("--average", choices=("prob", "logit"), default="prob",
                        help="how scales/flips are combined: softmax probabilities (mmseg) or logits (official)")
    parser.add_argument("--base-size", type=int, nargs="+", default=None, metavar="N",
                        help="keep-ratio test resize LONG SHORT that --scales multiply "
                             "(default: 2048 512 for ade20k, native size otherwise; 0 = native size)")
    parser.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--out", default=None, help="write the metrics as JSON here")
    parser.add_argument("--save-pred", default=None, metavar="DIR",
                        help="write label-map PNGs (dataset encoding) and colour overlays here")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP + " (--out, --save-pred)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.mode == "slide" and not args.window:
        parser.error("--mode slide needs --window")
    for name in ("window", "stride", "base_size"):
        value = getattr(args, name)
        if value is not None and len(value) not in (1, 2):
            parser.error(f"--{name.replace('_', '-')} takes one or two ints, got {value}")
    if min(args.scales) <= 0:
        parser.error(f"--scales must be positive, got {args.scales}")
    return args


def fail(message):
    """One clean paragraph on stderr and exit status 2 (like argparse errors)."""
    print(f"test.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def resolve_base_size(args):
    if args.base_size is None:
        return DEFAULT_BASE_SIZE.get(args.dataset)
    if args.base_size == [0]:
        return None
    size = args.base_size * 2 if len(args.base_size) == 1 else args.base_size
    return (max(size), min(size))


class PredictionWriter:
    """``evaluate`` callback: label map in the dataset's own encoding + colour overlay per image."""

    def __init__(self, out_dir, dataset):
        self.out_dir = Path(out_dir)
        self.overlay_dir = self.out_dir / "overlay"
        self.dataset = dataset

    def names(self, index):
        """The file names of one sample's predictions: <stem>.png, a clip one <clip>_<t>.png per frame."""
        stem = Path(self.dataset.samples[index][0]).stem
        frames = getattr(self.dataset, "clip_len", None)
        return [f"{stem}_{t}.png" for t in range(frames)] if frames else [f"{stem}.png"]

    def targets(self, indices):
        """Every file the predictions of ``indices`` go to, label maps and overlays."""
        names = [name for index in indices for name in self.names(index)]
        return [self.out_dir / n for n in names] + [self.overlay_dir / n for n in names]

    def __call__(self, index, pred, rgb, label):
        from utils.visualize import overlay, save_png
        self.overlay_dir.mkdir(parents=True, exist_ok=True)
        frames = zip(pred, rgb) if pred.ndim == 3 else [(pred, rgb)]
        for name, (frame_pred, frame_rgb) in zip(self.names(index), frames):
            save_png(self.out_dir / name, self.dataset.encode_prediction(frame_pred))
            save_png(self.overlay_dir / name, overlay(frame_rgb, self.dataset.colorize(frame_pred)))


def check_outputs(args, writer, indices, dist):
    """Stop before evaluating when --out or --save-pred would overwrite files (without --overwrite).
    Rank 0 decides for all ranks: the others must not see the files it starts writing."""
    targets = ([Path(args.out)] if args.out else []) + (writer.targets(indices) if writer else [])
    problem = ""
    try:
        refuse_overwrite(targets, args.overwrite, "test.py outputs (--out / --save-pred)",
                         instead="choose another --out / --save-pred")
    except FileExistsError as err:
        problem = str(err)
    if dist.broadcast_int(int(bool(problem))):
        fail(problem or "rank 0 found result files in the way of --out / --save-pred")


def format_table(result, class_names):
    """Per-class IoU / Acc (percent; '-' for classes absent from GT and prediction), then the means."""
    width = max([len("class")] + [len(n) for n in class_names])
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}", "-" * (width + 16)]
    for name, iou, acc in zip(class_names, result["IoU"], result["Acc"]):
        lines.append(f"{name:<{width}}  {_pct(iou):>6}  {_pct(acc):>6}")
    lines.append("-" * (width + 16))
    lines.append(f"mIoU {_pct(result['mIoU'])}  mAcc {_pct(result['mAcc'])}  aAcc {_pct(result['aAcc'])}"
                 f"  ({result['num_images']} images)")
    return "\n".join(lines)


def _pct(value):
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _json_number(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def write_json(path, result, class_names, args, backbone, recurrence):
    data = {
        "mIoU": _json_number(result["mIoU"]), "mAcc": _json_number(result["mAcc"]),
        "aAcc": _json_number(result["aAcc"]), "num_images": result["num_images"],
        "per_class": {name: {"IoU": _json_number(iou), "Acc": _json_number(acc)}
                      for name, iou, acc in zip(class_names, result["IoU"], result["Acc"])},
        "config": {"checkpoint": args.checkpoint, "dataset": args.dataset, "split": args.split,
                   "backbone": backbone, "recurrence": recurrence, "mode": args.mode,
                   "window": args.window, "stride": args.stride, "scales": args.scales,
                   "flip": args.flip, "average": args.average, "base_size": resolve_base_size(args)},
        "fractions": "all metrics are fractions in [0, 1]; null = class absent from GT and prediction",
    }
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2)))


def main(argv=None):
    args = parse_args(argv)
    runtime.activate()
    from utils import distributed as dist
    is_main = dist.is_main()
    import datasets
    from utils.checkpoint import CheckpointError, build_model_from_checkpoint
    from utils.cli import one_paragraph
    from utils.evaluation import evaluate

    try:
        dataset = datasets.build_dataset(args.dataset, data_root=args.data_root, split=args.split, mode="test")
    except (ValueError, KeyError, FileNotFoundError, NotADirectoryError) as err:
        fail(str(err).strip())      # keeps the expected-layout lines readable
    if len(dataset.samples) == 0:
        fail(f"dataset {args.dataset!r} split {args.split!r} under {args.data_root} has no images")
    indices = range(min(args.max_images, len(dataset.samples))) if args.max_images else range(len(dataset.samples))
    writer = PredictionWriter(args.save_pred, dataset) if args.save_pred else None
    check_outputs(args, writer, indices, dist)
    num_classes = args.num_classes or dataset.num_classes
    class_names = list(dataset.CLASSES)
    if len(class_names) != num_classes:
        class_names = [f"class {i}" for i in range(num_classes)]
    try:     # the checkpoint's own architecture, with what the flags say instead
        model = build_model_from_checkpoint(
            args.checkpoint, dict(backbone=args.backbone, num_classes=num_classes, recurrence=args.recurrence),
            log=lambda line: print(line, file=sys.stderr) if is_main else None)
    except CheckpointError as err:
        fail(str(err))
    backbone, recurrence = model.config.backbone, model.config.recurrence

    try:
        result = evaluate(model, dataset, mode=args.mode, crop_size=args.window, stride=args.stride,
                          scales=args.scales, flip=args.flip, base_size=resolve_base_size(args),
                          average=args.average, on_prediction=writer, indices=indices,
                          num_classes=num_classes, progress=not args.no_progress)
    except ValueError as err:       # label values outside the classes, bad crop sizes, ...
        fail(one_paragraph(err))

    if is_main:
        print(format_table(result, class_names))
        if args.out:
            write_json(args.out, result, class_names, args, backbone, recurrence)
            print(f"metrics written to {args.out}")
        if args.save_pred:
            print(f"predictions written to {args.save_pred} (label maps) and {writer.overlay_dir} (overlays)")
    return result


if __name__ == "__main__":
    from utils.supervisor import supervise
    supervise()     # Ctrl-C / SIGTERM end the run at once and quietly, Jittor's workers with it
    main()
