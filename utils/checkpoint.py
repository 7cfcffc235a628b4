"""Checkpoints: save / load our own, and import published PyTorch weights without torch.

What train.py / test.py / demo.py call:

* ``save_checkpoint(path, state, arch=None)``  atomic (temp file + ``os.replace``).
* ``read_checkpoint(source)``  the raw object of a file (resume: optimizer state, iteration).
* ``load_checkpoint(model, source, strict=True)``  a full model (segmentor) checkpoint: ours, the
  official CCNet release, or mmsegmentation's CCNet. Missing, unexpected or mis-shaped keys raise
  a ``CheckpointError`` that lists them; architecture options that weights cannot show (head
  activation, stem, contract_dilation, ...) are checked against the model when the layout
  implies them.
* ``load_backbone_weights(model, source)``  ``train.py --pretrained``: ImageNet weights
  (torchvision / MIT CSAIL / mmseg ResNet-V1c, official VAN) into ``model.backbone``; the
  classification head is dropped and reported.
* ``build_model_from_checkpoint(source, **overrides)``  builds the architecture variant a
  checkpoint was trained with and loads it (test.py / demo.py with only ``--checkpoint``).
* ``checkpoint_arch(source)``  just the ``build_model`` options of a checkpoint.

``source`` is a path, a URL or a model zoo name (``utils.model_zoo``).

PyTorch files (.pth / .pth.tar / .pt, zip format and the legacy pre-1.6 format) and Jittor
pickles are read by the small reader below, with numpy only (no torch): ``jt.load`` accepts only
the .pth/.pt/.bin suffixes for PyTorch files, ignores storage offsets in the legacy format and,
like any plain unpickling, runs whatever code a pickle names. This reader allows a fixed set of
globals (tensors, storages, OrderedDict, numpy arrays) and turns anything else (e.g. mmcv objects
in a checkpoint's "meta") into inert placeholders, so a downloaded file cannot run code.

``python -m utils.checkpoint FILE_OR_NAME ...`` prints what a checkpoint is (layout, options).
"""
import hashlib
import io
import os
import pickle
import struct
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint cannot be read, recognised or loaded into the given model."""


# =============================================================== PyTorch files without torch

TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
TORCH_LEGACY_PROTOCOL = 1001

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16,   # raw bits; widened to float32 when the tensor is built
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name):
        self.name = name
        self.dtype = np.dtype(STORAGE_DTYPES[name])


class _Storage:
    """A flat storage; ``data`` (a 1-D numpy array) is filled in when its bytes are read."""

    def __init__(self, storage_type, numel):
        self.storage_type, self.numel, self.data = storage_type, numel, None


class _PendingTensor:
    """A tensor whose storage may not be read yet (legacy files put the bytes after the pickle)."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def materialize(self):
        base = self.storage.data
        if base is None:
            raise CheckpointError("corrupt PyTorch file: a tensor refers to storage that was never written")
        extent = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1
        if any(n == 0 for n in self.size):
            array = np.zeros(self.size, base.dtype)
        elif extent > base.size or self.offset < 0:
            raise CheckpointError(f"corrupt PyTorch file: tensor of size {list(self.size)} reaches element "
                                  f"{extent} of a storage holding {base.size}")
        else:
            array = np.lib.stride_tricks.as_strided(
                base[self.offset:], shape=self.size,
                strides=[s * base.itemsize for s in self.stride]).copy()
        if self.storage.storage_type.name == "BFloat16Storage":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array


def _rebuild_tensor(storage, offset, size, stride, *unused):
    return _PendingTensor(storage, offset, size, stride)


def _rebuild_parameter(data, *unused):
    return data


class Placeholder:
    """Stands in for an object of a class this reader does not import (kept for inspection)."""
    origin = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.state = args, None

    def __setstate__(self, state):
        self.state = state

    # container opcodes (SETITEMS / APPENDS) on a placeholder for a dict or list subclass
    def __setitem__(self, key, value):
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value):
        self.__dict__.setdefault("values", []).append(value)

    def extend(self, values):
        self.__dict__.setdefault("values", []).extend(values)

    def __repr__(self):
        return f"<placeholder for {self.origin}>"


def _jittor_var(data, *unused):
    return np.asarray(data)


def _placeholder_class(module, name):
    return type(name, (Placeholder,), {"origin": f"{module}.{name}"})


