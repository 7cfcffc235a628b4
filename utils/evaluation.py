"""Evaluate a segmentation model on a dataset split: confusion matrix -> mIoU / mAcc / aAcc.

Used by test.py and, for periodic validation, by train.py. Images are read at full resolution with
``dataset.load_raw(i)`` (no augmentation), normalised, passed through ``utils.inference.inference``
and the arg-max prediction is compared with the ground truth at the original size.

Under MPI each rank takes every ``world_size``-th image and the confusion matrices are summed
(``ConfusionMatrix.summary``), so all ranks return the same numbers.
"""
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from jittor import nn
from tqdm import tqdm

from . import distributed as dist
from .inference import clip_inference
from .metrics import ConfusionMatrix


class EvaluationStopped(Exception):
    """``should_stop`` said to stop before every image was evaluated."""


def evaluate(model: nn.Module, dataset: Any, mode: str = "whole", crop_size: int | Sequence[int] | None = None,
             stride: int | Sequence[int] | None = None, scales: Sequence[float] = (1.0,), flip: bool = False,
             progress: bool = True, base_size: Sequence[int] | None = None, average: str = "prob",
             on_prediction: Callable[[int, np.ndarray, np.ndarray, np.ndarray], None] | None = None,
             indices: Iterable[int] | None = None, num_classes: int | None = None,
             should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Run the model over ``dataset`` and return ``ConfusionMatrix.summary()`` plus ``num_images``.

    ``mode``, ``crop_size``, ``stride``, ``scales``, ``flip``, ``base_size``, ``average``: see
    ``utils.inference.inference``. ``on_prediction(index, pred, rgb, label)``, if given, is called
    for every image this rank evaluates with the ``int64 [H, W]`` prediction (test.py saves PNGs
    with it). ``indices`` restricts evaluation to some images. ``should_stop()``, asked before
    every image in a single process, ends the evaluation with ``EvaluationStopped`` (under MPI the
    ranks would stop at different images, so there it is not asked). The model's train/eval state
    is restored afterwards.

    Clip datasets (``load_raw`` gives [T, H, W, 3] frames, e.g. demo_clips) are evaluated clip by
    clip with ``utils.inference.clip_inference``: a temporal model sees each clip whole, an image
    model its frames one by one; ``on_prediction`` then gets [T, H, W] / [T, H, W, 3] arrays.
    """
    from datasets.transforms import normalize   # late import: datasets imports utils

    num_classes = int(num_classes or getattr(model, "num_classes", None) or dataset.num_classes)
    matrix = ConfusionMatrix(num_classes, ignore_index=getattr(dataset, "ignore_index", 255))
    indices = list(range(len(dataset.samples))) if indices is None else list(indices)
    if not indices:
        raise ValueError(f"nothing to evaluate: the {type(dataset).__name__} split has no images")
    mine = indices[dist.rank()::dist.world_size()]
    options = dict(mode=mode, crop_size=crop_size, stride=stride, scales=scales, flip=flip,
                   base_size=base_size, average=average)

    was_training = model.is_training()
    model.eval()
    try:
        bar = tqdm(mine, desc="evaluate", unit="img", disable=not progress or not dist.is_main(), dynamic_ncols=True)
        for step, index in enumerate(bar):
            if should_stop is not None and dist.world_size() == 1 and should_stop():
                raise EvaluationStopped(f"stopped after {step} of {len(mine)} images")
            rgb, label = dataset.load_raw(index)
            clip = np.ndim(rgb) == 4                # a clip [T, H, W, 3]; a still image is one frame
            frames = rgb if clip else rgb[None]
            scores = clip_inference(model, np.stack([normalize(f) for f in frames]), **options)
            pred = np.asarray(scores.argmax(dim=1)[0].numpy(), dtype=np.int64)
            pred = pred if clip else pred[0]
            label = np.asarray(label)
            try:
                matrix.update(pred, label)
            except ValueError as err:
                raise ValueError(f"{_sample_name(dataset, index)}: {err}") from None
            if on_prediction is not None:
                on_prediction(index, pred, rgb, label)
            if step % 10 == 9 or step == len(mine) - 1:
                running = matrix.summary(reduce=False)
                bar.set_postfix(mIoU=f"{100 * running['mIoU']:.2f}", aAcc=f"{100 * running['aAcc']:.2f}")
    finally:
        if was_training:
            model.train()
    result = matrix.summary()
    result["num_images"] = len(indices)
    return result


def _sample_name(dataset, index):
    try:
        return str(dataset.samples[index][0])
    except (AttributeError, IndexError, TypeError):
        return f"image {index}"
