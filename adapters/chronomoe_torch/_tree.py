"""A checkpoint's tree as (JSON skeleton, flat dict of tensors): the encoding behind
``meta.json`` and ``tensors.safetensors``, and bitwise tree equality.

Trees: nested dict / list / tuple of torch tensors (any dtype, any layout; non-contiguous and
storage-sharing tensors are written as their values; identical aliases, e.g. tied weights, are
written once and come back as one tensor), numpy arrays and scalars, Python int (any size),
float (inf/nan too), bool, str, bytes, None, torch.Size and torch.dtype. Dict keys are str or
int (torch optimizer state_dicts use int keys); tuples stay tuples; OrderedDict stays
OrderedDict with its ``_metadata`` (module versions that ``load_state_dict`` reads).

Skeleton: JSON scalars stand for themselves; everything else is a node ``{"t": tag, ...}``:
"tensor" / "ndarray" / "npscalar" (a ``key`` into the tensor dict, dtype, shape; dtypes that
safetensors cannot store, and every numpy array, are stored as raw uint8 bytes), "int" (beyond
2**53, as a decimal string), "float" (nan/inf), "bytes" (base64), "dtype", "size", "list",
"tuple", "dict" / "odict" (``items`` as [key, node] pairs, optional ``metadata``). Decoding
accepts only these tags: nothing is ever unpickled or imported.
"""

from __future__ import annotations

import base64
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

import safetensors.torch

from ._ckpt_format import META_FILE, TENSORS_FILE, CheckpointCorruptError, CheckpointError

_SAFE_DTYPES = frozenset(safetensors.torch._TYPES.values())  # dtypes safetensors stores natively
_JSON_SAFE_INT = 2 ** 53  # larger ints are written as decimal strings (exact in every reader)


# ----------------------------------------------------------------------------------------
# tree <-> (JSON skeleton, flat tensor dict)
# ----------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fmt_path(parts: tuple) -> str:
    return "tree" + "".join(f"[{p!r}]" for p in parts)


def _key_part(k: Any) -> str:
    # JSON-pointer escaping keeps keys unique when dict keys themselves contain "/".
    return str(k).replace("~", "~0").replace("/", "~1")