SAFE_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
    ("builtins", "complex"): complex, ("builtins", "bytearray"): bytearray,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("numpy.core.multiarray", "_reconstruct"): np.core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np.core.multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): np.core.multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): np.core.multiarray.scalar,
    ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): __import__("codecs").encode,
    ("jittor", "jittor_core.Var"): _jittor_var, ("jittor_core", "Var"): _jittor_var,
}


class _TorchUnpickler(pickle.Unpickler):
    def __init__(self, file, load_storage):
        super().__init__(file, encoding="latin1")   # latin1: numpy arrays pickled by Python 2
        self._load_storage = load_storage

    def find_class(self, module, name):
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in SAFE_GLOBALS:
            return SAFE_GLOBALS[(module, name)]
        return _placeholder_class(module, name)

    def persistent_load(self, saved_id):
        kind = saved_id[0].decode() if isinstance(saved_id[0], bytes) else saved_id[0]
        if kind == "module":            # legacy whole-module pickles record their source here
            return None
        if kind != "storage":
            raise CheckpointError(f"unsupported persistent id {kind!r} in PyTorch file")
        return self._load_storage(*saved_id[1:])


def _materialize(obj):
    """Replace every _PendingTensor inside dicts / lists / tuples by its numpy array."""
    if isinstance(obj, _PendingTensor):
        return obj.materialize()
    if isinstance(obj, dict):
        for key in obj:
            obj[key] = _materialize(obj[key])
        return obj
    if isinstance(obj, list):
        return [_materialize(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialize(v) for v in obj)
    return obj


def _read_torch_zip(path):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pkl = next((n for n in names if n.endswith("data.pkl") and n.count("/") == 1), None)
        if pkl is None:
            raise CheckpointError(f"{path}: a zip file without <name>/data.pkl is not a PyTorch checkpoint")
        prefix = pkl[:-len("data.pkl")]
        if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() != b"little":
            raise CheckpointError(f"{path}: big-endian PyTorch files are not supported")
        storages = {}

        def load_storage(storage_type, key, location, numel):
            if key not in storages:
                storage = _Storage(storage_type, numel)
                raw = archive.read(f"{prefix}data/{key}")
                storage.data = np.frombuffer(raw, dtype=storage_type.dtype)
                storages[key] = storage
            return storages[key]

        return _materialize(_TorchUnpickler(io.BytesIO(archive.read(pkl)), load_storage).load())


def _read_torch_legacy(path):
    with open(path, "rb") as f:
        if pickle.load(f) != TORCH_LEGACY_MAGIC:
            raise CheckpointError(f"{path}: not a PyTorch file (bad magic number)")
        if pickle.load(f) != TORCH_LEGACY_PROTOCOL:
            raise CheckpointError(f"{path}: unsupported legacy PyTorch protocol version")
        pickle.load(f)                                  # sys info (byte order, type sizes)
        storages, views = {}, {}

        def load_storage(storage_type, root_key, location, numel, view_metadata=None):
            if root_key not in storages:
                storages[root_key] = _Storage(storage_type, numel)
            root = storages[root_key]
            if view_metadata is None:
                return root
            view_key, offset, size = view_metadata     # pre-0.4 storage views share their root's bytes
            if view_key not in views:
                views[view_key] = (root, offset, _Storage(storage_type, size))
            return views[view_key][2]

        result = _TorchUnpickler(f, load_storage).load()
        keys = pickle.load(f)
        for key in keys:
            storage = storages[key]
            header = f.read(8)
            if len(header) != 8:
                raise CheckpointError(f"{path}: file ends before the data of storage {key} (truncated download?)")
            count = struct.unpack("<q", header)[0]
            itemsize = storage.storage_type.dtype.itemsize
            nbytes = count if count == storage.numel * itemsize and count != storage.numel else count * itemsize
            raw = f.read(nbytes)
            if len(raw) != nbytes:
                raise CheckpointError(f"{path}: file ends inside storage {key} (truncated download?)")
            storage.data = np.frombuffer(raw, dtype=storage.storage_type.dtype)
        for root, offset, view in views.values():
            view.data = root.data[offset:offset + view.numel]
    return _materialize(result)


def _is_torch_legacy(path):
    """Legacy files open with the pickled magic number (protocol 2: PROTO 2, LONG1 of 10 bytes)."""
    with open(path, "rb") as f:
        head = f.read(16)
    return head[2:4] == b"\x8a\x0a" and head[4:14] == TORCH_LEGACY_MAGIC.to_bytes(10, "little")


JITTOR_TRAILER = b"HCAJSLHD"        # jt.save: pickle + sha1(pickle) + this marker


def _read_jittor_pickle(path):
    """A jt.save / save_checkpoint file (or a plain pickle), through the same restricted unpickler."""
    data = Path(path).read_bytes()
    if data.endswith(JITTOR_TRAILER):
        body, checksum = data[:-28], data[-28:-8]
        if hashlib.sha1(body).digest() != checksum:
            raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt (truncated copy?)")
        data = body
    try:
        return _TorchUnpickler(io.BytesIO(data), None).load()
    except Exception as err:  # noqa: BLE001  (random bytes fail in many ways; all mean "not a pickle")
        raise CheckpointError(f"{path}: neither a PyTorch file (zip or legacy) nor a Jittor pickle "
                              f"({type(err).__name__}: {err})") from err


def read_checkpoint(source):
    """The object stored in a checkpoint file (our Jittor pickle or a PyTorch file), tensors as numpy.

    ``source``: path, URL or model zoo name.
    """
    path = _resolve(source)
    if zipfile.is_zipfile(path):
        return _read_torch_zip(path)
    if _is_torch_legacy(path):
        return _read_torch_legacy(path)
    return _read_jittor_pickle(path)


def _to_numpy(obj):
    import jittor as jt
    if isinstance(obj, jt.Var):
        return obj.numpy()
    if isinstance(obj, dict):
        return type(obj)((k, _to_numpy(v)) for k, v in obj.items()) if isinstance(obj, OrderedDict) \
            else {k: _to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_numpy(v) for v in obj)
    return obj


def _resolve(source):
    if isinstance(source, (str, os.PathLike)):
        from .download import DownloadError
        from .model_zoo import resolve_source
        try:
            path = Path(resolve_source(os.fspath(source)))
        except DownloadError as err:        # one exception type for callers of the load_* functions
            raise CheckpointError(str(err)) from err
        if not path.is_file():
            raise CheckpointError(f"checkpoint file not found: {path}")
        return path
    raise TypeError(f"checkpoint source must be a path, URL or zoo name, got {type(source).__name__}")


# =============================================================== saving

def save_checkpoint(path, state, arch=None):
    """Write ``state`` (a Module, a state dict, or a dict such as {"state_dict", "optimizer",
    "iteration"}) atomically: a temp file in the same folder, renamed over ``path`` when complete.

    ``arch``: the ``build_model`` options (backbone, num_classes, ...) so the file can later be
    loaded with ``build_model_from_checkpoint`` alone.
    """
    import jittor as jt
    if isinstance(state, jt.Module):
        state = {"state_dict": state.state_dict()}
    state = dict(_to_numpy(state))
    if arch is not None:
        state["arch"] = dict(arch)
    state.setdefault("format", "ccnet-jittor")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        jt.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# =============================================================== state dicts and layouts

WRAPPER_KEYS = ("state_dict", "model")     # mmseg/VAN: "state_dict"; others: "model"


def extract_state_dict(obj, where="checkpoint"):
    """The flat {key: numpy array} inside a checkpoint object: unwraps "state_dict"/"model"
    nesting, drops non-tensor entries, strips DataParallel's "module." prefix."""
    for _ in range(3):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}: expected a dict of tensors, found {type(obj).__name__}"
                              + (f" ({obj.origin}: a pickled Python object, not a state dict; re-save it "
                                 "with torch.save(model.state_dict(), path))" if isinstance(obj, Placeholder) else ""))
    state = {}
    for key, value in obj.items():
        if isinstance(value, np.ndarray):
            key = key[len("module."):] if key.startswith("module.") else key
            state[key] = value
    if not state:
        raise CheckpointError(f"{where}: no tensors found (top-level keys: {', '.join(map(str, list(obj)[:10]))})")
    return state


