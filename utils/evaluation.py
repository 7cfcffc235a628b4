"""Evaluate a segmentation model on a dataset split: confusion matrix -> mIoU / mAcc / aAcc.

Used by test.py and, for periodic validation, by train.py. Images are read at full resolution with
``dataset.load_raw(i)`` (no augmentation), normalised, passed through ``utils.inference.inference``
and the arg-max prediction is compared with the ground truth at the original size.

Under MPI each rank takes every ``world_size``-th image and the confusion matrices are summed
(``ConfusionMatrix.summary``), so all ranks return the same numbers.
"""
import numpy as np
from tqdm import tqdm

import jittor as jt

from .inference import inference
from .metrics import ConfusionMatrix


def evaluate(model, dataset, mode="whole", crop_size=None, stride=None, scales=(1.0,), flip=False,
             progress=True, base_size=None, average="prob", on_prediction=None, indices=None,
             num_classes=None):
    """Run the model over ``dataset`` and return ``ConfusionMatrix.summary()`` plus ``num_images``.

    ``mode``, ``crop_size``, ``stride``, ``scales``, ``flip``, ``base_size``, ``average``: see
    ``utils.inference.inference``. ``on_prediction(index, pred, rgb, label)``, if given, is called
    for every image this rank evaluates with the ``int64 [H, W]`` prediction (test.py saves PNGs
    with it). ``indices`` restricts evaluation to some images. The model's train/eval state is
    restored afterwards.
    """
    from datasets.transforms import normalize   # late import: datasets imports utils

    num_classes = int(num_classes or getattr(model, "num_classes", None) or dataset.num_classes)
    matrix = ConfusionMatrix(num_classes, ignore_index=getattr(dataset, "ignore_index", 255))
    indices = list(range(len(dataset.samples))) if indices is None else list(indices)
    if not indices:
        raise ValueError(f"nothing to evaluate: the {type(dataset).__name__} split has no images")
    rank, world = (jt.rank, jt.world_size) if jt.in_mpi else (0, 1)
    mine = indices[rank::world]

    was_training = model.is_training()
    model.eval()
    try:
        bar = tqdm(mine, desc="evaluate", unit="img", disable=not progress or rank != 0, dynamic_ncols=True)
        for step, index in enumerate(bar):
            rgb, label = dataset.load_raw(index)
            scores = inference(model, normalize(rgb), mode=mode, crop_size=crop_size, stride=stride,
                               scales=scales, flip=flip, base_size=base_size, average=average)
            pred = np.asarray(scores.argmax(dim=0)[0].numpy(), dtype=np.int64)
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


class ModelLoadError(ValueError):
    """The model cannot be built, or the checkpoint does not fit it (message is user-facing)."""


def load_model_for_inference(checkpoint, num_classes, backbone=None, recurrence=None, **model_opts):
    """CCNet in eval mode with ``checkpoint``'s weights (a path, URL or model-zoo name).

    Backbone / recurrence / model options default to what the checkpoint records about itself
    (when the checkpoint helper can tell), else ``resnet101`` and R = 2. Returns
    ``(model, info)`` with ``info = dict(backbone=..., recurrence=...)``; raises
    ``ModelLoadError`` with one readable paragraph when the weights do not fit.
    """
    import models
    from utils import checkpoint as ckpt

    meta = {}
    if hasattr(ckpt, "checkpoint_meta"):
        try:
            meta = ckpt.checkpoint_meta(checkpoint) or {}
        except Exception:           # unreadable: load_checkpoint below says why
            meta = {}
    backbone = backbone or meta.get("backbone") or "resnet101"
    recurrence = int(recurrence if recurrence is not None else meta.get("recurrence", 2))
    opts = dict(meta.get("model_opts") or {})
    opts.update(model_opts)
    try:
        model = models.build_model(backbone, num_classes, recurrence=recurrence, **opts)
    except (ValueError, KeyError, TypeError) as err:
        raise ModelLoadError(f"cannot build the model: {one_paragraph(err)}") from None
    try:
        ckpt.load_checkpoint(model, checkpoint)
    except (ValueError, KeyError, RuntimeError, OSError, EOFError) as err:
        raise ModelLoadError(
            f"checkpoint {checkpoint} does not fit a CCNet with backbone {backbone}, {num_classes} "
            f"classes, recurrence {recurrence} (set --backbone / --num-classes / --recurrence to match "
            f"how it was trained): {one_paragraph(err)}") from None
    model.eval()
    return model, dict(backbone=backbone, recurrence=recurrence)


def one_paragraph(err, limit=4000):
    """An exception's message on one line (long key lists cut at ``limit`` characters)."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _sample_name(dataset, index):
    try:
        return str(dataset.samples[index][0])
    except (AttributeError, IndexError, TypeError):
        return f"image {index}"
