"""Segment images with a CCNet checkpoint and write colour pictures (and attention maps).

Examples::

    python demo.py photo.jpg --checkpoint work_dirs/demo/best.pkl --dataset demo --out-dir out/
    python demo.py photos/ --checkpoint ccnet_r101_ade20k.pkl --dataset ade20k --out-dir out/
    python demo.py photo.jpg --checkpoint ... --attention 120 80    # attention of pixel X=120, Y=80

For every image ``NAME`` it writes ``NAME_seg.png`` (palette colours) and ``NAME_overlay.png``
(colours blended on the photo); with ``--attention X Y`` also ``NAME_attention.png``: the weights
with which pixel (X, Y) sees the image after one criss-cross loop (its row and column) and after
two loops. The two-loop map composes the loops: the weight of position p is
``sum over v on the pixel's cross of A2(pixel -> v) * A1(v -> p)`` -- every p is reached through
the two corners of the rectangle spanned by the pixel and p (see utils/visualize.py).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

from utils import runtime
from utils.cli import add_renamed_flag
from utils.outputs import OVERWRITE_HELP, refuse_overwrite

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="demo.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("input", help="an image file or a folder of images")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file, URL or model-zoo name")
    parser.add_argument("--out-dir", default="demo_out", help="where the pictures go")
    parser.add_argument("--dataset", default="ade20k",
                        help="dataset the checkpoint was trained on (class names, palette, classes)")
    parser.add_argument("--backbone", default=None, help="backbone (default: the checkpoint's, else resnet101)")
    parser.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--recurrence", type=int, default=None, help="criss-cross loops (default: checkpoint's, else 2)")
    parser.add_argument("--mode", choices=("whole", "slide"), default="whole")
    parser.add_argument("--window", type=int, nargs="+", default=None, metavar="N",
                        help="sliding-window size (one int or H W); needed with --mode slide")
    add_renamed_flag(parser, "--crop-size", "--window", type=int, nargs="+")
    parser.add_argument("--stride", type=int, nargs="+", default=None, metavar="N",
                        help="sliding-window stride (default: 2/3 of the window)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0])
    parser.add_argument("--flip", action="store_true")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the colours in the overlay")
    parser.add_argument("--attention", type=int, nargs=2, default=None, metavar=("X", "Y"),
                        help="also draw the attention of image pixel (X, Y) after one and two loops")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP + " in --out-dir")
    args = parser.parse_args(argv)
    if args.mode == "slide" and not args.window:
        parser.error("--mode slide needs --window")
    return args


def fail(message):
    print(f"demo.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def list_images(path):
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            fail(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
        return images
    fail(f"input {path} is neither an image file nor a folder")


def output_names(path, attention):
    """The pictures written for input image ``path``."""
    kinds = ("seg", "overlay") + (("attention",) if attention else ())
    return [f"{Path(path).stem}_{kind}.png" for kind in kinds]


def read_rgb(path):
    """RGB uint8 [H, W, 3]; a clear error naming the file when it cannot be decoded."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        fail(f"cannot decode image {path}: {err}")


def dataset_info(name):
    """(class names, palette) of a registered dataset without needing its files."""
    import datasets
    try:
        cls = datasets.DATASETS[name]
    except KeyError:
        fail(f"unknown --dataset {name!r}; choose one of {sorted(datasets.DATASETS)}")
    return list(getattr(cls, "CLASSES", ())), [list(c) for c in getattr(cls, "PALETTE", ())]


def main(argv=None):
    args = parse_args(argv)
    runtime.activate()
    from datasets.transforms import normalize
    from utils.checkpoint import CheckpointError, build_model_from_checkpoint
    from utils.inference import inference
    from utils import visualize

    images = list_images(args.input)
    out_dir = Path(args.out_dir)
    try:
        refuse_overwrite([out_dir / name for path in images for name in output_names(path, args.attention)],
                         args.overwrite, f"--out-dir {out_dir}", instead="choose another --out-dir")
    except FileExistsError as err:
        fail(str(err))
    class_names, palette = dataset_info(args.dataset)
    try:    # the checkpoint's own architecture and classes, with what the flags say instead
        model = build_model_from_checkpoint(
            args.checkpoint, dict(backbone=args.backbone, num_classes=args.num_classes, recurrence=args.recurrence),
            log=None)
    except CheckpointError as err:
        fail(str(err))
    num_classes, recurrence = model.config.num_classes, model.config.recurrence
    if len(class_names) != num_classes:
        print(f"note: the checkpoint has {num_classes} classes, --dataset {args.dataset} has "
              f"{len(class_names)}: using class numbers", file=sys.stderr)
        class_names = [f"class {i}" for i in range(num_classes)]
    if len(palette) < num_classes:      # deterministic extra colours for classes beyond the palette
        rng = np.random.default_rng(0)
        palette = palette + rng.integers(0, 256, (num_classes - len(palette), 3)).tolist()
    if args.attention and recurrence < 2:
        fail(f"--attention draws loops 1 and 2: it needs a model with recurrence >= 2 (this one has {recurrence})")

    out_dir.mkdir(parents=True, exist_ok=True)
    for path in images:
        rgb = read_rgb(path)
        image = normalize(rgb)
        try:
            scores = inference(model, image, mode=args.mode, crop_size=args.window, stride=args.stride,
                               scales=args.scales, flip=args.flip)
        except ValueError as err:
            fail(f"{path}: {err}")
        pred = scores.argmax(dim=0)[0].numpy()
        color = visualize.colorize(pred, palette)
        written = output_names(path, args.attention)
        visualize.save_png(out_dir / written[0], color)
        visualize.save_png(out_dir / written[1], visualize.overlay(rgb, color, args.alpha))
        if args.attention:
            x, y = args.attention
            if not (0 <= x < rgb.shape[1] and 0 <= y < rgb.shape[0]):
                fail(f"--attention {x} {y} lies outside {path} ({rgb.shape[1]}x{rgb.shape[0]} pixels)")
            first, second = visualize.capture_attention(model, image)[:2]
            visualize.save_attention_figure(out_dir / written[2], rgb, first, second,
                                            (x, y), title=f"{path.name}: criss-cross attention")
        shares = np.bincount(pred.ravel(), minlength=num_classes) / pred.size
        top = ", ".join(f"{class_names[c] if c < len(class_names) else c} {100 * shares[c]:.0f}%"
                        for c in np.argsort(-shares)[:3] if shares[c] > 0)
        print(f"{path}: {top} -> {', '.join(str(out_dir / w) for w in written)}")


if __name__ == "__main__":
    from utils.supervisor import supervise
    supervise()     # Ctrl-C / SIGTERM end the run at once and quietly, Jittor's workers with it
    main()
