"""Pictures: palette colouring, overlays, and criss-cross attention maps.

Attention layout (that of ``models.cc_attention.ca_weight``): for a position u = (y, x) of an H x W feature map the
attention ``A[:, y, x]`` has H+W-1 entries; entry i < W is row position (y, i), entry W+j is
column position (j if j < y else j+1, x).

One loop of criss-cross attention mixes each position with its cross only. The second loop
applies the same operation to the output of the first, so the weight with which u (after two
loops) sees any position p is the composition

    M2(u, p) = sum over v on u's cross of  A2(u -> v) * A1(v -> p)

(A1 / A2 are the attention maps of the first / second loop; the residual ``+ x`` and ``gamma``
are left out, as in the paper's visualisation). Every p is reachable: through v = (y_u, x_p) or
v = (y_p, x_u), which is the paper's argument that two loops give full-image context.
"""
import os
import warnings
from typing import Any, Sequence

import numpy as np


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display on training machines)."""
    # Jittor compiles its kernels with -Ofast: loading the first one turns on flush-to-zero for
    # the process, and numpy then warns, once per float type, that the smallest subnormal is zero when
    # anyone asks for finfo (matplotlib does for its axes). Nothing a user can act on: ask numpy
    # here, quietly, and its cached answer serves every later call.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The value of the smallest subnormal", category=UserWarning)
        for dtype in (np.float16, np.float32, np.float64, np.longdouble):
            np.finfo(dtype)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# --------------------------------------------------------------------------- label pictures
def colorize(label: np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int = 255) -> np.ndarray:
    """uint8 RGB picture of an integer label map; ignored / unknown values are black."""
    label = np.asarray(label)
    table = np.zeros((max(len(palette), ignore_index + 1 if ignore_index is not None else 0, 1), 3), np.uint8)
    table[:len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    if ignore_index is not None and ignore_index >= len(palette):
        table[ignore_index] = 0
    safe = np.where((label >= 0) & (label < len(table)), label, ignore_index if ignore_index is not None else 0)
    return table[safe.astype(np.int64)]


def overlay(rgb: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a colour label picture onto the image (``alpha`` = weight of the labels)."""
    rgb = np.asarray(rgb, dtype=np.float32)
    color = np.asarray(color, dtype=np.float32)
    if rgb.shape != color.shape:
        raise ValueError(f"image shape {rgb.shape} differs from label picture shape {color.shape}")
    return np.clip((1 - alpha) * rgb + alpha * color + 0.5, 0, 255).astype(np.uint8)


def save_png(path: str | os.PathLike, array: np.ndarray) -> None:
    from PIL import Image
    Image.fromarray(np.asarray(array)).save(str(path), optimize=True)


# --------------------------------------------------------------------------- criss-cross geometry
def cross_positions(height: int, width: int, y: int, x: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) index arrays of u=(y, x)'s H+W-1 path positions, in attention-channel order."""
    rows = np.concatenate([np.full(width, y), [j if j < y else j + 1 for j in range(height - 1)]])
    cols = np.concatenate([np.arange(width), np.full(height - 1, x)])
    return rows.astype(np.int64), cols.astype(np.int64)


def one_loop_map(attention: np.ndarray, y: int, x: int) -> np.ndarray:
    """[H, W] weights with which position (y, x) sees every position after one loop.

    ``attention``: ``[H+W-1, H, W]`` (one image of the module's attention).
    """
    _, height, width = attention.shape
    rows, cols = cross_positions(height, width, y, x)
    out = np.zeros((height, width), dtype=np.float64)
    np.add.at(out, (rows, cols), attention[:, y, x])
    return out


def two_loop_map(first: np.ndarray, second: np.ndarray, y: int, x: int) -> np.ndarray:
    """[H, W] weights with which (y, x) sees every position after two loops (see module doc)."""
    _, height, width = second.shape
    rows, cols = cross_positions(height, width, y, x)
    out = np.zeros((height, width), dtype=np.float64)
    for weight, v_row, v_col in zip(second[:, y, x], rows, cols):
        out += weight * one_loop_map(first, v_row, v_col)
    return out


def uniform_attention(height: int, width: int) -> np.ndarray:
    """Attention that weighs every path position equally (pure geometry, no model)."""
    return np.full((height + width - 1, height, width), 1.0 / (height + width - 1))


