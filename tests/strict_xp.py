"""A stand-in "device" array module for CPU tests: NumPy underneath, but like CuPy it refuses implicit conversion
to NumPy, so a stray ``np.`` call, a NumPy array mixed into device arithmetic or a NumPy index on a device array
fails a test here instead of on a customer's GPU.

- ``strict.asarray(host)`` moves data to the "device" (explicit, allowed); ``array.get()``, ``.item()``,
  ``.tolist()`` and ``.tobytes()`` bring it back (explicit, recorded in ``TRANSFERS``); ``float()``/``int()``/
  ``bool()`` of a 0-d array are allowed (CuPy syncs and allows them too; since CuPy 13 not of a 1-d array of one
  element), and a device array is no index (``range(n)``, ``a[:n]``: CuPy has no ``__index__``, a transfer).
- ``np.asarray(device)``, ``np.concatenate([device, ...])``, ``device + host_array``, ``device[host_index]`` raise
  ``TypeError``.
- Reductions return 0-d device arrays, as CuPy's do.
- Only what CuPy has: ``strict.<name>`` and ``array.<name>`` refuse the NumPy functions and array methods that CuPy
  lacks (``np.errstate``, ``np.nanpercentile``, ``ndarray.resize``, ...), by the names in ``fixtures/cupy_names.json``
  (the public names of ``dir(cupy)`` and ``dir(cupy.ndarray)`` that CuPy 13.6 and 14.2, the GPU image's, both have).
"""

from __future__ import annotations

import json
import operator
import types
from pathlib import Path

import numpy as np

_CUPY = json.loads((Path(__file__).parent / "fixtures" / "cupy_names.json").read_text())
CUPY_MODULE_NAMES = frozenset(_CUPY["module"])
CUPY_ARRAY_NAMES = frozenset(_CUPY["ndarray"])
CUPY_VERSIONS = " and ".join(_CUPY["cupy_versions"])


class NotInCuPy(AttributeError):
    pass

TRANSFERS: list[tuple[int, ...]] = []  # shapes of the arrays brought back to the host with .get()


class ImplicitTransfer(TypeError):
    pass


def _unwrap(value, allow_host: bool = False):
    if isinstance(value, StrictArray):
        return value._a
    if isinstance(value, np.ndarray) and not allow_host:
        raise ImplicitTransfer(f"a NumPy array {value.dtype}{list(value.shape)} mixed with device arrays: move it "
                               "to the device with xp.asarray first")
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v, allow_host) for v in value)
    if isinstance(value, dict):
        return {k: _unwrap(v, allow_host) for k, v in value.items()}
    return value


def _wrap(value):
    if isinstance(value, (np.ndarray, np.generic)):
        return StrictArray(np.asarray(value))
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


class StrictArray:
    __slots__ = ("_a",)
    __array_ufunc__ = None  # NumPy ufuncs refuse it

    def __init__(self, array: np.ndarray):
        self._a = array

    def __array__(self, *args, **kwargs):
        raise ImplicitTransfer("implicit conversion of a device array to NumPy: call .get() (or K.to_numpy) "
                               "where data is meant to leave the device")

    def __array_function__(self, func, types_, args, kwargs):
        return NotImplemented  # np.<function>(device array) raises TypeError

    def __array_namespace__(self, api_version=None):
        return strict

    def get(self) -> np.ndarray:
        TRANSFERS.append(tuple(self._a.shape))
        return self._a.copy()

    def item(self, *args):
        TRANSFERS.append(tuple(self._a.shape))
        return self._a.item(*args)

    def tolist(self):
        TRANSFERS.append(tuple(self._a.shape))
        return self._a.tolist()

    def tobytes(self, *args, **kwargs):
        TRANSFERS.append(tuple(self._a.shape))
        return self._a.tobytes(*args, **kwargs)

    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    T = property(lambda self: StrictArray(self._a.T))

    def __getattr__(self, name):
        if name.startswith("__"):  # __array_interface__, __array_struct__, ...: NumPy would read the data directly
            raise AttributeError(name)
        if name not in CUPY_ARRAY_NAMES:
            raise NotInCuPy(f"cupy.ndarray has no .{name} (CuPy {CUPY_VERSIONS}): a NumPy-only method")
        attr = getattr(self._a, name)
        if callable(attr):
            return lambda *args, **kwargs: _wrap(attr(*_unwrap(args), **_unwrap(kwargs)))
        return _wrap(attr)

    def __getitem__(self, index):
        return _wrap(self._a[_unwrap(index)])

    def __setitem__(self, index, value):
        self._a[_unwrap(index)] = _unwrap(value)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (StrictArray(np.asarray(v)) for v in self._a)

    def _scalar(self, kind):
        if self._a.ndim != 0:
            raise TypeError(f"only 0-d device arrays convert to {kind.__name__} (CuPy 13 refuses shape "
                            f"{list(self._a.shape)})")
        return kind(self._a[()])

    def __float__(self):
        return self._scalar(float)

    def __int__(self):
        return self._scalar(int)

    def __index__(self):
        raise ImplicitTransfer("a device array used as an index or a count (range, slice bounds): CuPy refuses it "
                               "(a transfer back); take int(...) of a 0-d array, or keep the count on the host")

    def __bool__(self):
        return self._scalar(bool)

    def __repr__(self):
        return f"StrictArray({self._a!r})"


def _binary(op, reflected=False):
    def method(self, other):
        a, b = self._a, _unwrap(other)
        return _wrap(op(b, a) if reflected else op(a, b))
    return method


for _name, _op in [("add", operator.add), ("sub", operator.sub), ("mul", operator.mul),
                   ("truediv", operator.truediv), ("floordiv", operator.floordiv), ("mod", operator.mod),
                   ("pow", operator.pow), ("matmul", operator.matmul), ("and", operator.and_),
                   ("or", operator.or_), ("xor", operator.xor)]:
    setattr(StrictArray, f"__{_name}__", _binary(_op))
    setattr(StrictArray, f"__r{_name}__", _binary(_op, reflected=True))
for _name, _op in [("lt", operator.lt), ("le", operator.le), ("gt", operator.gt), ("ge", operator.ge),
                   ("eq", operator.eq), ("ne", operator.ne)]:
    setattr(StrictArray, f"__{_name}__", _binary(_op))
StrictArray.__neg__ = lambda self: StrictArray(-self._a)
StrictArray.__invert__ = lambda self: StrictArray(~self._a)
StrictArray.__abs__ = lambda self: StrictArray(abs(self._a))
StrictArray.__hash__ = None


class _StrictModule(types.ModuleType):
    """NumPy's functions over StrictArrays; ``asarray``/``array`` also take host data (the explicit move)."""

    def __getattr__(self, name):
        if not name.startswith("__") and name not in CUPY_MODULE_NAMES:
            raise NotInCuPy(f"cupy has no {name} (CuPy {CUPY_VERSIONS}): a NumPy-only function")
        attr = getattr(np, name)
        if isinstance(attr, type) or not callable(attr):
            return attr  # dtypes, constants
        allow_host = name in ("asarray", "array", "ascontiguousarray")

        def call(*args, **kwargs):
            return _wrap(attr(*_unwrap(args, allow_host), **_unwrap(kwargs, allow_host)))
        call.__name__ = name
        return call


strict = _StrictModule("strict_xp")


def to_device(array) -> StrictArray:
    return strict.asarray(array)
