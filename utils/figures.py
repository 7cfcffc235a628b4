"""Regenerate the README pictures in images/ from the project's own code.

    python -m utils.figures --out-dir figures/                # geometry figure only
    python -m utils.figures --checkpoint work_dirs/demo/best.pkl --overwrite   # images/, + demo predictions, attention

* ``criss_cross.png``: pure geometry, no model. Which positions one criss-cross loop connects a
  pixel to (its row and column: H+W-1 positions) and how two loops cover the whole map: the
  two-loop weights of ``utils.visualize.two_loop_map`` with uniform attention, i.e. the number
  of two-step paths (2 for every position off the cross).
* ``demo_predictions.png``: demo-set validation images, ground truth and the checkpoint's
  prediction (needs a checkpoint trained with ``python train.py --dataset demo``).
* ``attention.png``: the attention of a pixel on a disc after one and after two loops; on the demo
  set the disc's class is decided by the marker at the left end of its row.

Without ``--checkpoint`` (or when the file does not exist) the model figures are skipped with a
message. Pictures that exist already are replaced only with ``--overwrite``.
"""
import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import visualize
from .outputs import OVERWRITE_HELP, refuse_overwrite

IMAGES = Path(__file__).resolve().parents[1] / "images"


def criss_cross_figure(path: Path, size: tuple[int, int] = (9, 11), pixel: tuple[int, int] = (3, 6)) -> Path:
    """Geometry of one and two criss-cross loops on a ``size`` = (H, W) grid for ``pixel`` (y, x)."""
    plt = visualize.pyplot()
    from matplotlib.colors import ListedColormap
    height, width = size
    y, x = pixel
    uniform = visualize.uniform_attention(height, width)
    one = visualize.one_loop_map(uniform, y, x) > 0
    paths = visualize.two_loop_map(uniform, uniform, y, x) * (height + width - 1) ** 2   # path counts
    paths = np.rint(paths).astype(int)

    fig, axes = plt.subplots(1, 2, figsize=(9.2, 4.0))
    axes[0].imshow(one, cmap=ListedColormap(["#f2f2f2", "#f4a259"]), vmin=0, vmax=1)
    axes[0].set_title(f"one loop: {one.sum()} = H+W-1 positions", fontsize=11)
    axes[1].imshow(paths, cmap="Blues", vmin=0, vmax=paths.max() * 1.3)
    axes[1].set_title(f"two loops: all {height * width} positions\n(number = two-step paths)", fontsize=11)
    for row in range(height):
        for col in range(width):
            axes[1].text(col, row, str(paths[row, col]), ha="center", va="center", fontsize=7,
                         color="black" if (row, col) != (y, x) else "white")
    corner = (height - 2 if y < height - 2 else 0, width - 2 if x < width - 2 else 0)
    for axis in axes:
        axis.set_xticks(np.arange(-0.5, width, 1), minor=True)
        axis.set_yticks(np.arange(-0.5, height, 1), minor=True)
        axis.grid(which="minor", color="white", linewidth=1.5)
        axis.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
        axis.add_patch(plt.Rectangle((x - 0.5, y - 0.5), 1, 1, color="#c0392b"))
    # one off-cross position p and its two routes u -> v -> p (the corners of the rectangle)
    p_row, p_col = corner
    for v_row, v_col in ((y, p_col), (p_row, x)):
        axes[1].annotate("", xy=(v_col, v_row), xytext=(x, y),
                         arrowprops=dict(arrowstyle="->", color="#c0392b", lw=1.4))
        axes[1].annotate("", xy=(p_col, p_row), xytext=(v_col, v_row),
                         arrowprops=dict(arrowstyle="->", color="#2c3e50", lw=1.4))
    fig.suptitle("Criss-cross attention of the red pixel", fontsize=12)
    fig.tight_layout()
    fig.savefig(str(path), dpi=90)
    plt.close(fig)
    return path


def _demo_dataset():
    import datasets
    return datasets.build_dataset("demo", split="val", mode="test")