def attention_from_qk(query: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Softmaxed criss-cross attention ``[H+W-1, H, W]`` from one image's query/key ``[C', H, W]``.

    A numpy re-statement of ``softmax(ca_weight(Q, K))`` in the layout above, used when the
    attention module does not keep its attention itself.
    """
    query, key = np.asarray(query, np.float64), np.asarray(key, np.float64)
    _, height, width = query.shape
    row = np.einsum("cyx,cyi->iyx", query, key)                      # [W, H, W]
    column = np.einsum("cyx,cjx->jyx", query, key)                   # [H, H, W], j = source row
    keep = np.array([[j if j < y else j + 1 for j in range(height - 1)] for y in range(height)],
                    dtype=np.int64).T                                 # [H-1, H]
    column = np.take_along_axis(column, keep[:, :, None].repeat(width, axis=2), axis=0)
    energy = np.concatenate([row, column], axis=0)
    energy -= energy.max(axis=0, keepdims=True)
    weights = np.exp(energy)
    return weights / weights.sum(axis=0, keepdims=True)


def capture_attention(model: Any, image: np.ndarray) -> list[np.ndarray]:
    """Run ``model`` (eval mode) on one normalised image and return the list of per-loop attention
    maps of its criss-cross module, each ``[H+W-1, h, w]`` (feature resolution) numpy float64.

    Uses the module's ``keep_attention`` / ``last_attention`` when it has them; otherwise the
    attention is recomputed from the module's query/key convolutions on each loop's input.
    """
    import jittor as jt
    cca = model.head.cca
    records = []
    keeps = hasattr(cca, "keep_attention")
    original_execute = cca.execute

    def recording_execute(x, *args, **kwargs):
        out = original_execute(x, *args, **kwargs)
        if keeps and getattr(cca, "last_attention", None) is not None:
            records.append(np.asarray(cca.last_attention.numpy()[0], dtype=np.float64))
        else:
            records.append(attention_from_qk(cca.query_conv(x).numpy()[0], cca.key_conv(x).numpy()[0]))
        return out

    previous_keep = getattr(cca, "keep_attention", None)
    cca.execute = recording_execute
    if keeps:
        cca.keep_attention = True
    try:
        x = image if isinstance(image, jt.Var) else jt.array(np.ascontiguousarray(image, dtype=np.float32))
        with jt.no_grad():
            model(x.unsqueeze(0) if x.ndim == 3 else x).sync()
    finally:
        del cca.execute                     # back to the class's execute
        if keeps:
            cca.keep_attention = previous_keep
            if hasattr(cca, "last_attention"):
                cca.last_attention = None
    return records


def feature_position(point: Sequence[int], image_size: Sequence[int], feature_size: Sequence[int]) -> tuple[int, int]:
    """Feature-map cell (fy, fx) holding image pixel ``point`` = (X, Y)."""
    (px, py), (height, width), (fh, fw) = point, image_size, feature_size
    if not (0 <= px < width and 0 <= py < height):
        raise ValueError(f"pixel (X={px}, Y={py}) lies outside the {width}x{height} image")
    return min(int(py * fh / height), fh - 1), min(int(px * fw / width), fw - 1)


# --------------------------------------------------------------------------- figures
def heat_overlay(rgb: np.ndarray, weights: np.ndarray, alpha: float = 0.6, cmap: str = "jet", gamma: float = 0.5) -> np.ndarray:
    """Image with a heat map of ``weights`` (any size; nearest upsampled) blended on top.

    Colour = (weight / max) ** gamma: with gamma 0.5 the small weights two loops spread over the
    whole image stay visible next to the large ones on the pixel's own cross."""
    from matplotlib import colormaps
    rgb = np.asarray(rgb)
    height, width = rgb.shape[:2]
    weights = np.asarray(weights, dtype=np.float64)
    rows = np.minimum((np.arange(height) * weights.shape[0]) // height, weights.shape[0] - 1)
    cols = np.minimum((np.arange(width) * weights.shape[1]) // width, weights.shape[1] - 1)
    up = weights[rows][:, cols]
    up = (up / up.max()) ** gamma if up.max() > 0 else up
    heat = (colormaps[cmap](up)[..., :3] * 255).astype(np.float32)
    return np.clip((1 - alpha) * rgb + alpha * heat + 0.5, 0, 255).astype(np.uint8)


def save_attention_figure(path: str | os.PathLike, rgb: np.ndarray, first: np.ndarray, second: np.ndarray, point: Sequence[int],
                          title: str | None = None) -> list[np.ndarray]:
    """[image | one loop | two loops] for image pixel ``point`` = (X, Y); ``first`` / ``second``
    are the attention maps of loops 1 and 2 (``[H+W-1, h, w]``)."""
    plt = pyplot()
    fy, fx = feature_position(point, rgb.shape[:2], first.shape[1:])
    maps = [one_loop_map(first, fy, fx), two_loop_map(first, second, fy, fx)]
    fig, axes = plt.subplots(1, 3, figsize=(9.6, 3.4))
    panels = [(rgb, "image, pixel ({}, {})".format(*point)),
              (heat_overlay(rgb, maps[0]), "after loop 1 (cross)"),
              (heat_overlay(rgb, maps[1]), "after loop 2 (whole image)")]
    for axis, (picture, label) in zip(axes, panels):
        axis.imshow(picture)
        axis.plot([point[0]], [point[1]], marker="o", markersize=7, markerfacecolor="white",
                  markeredgecolor="black")
        axis.set_title(label, fontsize=10)
        axis.axis("off")
    fig.text(0.5, 0.01, "colour = sqrt(attention weight / max)", ha="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(str(path), dpi=80)
    plt.close(fig)
    return maps