class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._alias: dict[tuple, str] = {}
        self._storages: set[tuple] = set()

    def _new_key(self, parts: tuple) -> str:
        base = "/".join(_key_part(p) for p in parts) or "<root>"
        key, n = base, 1
        while key in self.tensors:  # int key 1 and str key "1" would otherwise collide
            n += 1
            key = f"{base}~{n}"
        return key

    def tensor(self, t: torch.Tensor, parts: tuple) -> dict:
        where = _fmt_path(parts)
        if t.layout != torch.strided:
            raise TypeError(f"save_state: {where} is a {t.layout} tensor; only dense (strided) "
                            f"tensors can be saved; convert it with .to_dense() first")
        if t.is_quantized or t.is_nested or t.device.type == "meta":
            raise TypeError(f"save_state: {where} is a quantized, nested or meta tensor, which "
                            f"cannot be saved")
        t = t.detach()
        alias = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                 tuple(t.stride()), t.dtype) if t.numel() else None
        if alias is not None and alias in self._alias:
            key = self._alias[alias]
            return {"t": "tensor", "key": key, "dtype": _dtype_name(t.dtype),
                    "shape": list(t.shape), "raw": self.tensors[key].dtype != t.dtype}
        c = t.to("cpu").contiguous()
        storage = c.untyped_storage().data_ptr()
        if c.numel() and storage in self._storages:
            c = c.clone()  # safetensors refuses tensors that share memory
        if c.numel():
            self._storages.add(c.untyped_storage().data_ptr())
        raw = t.dtype not in _SAFE_DTYPES
        if raw:  # e.g. complex128, float8_e8m0: store the bytes, keep the dtype in meta.json
            c = c.reshape(-1).view(torch.uint8) if c.numel() else torch.empty(0, dtype=torch.uint8)
        key = self._new_key(parts)
        self.tensors[key] = c
        if alias is not None:
            self._alias[alias] = key
        return {"t": "tensor", "key": key, "dtype": _dtype_name(t.dtype),
                "shape": list(t.shape), "raw": raw}

    def ndarray(self, a: np.ndarray, parts: tuple, tag: str) -> dict:
        where = _fmt_path(parts)
        if a.dtype.kind not in "biufcSUmM" or a.dtype.fields is not None:
            raise TypeError(f"save_state: {where} is a numpy array of dtype {a.dtype}; only "
                            f"numeric, bool, bytes/str and datetime arrays can be saved "
                            f"(object arrays would need pickle)")
        data = np.frombuffer(np.ascontiguousarray(a).tobytes(), dtype=np.uint8).copy()
        key = self._new_key(parts)
        self.tensors[key] = torch.from_numpy(data)
        return {"t": tag, "key": key, "dtype": a.dtype.str, "shape": list(a.shape)}

    def encode(self, obj: Any, parts: tuple = ()) -> Any:
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            obj = int(obj)  # int subclasses (IntEnum) are written as plain ints
            return obj if abs(obj) < _JSON_SAFE_INT else {"t": "int", "v": str(obj)}
        if isinstance(obj, float):
            if math.isfinite(obj):
                return float(obj)  # repr round-trips every finite double exactly (incl. -0.0)
            return {"t": "float", "v": repr(float(obj))}  # 'nan', 'inf', '-inf'
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj, parts)
        if isinstance(obj, np.ndarray):
            return self.ndarray(obj, parts, "ndarray")
        if isinstance(obj, np.generic):
            return self.ndarray(np.asarray(obj), parts, "npscalar")
        if isinstance(obj, (bytes, bytearray)):
            return {"t": "bytes", "v": base64.b64encode(bytes(obj)).decode("ascii")}
        if isinstance(obj, torch.dtype):
            return {"t": "dtype", "v": _dtype_name(obj)}
        if isinstance(obj, torch.Size):
            return {"t": "size", "v": [int(d) for d in obj]}
        if isinstance(obj, dict):
            items = []
            for k, v in obj.items():
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise TypeError(f"save_state: {_fmt_path(parts)} has a key {k!r} of type "
                                    f"{type(k).__name__}; dict keys must be str or int")
                items.append([k if isinstance(k, str) else int(k), self.encode(v, parts + (k,))])
            node: dict[str, Any] = {"t": "odict" if isinstance(obj, OrderedDict) else "dict",
                                    "items": items}
            md = getattr(obj, "_metadata", None)
            if md is not None:  # nn.Module.state_dict() version info
                node["metadata"] = self.encode(dict(md), parts + ("<_metadata>",))
            return node
        if type(obj) is list or type(obj) is tuple:
            return {"t": "list" if type(obj) is list else "tuple",
                    "items": [self.encode(v, parts + (i,)) for i, v in enumerate(obj)]}
        raise TypeError(f"save_state: {_fmt_path(parts)} is a {type(obj).__module__}."
                        f"{type(obj).__qualname__}; a tree holds only dict/list/tuple, torch "
                        f"tensors, numpy arrays/scalars, int, float, bool, str, bytes, None, "
                        f"torch.Size and torch.dtype (convert dataclasses and namedtuples to "
                        f"dicts)")