def _predict(model, rgb):
    from datasets.transforms import normalize
    from utils.inference import inference
    return inference(model, normalize(rgb)).numpy().argmax(0)


def predictions_figure(path: Path, model: Any, dataset: Any, count: int = 4) -> Path:
    """Rows of (image, ground truth, prediction) for the first ``count`` validation images."""
    plt = visualize.pyplot()
    from matplotlib.patches import Patch
    from utils.metrics import ConfusionMatrix
    fig, axes = plt.subplots(3, count, figsize=(2.3 * count + 2.2, 7.2))
    matrix = ConfusionMatrix(dataset.num_classes)
    for col in range(count):
        rgb, label = dataset.load_raw(col)
        pred = _predict(model, rgb)
        matrix.update(pred, label)
        for row, picture in enumerate((rgb, dataset.colorize(label),
                                       dataset.colorize(pred))):
            axes[row, col].imshow(picture, interpolation="nearest")
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
    for row, name in enumerate(("image", "ground truth", "prediction")):
        axes[row, 0].set_ylabel(name, fontsize=11)
    handles = [Patch(color=np.asarray(c) / 255, label=n) for n, c in zip(dataset.CLASSES, dataset.PALETTE)]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(f"demo set, validation images 1-{count}: mIoU of these {count} = "
                 f"{100 * matrix.summary()['mIoU']:.1f}%", fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(str(path), dpi=70)
    plt.close(fig)
    return path


def attention_figure(path: Path, model: Any, dataset: Any) -> Path:
    """Attention of a pixel on a context-decided disc or square (demo set) after loops 1 and 2."""
    context = set(getattr(dataset, "CONTEXT_CLASSES", ()))
    from datasets.transforms import normalize
    for index in range(len(dataset.samples)):
        rgb, label = dataset.load_raw(index)
        for cls in sorted(context):
            ys, xs = np.nonzero(label == cls)
            if ys.size > 40:          # a whole object, not a sliver
                point = (int(np.round(xs.mean())), int(np.round(ys.mean())))
                first, second = visualize.capture_attention(model, normalize(rgb))[:2]
                visualize.save_attention_figure(
                    path, rgb, first, second, point,
                    title=f"demo image {index}: attention of a '{dataset.CLASSES[cls]}' pixel")
                return path
    raise RuntimeError("no demo image has a disc or square of a context class")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate the pictures in images/.")
    parser.add_argument("--checkpoint", default=None,
                        help="demo-set checkpoint (python train.py --dataset demo) for the model figures")
    parser.add_argument("--out-dir", default=str(IMAGES))
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP + " in --out-dir")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    skip = None
    if not args.checkpoint:
        skip = ("skipped demo_predictions.png and attention.png: pass --checkpoint (a model trained "
                "with `python train.py --dataset demo`)")
    elif "://" not in args.checkpoint and not Path(args.checkpoint).exists():
        skip = f"skipped demo_predictions.png and attention.png: checkpoint {args.checkpoint} does not exist"
    names = ["criss_cross.png"] + ([] if skip else ["demo_predictions.png", "attention.png"])
    try:
        refuse_overwrite([out / name for name in names], args.overwrite, f"--out-dir {out}",
                         instead="choose another --out-dir")
    except FileExistsError as err:
        sys.exit(f"figures: error: {err}")
    out.mkdir(parents=True, exist_ok=True)
    print(f"wrote {criss_cross_figure(out / 'criss_cross.png')}")
    if skip:
        print(skip)
        return
    from utils import runtime
    runtime.activate()
    from utils.checkpoint import CheckpointError, build_model_from_checkpoint
    dataset = _demo_dataset()
    try:
        model = build_model_from_checkpoint(args.checkpoint, dict(num_classes=dataset.num_classes), log=None)
    except CheckpointError as err:
        sys.exit(f"figures: error: {err}")
    print(f"wrote {predictions_figure(out / 'demo_predictions.png', model, dataset)}")
    print(f"wrote {attention_figure(out / 'attention.png', model, dataset)}")

if __name__ == "__main__":
    main()