def _split_bn_counters(state):
    kept = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    dropped = {k: "BatchNorm step counter (Jittor keeps none)" for k in state if k not in kept}
    return kept, dropped


def detect_layout(state, where="checkpoint"):
    """The layout (models.WEIGHT_LAYOUTS) whose signature the keys show; whole-model layouts are
    tried first, since a whole model holds a backbone too."""
    import models
    keys = set(state)
    for kind in ("segmentor", "backbone"):
        for layout in models.WEIGHT_LAYOUTS.values():
            if layout.kind == kind and layout.matches(keys):
                return layout
    sample = ", ".join(sorted(keys)[:8])
    raise CheckpointError(f"{where}: unrecognised checkpoint layout (first keys: {sample}). Known layouts: "
                          + "; ".join(f"{l.name} = {l.description}" for l in models.WEIGHT_LAYOUTS.values()))


class Prepared:
    """A checkpoint read and converted to our key names (``raw``: its content when the caller has
    read the file already, so it is not read twice)."""

    def __init__(self, source, raw=None):
        self.path = _resolve(source)
        self.raw = read_checkpoint(self.path) if raw is None else raw
        state = extract_state_dict(self.raw, str(self.path))
        self.layout = detect_layout(state, str(self.path))
        state, self.dropped = _split_bn_counters(state)
        state, self.filled = self.layout.convert(state)
        # backbone files: our backbone keys under "backbone.", their ImageNet classifier apart
        self.classifier = {}
        if self.layout.kind == "backbone":
            self.classifier = {k: v for k, v in state.items() if k.startswith(self.layout.classifier)}
            state = {"backbone." + k: v for k, v in state.items() if k not in self.classifier}
        self.state = state
        zoo_arch = {}
        if isinstance(source, str) and not os.path.isfile(source):
            from .model_zoo import ALIASES, MODEL_ZOO
            zoo_arch = MODEL_ZOO.get(ALIASES.get(source, source), {}).get("arch", {})
        saved_arch = self.raw.get("arch", {}) if isinstance(self.raw, dict) and isinstance(self.raw.get("arch"), dict) else {}
        # what the weights' shapes show is a fact and wins; the layout, the zoo entry and the arch
        # saved with our own files add what shapes cannot show (activation, pooling, recurrence)
        self.arch = {**self.layout.implies, **zoo_arch, **saved_arch, **_arch_from_weights(self.state, self.layout)}


