"""Read checkpoint files with numpy alone: PyTorch's zip and legacy (pre-1.6) formats and Jittor
pickles (``jt.save``), as plain dicts / lists of numpy arrays.

``jt.load`` accepts only the .pth/.pt/.bin suffixes for PyTorch files, ignores storage offsets
in the legacy format and, like any plain unpickling, runs whatever code a pickle names. This
reader allows a fixed set of globals (tensors, storages, OrderedDict, numpy arrays) and turns
anything else (e.g. mmcv objects in a checkpoint's "meta") into inert ``Placeholder`` objects,
so a downloaded file cannot run code.
"""
import hashlib
import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint cannot be read, recognised or loaded into the given model."""


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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.state = args, None

    def __setstate__(self, state):
        self.state = state

    # container opcodes (SETITEMS / APPENDS) on a placeholder for a dict or list subclass
    def __setitem__(self, key, value):
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value: Any) -> None:
        self.__dict__.setdefault("values", []).append(value)

    def extend(self, values: Iterable) -> None:
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


def read_file(path: str | os.PathLike) -> Any:
    """The object stored in a checkpoint file (a Jittor pickle or a PyTorch file), tensors as numpy."""
    if zipfile.is_zipfile(path):
        return _read_torch_zip(path)
    if _is_torch_legacy(path):
        return _read_torch_legacy(path)
    return _read_jittor_pickle(path)