class _Decoder:
    def __init__(self, tensors: dict[str, torch.Tensor], file: Path, device: Any) -> None:
        self.tensors, self.file, self.device = tensors, file, device
        self.used: set[str] = set()
        self._cache: dict[str, torch.Tensor] = {}

    def fail(self, what: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(f"checkpoint file {self.file}: {what}")

    def _stored(self, node: dict) -> torch.Tensor:
        key = node.get("key")
        if not isinstance(key, str) or key not in self.tensors:
            raise self.fail(f"references tensor {key!r}, which is not in {TENSORS_FILE}")
        self.used.add(key)
        return self.tensors[key]

    def _shape(self, node: dict) -> tuple[int, ...]:
        shape = node.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise self.fail(f"bad shape {shape!r} for tensor {node.get('key')!r}")
        return tuple(shape)

    def tensor(self, node: dict) -> torch.Tensor:
        key = node.get("key")
        if key in self._cache:  # an alias: the same tensor object, as when it was saved
            return self._cache[key]
        stored, shape = self._stored(node), self._shape(node)
        dtype = getattr(torch, str(node.get("dtype")), None)
        if not isinstance(dtype, torch.dtype):
            raise self.fail(f"unknown dtype {node.get('dtype')!r} for tensor {key!r}")
        if node.get("raw"):
            nbytes = math.prod(shape) * dtype.itemsize
            if stored.dtype != torch.uint8 or stored.numel() != nbytes:
                raise self.fail(f"tensor {key!r}: {stored.numel()} raw bytes, expected {nbytes} "
                                f"for {dtype} of shape {list(shape)}")
            t = stored.view(dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)
        else:
            if stored.dtype != dtype or tuple(stored.shape) != shape:
                raise self.fail(f"tensor {key!r} is {_dtype_name(stored.dtype)} "
                                f"{list(stored.shape)} in {TENSORS_FILE} but "
                                f"{_dtype_name(dtype)} {list(shape)} in {META_FILE}")
            t = stored
        if self.device is not None and t.device != torch.device(self.device):
            t = t.to(self.device)
        self._cache[key] = t
        return t

    def ndarray(self, node: dict) -> np.ndarray:
        stored, shape = self._stored(node), self._shape(node)
        try:
            dtype = np.dtype(str(node.get("dtype")))
        except TypeError as e:
            raise self.fail(f"bad numpy dtype {node.get('dtype')!r}: {e}") from None
        if dtype.kind not in "biufcSUmM" or dtype.fields is not None:
            raise self.fail(f"numpy dtype {dtype} is not allowed")
        nbytes = math.prod(shape) * dtype.itemsize
        if stored.dtype != torch.uint8 or stored.numel() != nbytes:
            raise self.fail(f"array {node.get('key')!r}: {stored.numel()} bytes, expected "
                            f"{nbytes} for {dtype} of shape {list(shape)}")
        return np.frombuffer(stored.numpy().tobytes(), dtype=dtype).reshape(shape).copy()

    def decode(self, node: Any) -> Any:
        if node is None or isinstance(node, (bool, str, int, float)):
            return node
        if not isinstance(node, dict):
            raise self.fail(f"unexpected JSON value of type {type(node).__name__} in the tree")
        tag = node.get("t")
        try:
            if tag == "tensor":
                return self.tensor(node)
            if tag == "ndarray":
                return self.ndarray(node)
            if tag == "npscalar":
                return self.ndarray(node)[()]
            if tag == "int":
                return int(node["v"])
            if tag == "float":
                if node["v"] not in ("nan", "inf", "-inf"):
                    raise ValueError(f"non-finite float {node['v']!r}")
                return float(node["v"])
            if tag == "bytes":
                return base64.b64decode(node["v"], validate=True)
            if tag == "dtype":
                dt = getattr(torch, node["v"], None)
                if not isinstance(dt, torch.dtype):
                    raise ValueError(f"unknown torch dtype {node['v']!r}")
                return dt
            if tag == "size":
                return torch.Size([int(d) for d in node["v"]])
            if tag in ("list", "tuple"):
                items = [self.decode(v) for v in node["items"]]
                return items if tag == "list" else tuple(items)
            if tag in ("dict", "odict"):
                out: dict = OrderedDict() if tag == "odict" else {}
                for k, v in node["items"]:
                    if isinstance(k, bool) or not isinstance(k, (str, int)):
                        raise ValueError(f"bad dict key {k!r}")
                    out[k] = self.decode(v)
                if "metadata" in node:
                    out._metadata = self.decode(node["metadata"])  # type: ignore[attr-defined]
                return out
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise self.fail(f"malformed {tag!r} node in the tree "
                            f"({type(e).__name__}: {e})") from None
        raise self.fail(f"unknown node type {tag!r} in the tree (only data types are allowed; "
                        f"nothing is ever unpickled or imported)")



# ----------------------------------------------------------------------------------------
# equality
# ----------------------------------------------------------------------------------------
def trees_equal(a: Any, b: Any) -> bool:
    """Bitwise equality of two trees: same container types and keys, same tensor dtypes,
    shapes and bytes (NaN equals NaN with the same bits), same scalars."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.numel() == 0:
            return True
        a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
        # compare the bytes (NaN payloads, -0.0), single-threaded (no intra-op pool)
        return np.array_equal(a.reshape(-1).view(torch.uint8).numpy(),
                              b.reshape(-1).view(torch.uint8).numpy())
    if isinstance(a, (np.ndarray, np.generic)) or isinstance(b, (np.ndarray, np.generic)):
        if type(a) is not type(b):
            return False
        a, b = np.asarray(a), np.asarray(b)
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, (bytes, bytearray)) or isinstance(b, (bytes, bytearray)):
        return isinstance(a, (bytes, bytearray)) and isinstance(b, (bytes, bytearray)) \
            and bytes(a) == bytes(b)
    if isinstance(a, dict):
        if not isinstance(b, dict) or isinstance(a, OrderedDict) != isinstance(b, OrderedDict):
            return False
        if list(a.keys()) != list(b.keys()) or any(type(k1) is not type(k2)
                                                   for k1, k2 in zip(a, b)):
            return False
        return all(trees_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return False
        return all(trees_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b) or (a != a and b != b)
    if type(a) is not type(b) and not (isinstance(a, int) and isinstance(b, int)
                                       and not isinstance(a, bool) and not isinstance(b, bool)):
        return False
    return a == b