# =============================================================== architecture from weights

def _blocks_per_stage(state, prefix):
    counts = []
    for stage in range(1, 5):
        ids = {int(k.split(".")[2]) for k in state if k.startswith(f"{prefix}layer{stage}.")}
        counts.append(len(ids))
    return tuple(counts)


def _resnet_arch(state):
    from models.resnet import DEPTHS
    block = "bottleneck" if "backbone.layer1.0.conv3.weight" in state else "basic"
    layers = _blocks_per_stage(state, "backbone.")
    name = next((n for n, (b, l) in DEPTHS.items() if b == block and tuple(l) == layers), None)
    if name is None:
        raise CheckpointError(f"ResNet with {block} blocks {layers} matches none of "
                              f"{', '.join(f'{n} {l}' for n, (_, l) in DEPTHS.items())}")
    base = int(state["backbone.layer1.0.conv1.weight"].shape[0])
    arch = dict(backbone=name, base_channels=base)
    if "backbone.conv2.weight" in state:
        widths = tuple(int(state[f"backbone.conv{i}.weight"].shape[0]) for i in (1, 2, 3))
        arch["stem"] = "deep"
        if widths != (base, base, 2 * base):
            arch["stem_widths"] = widths
    else:
        arch["stem"] = "standard"
    return arch


def _van_arch(state):
    from models.van import MLP_RATIOS, VAN_SIZES
    dims = tuple(int(state[f"backbone.patch_embed{i}.proj.weight"].shape[0]) for i in range(1, 5))
    depths = _blocks_per_van_stage(state)
    ratios = tuple(int(state[f"backbone.block{i}.0.mlp.fc1.weight"].shape[0]) // d for i, d in zip(range(1, 5), dims))
    for name, size in VAN_SIZES.items():
        if tuple(size["embed_dims"]) == dims and tuple(size["depths"]) == depths and ratios == tuple(MLP_RATIOS):
            return dict(backbone=name)
    return dict(backbone="van_b0", embed_dims=dims, depths=depths, mlp_ratios=ratios)


def _blocks_per_van_stage(state):
    return tuple(len({int(k.split(".")[2]) for k in state if k.startswith(f"backbone.block{i}.")}) for i in range(1, 5))


def _arch_from_weights(state, layout):
    arch = _van_arch(state) if "backbone.patch_embed1.proj.weight" in state else _resnet_arch(state)
    if layout.kind == "segmentor":
        arch.update(num_classes=int(state["head.bottleneck.3.weight"].shape[0]),
                    head_channels=int(state["head.bottleneck.0.weight"].shape[0]),
                    aux_channels=int(state["dsn.0.weight"].shape[0]))
    return arch


def checkpoint_arch(source):
    """The build_model options of a checkpoint: from its weights' shapes, its layout, its zoo entry
    and (our own files) the ``arch`` saved with it."""
    return dict(Prepared(source).arch)


# =============================================================== building and loading

def _check_variant(model, prepared):
    """Refuse a model whose options differ from what the layout implies (head activation,
    contract dilation, pooling): such weights load without complaint but compute something else."""
    config = getattr(model, "config", None)
    if config is None:
        return
    effective = config.effective_options()
    wrong = [f"{k}={v!r} (model has {effective[k]!r})" for k, v in prepared.layout.implies.items()
             if effective.get(k) is not None and effective[k] != v]
    if wrong:
        raise CheckpointError(
            f"{prepared.path} ({prepared.layout.description}) was trained with {', '.join(wrong)}: the "
            f"weights would load but compute something else. Build the model with "
            f"build_model_from_checkpoint(...) or these options.")


def find_mismatches(target, state):
    # in network order (the model's / the file's), so the first lines show where things diverge
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    shapes = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(target[k].shape)}"
              for k in target if k in state and tuple(state[k].shape) != tuple(target[k].shape)]
    return missing, unexpected, shapes


def describe_problems(missing, unexpected, shapes, limit=12):
    parts = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
            parts.append(f"{len(items)} {title}:\n    " + "\n    ".join(items[:limit]) + more)
    return "\n  ".join(parts)


def assign_state(target, state):
    import jittor as jt
    assigned = []
    for key, value in state.items():
        var = target[key]
        var.assign(jt.array(np.ascontiguousarray(value).astype(str(var.dtype))))
        assigned.append(var)
    for var in assigned:
        var.sync()      # JITTOR.md: a freshly assigned 1-element Var (cca.gamma) must be synced once
    return len(assigned)


def _report(log, prepared, loaded, what, dropped):
    if log is None:
        return
    log(f"loaded {loaded} tensors into the {what} from {prepared.path.name} ({prepared.layout.description})")
    notes = {}
    counters = [k for k in dropped if k.endswith("num_batches_tracked")]
    if counters:
        log(f"  ignored {len(counters)} BatchNorm num_batches_tracked counters (Jittor keeps none)")
    for key, reason in dropped.items():
        if key not in counters:
            notes.setdefault(f"dropped ({reason})", []).append(key)
    for key, reason in prepared.filled.items():
        notes.setdefault(f"filled with {reason}", []).append(key)
    for title, keys in notes.items():
        shown = ", ".join(keys[:6]) + (f" ... ({len(keys)} keys)" if len(keys) > 6 else "")
        log(f"  {title}: {shown}")


def load_checkpoint(model, source, strict=True, log=print):
    """Load a full CCNet checkpoint (ours, official CCNet, mmseg CCNet) into ``model``.

    strict: missing / unexpected / mis-shaped keys raise a CheckpointError listing them (strict=False
    loads the matching keys and reports the rest). Returns a dict report (layout, loaded, dropped,
    filled, missing, unexpected, shape_mismatches, raw: the file's full content for resuming).
    The model must be the variant the file was trained with (``build_model_from_checkpoint``
    builds it): options the layout implies are checked against ``model.config``.
    """
    prepared = source if isinstance(source, Prepared) else Prepared(source)
    if prepared.layout.kind != "segmentor":
        raise CheckpointError(f"{prepared.path} holds {prepared.layout.description} weights, a backbone only: "
                              "use it with train.py --pretrained (load_backbone_weights), not as a full model")
    _check_variant(model, prepared)
    target = model.state_dict()
    missing, unexpected, shapes = find_mismatches(target, prepared.state)
    if strict and (missing or unexpected or shapes):
        raise CheckpointError(f"{prepared.path} ({prepared.layout.description}) does not fit this model:\n  "
                              + describe_problems(missing, unexpected, shapes))
    bad = set(unexpected) | {s.split(":")[0] for s in shapes}
    loaded = assign_state(target, {k: v for k, v in prepared.state.items() if k not in bad})
    _report(log, prepared, loaded, "model", prepared.dropped)
    if not strict and (missing or unexpected or shapes) and log is not None:
        log("  not loaded:\n  " + describe_problems(missing, unexpected, shapes))
    return dict(layout=prepared.layout.name, loaded=loaded, dropped=prepared.dropped, filled=prepared.filled,
                missing=missing, unexpected=unexpected, shape_mismatches=shapes, raw=prepared.raw)


def load_backbone_weights(model, source, log=print):
    """``train.py --pretrained``: ImageNet (or a segmentor's) backbone weights into ``model.backbone``
    (or into ``model`` itself when it is a bare backbone). Every backbone parameter must be provided
    with the right shape; classifier / head weights are dropped and reported. A backbone of another
    variant (e.g. OpenMMLab V1c's narrower stem) is an error naming the options the weights need.
    """
    prepared = source if isinstance(source, Prepared) else Prepared(source)
    backbone = getattr(model, "backbone", model)
    target = backbone.state_dict()
    state = {k[len("backbone."):]: v for k, v in prepared.state.items() if k.startswith("backbone.")}
    dropped = dict(prepared.dropped)
    dropped.update({k: "not part of the backbone" for k in prepared.state if not k.startswith("backbone.")})
    for key, value in prepared.classifier.items():      # kept when the model is a classifier itself
        if key in target:
            state[key] = value
        else:
            dropped[key] = "ImageNet classifier"
    missing, unexpected, shapes = find_mismatches(target, state)
    if missing or unexpected or shapes:
        hint = ""
        if prepared.arch.get("backbone"):
            opts = {k: v for k, v in prepared.arch.items() if k in ("backbone", "stem", "stem_widths", "stem_pool_ceil",
                                                                    "base_channels", "embed_dims", "depths")}
            hint = f"\n  the weights are for: {opts}"
        raise CheckpointError(f"{prepared.path} ({prepared.layout.description}) does not fit this backbone:\n  "
                              + describe_problems(missing, unexpected, shapes) + hint)
    loaded = assign_state(target, state)
    _report(log, prepared, loaded, "backbone", dropped)
    return dict(layout=prepared.layout.name, loaded=loaded, dropped=dropped, arch=prepared.arch)


def build_model_from_checkpoint(source, log=print, **overrides):
    """Build the CCNet variant a full-model checkpoint was trained with and load it (strict).

    The options come from the weights' shapes, the layout (e.g. mmseg: ReLU head, contract
    dilation), the zoo entry, the ``arch`` saved in our own files, then ``overrides`` (e.g.
    ``recurrence``, which weights cannot show: R applies one shared module). Returns the model
    (its ``config`` says how it was built) in eval mode.
    """
    prepared = Prepared(source)
    if prepared.layout.kind != "segmentor":
        raise CheckpointError(f"{prepared.path} holds {prepared.layout.description} weights, a backbone only; "
                              "a full model needs a segmentation checkpoint")
    import models
    model = models.build_model(**{**prepared.arch, **overrides})
    load_checkpoint(model, prepared, log=log)
    model.eval()
    return model


def describe(source):
    """A few lines on what a checkpoint is: layout, kind, build options, tensors, dropped keys."""
    prepared = Prepared(source)
    lines = [f"{prepared.path}", f"  layout: {prepared.layout.name} ({prepared.layout.description}), "
             f"{prepared.layout.kind}", f"  tensors: {len(prepared.state)} "
             f"({sum(v.size for v in prepared.state.values()) / 1e6:.2f} M values)",
             f"  build options: {prepared.arch}"]
    if prepared.classifier:
        lines.append(f"  ImageNet classifier: {', '.join(sorted(prepared.classifier))}")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys
    # run as a script this file is __main__; use the importable module so exception classes match
    from utils.checkpoint import CheckpointError, describe  # noqa: F811
    if len(sys.argv) < 2:
        sys.exit("usage: python -m utils.checkpoint FILE_URL_OR_ZOO_NAME ...")
    status = 0
    for item in sys.argv[1:]:
        try:
            print(describe(item))
        except CheckpointError as err:
            print(f"{item}: {err}", file=sys.stderr)
            status = 2
    sys.exit(status)
