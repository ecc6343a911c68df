"""Safe readers for the pickled files of the face-modelling world.

FLAME's `generic_model.pkl` (2020) was pickled under Python 2 with chumpy objects inside; DECA/MICA
landmark embeddings are `.npy` files holding a pickled dict; MICA's dataset index is a pickled dict saved
with `np.save`. Plain `pickle.load` on any of them executes whatever the file names, and needs chumpy
installed. `safe_load_pickle` instead resolves only an allow-list of classes (numpy arrays and scalars,
scipy sparse matrices, builtin containers) and turns chumpy objects into plain arrays, so no code from a
file ever runs and chumpy is never needed.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SafeLoadError", "safe_load_pickle", "safe_load_npy_object", "ChumpyStub", "file_sha256"]


class SafeLoadError(ValueError):
    """A file could not be read safely; the message names the file and the reason."""


class ChumpyStub:
    """Stand-in for any chumpy class: keeps the pickled state; `to_array` returns its value `x`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args = args
        self._state: Any = None

    def __setstate__(self, state: Any) -> None:
        self._state = state

    def to_array(self) -> np.ndarray:
        state = self._state
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            merged: dict = {}
            for part in state:
                if isinstance(part, dict):
                    merged.update(part)
            state = merged
        if isinstance(state, dict) and "x" in state:
            return np.asarray(_plain(state["x"]))
        raise SafeLoadError(
            "a chumpy object in the file has no plain value 'x' (a derived chumpy expression?); "
            "re-export the model with its arrays materialised"
        )


# (module, name) pairs the unpickler may resolve. Everything else is refused.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "object"): object,
    ("__builtin__", "object"): object,
    ("collections", "OrderedDict"): dict,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): __import__("codecs").encode,  # protocol-2 pickles of bytes
}


def _numpy_reconstruct() -> Any:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2

    return _reconstruct


def _numpy_scalar() -> Any:
    from numpy._core.multiarray import scalar

    return scalar


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    # copyreg._reconstructor restricted to the classes that find_class already allowed.
    if base is object:
        return object.__new__(cls)
    return base.__new__(cls, state)


def _sparse(name: str) -> Any:
    import scipy.sparse as sp

    return getattr(sp, name)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # Python 2 name, written by protocol <= 2 pickles
            module = "builtins"
        if module.split(".")[0] == "chumpy":
            return ChumpyStub
        if (module, name) in (("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")):
            return _numpy_reconstruct()
        if (module, name) in (("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")):
            return _numpy_scalar()
        if name == "_frombuffer" and module in ("numpy.core.numeric", "numpy._core.numeric"):
            from numpy._core.numeric import _frombuffer  # protocol-5 pickles of arrays

            return _frombuffer
        if (module, name) in (("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor")):
            return _reconstructor
        if module.startswith("scipy.sparse") and name in (
            "csc_matrix", "csr_matrix", "coo_matrix", "csc_array", "csr_array", "coo_array"
        ):
            return _sparse(name)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load class {module}.{name}")


def _plain(obj: Any) -> Any:
    """Turn chumpy stubs into arrays, recursively through containers."""
    if isinstance(obj, ChumpyStub):
        return obj.to_array()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    return obj


def _loads(data: bytes, source: str) -> Any:
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except SafeLoadError as err:
        raise SafeLoadError(f"{source}: {err}") from None
    except pickle.UnpicklingError as err:
        raise SafeLoadError(f"{source}: not a readable pickle ({err})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError,
            ImportError, UnicodeDecodeError, OverflowError, RecursionError) as err:
        raise SafeLoadError(f"{source}: truncated or corrupt pickle ({type(err).__name__}: {err})") from None
    try:
        return _plain(obj)
    except SafeLoadError as err:
        raise SafeLoadError(f"{source}: {err}") from None


def safe_load_pickle(path: str | Path) -> Any:
    """Load a pickle without executing code from it.

    Chumpy objects become numpy arrays; scipy sparse matrices stay sparse. Raises `FileNotFoundError`
    for a missing file and `SafeLoadError` (naming the file) for anything unreadable or not allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = path.read_bytes()
    if not data:
        raise SafeLoadError(f"{path}: empty file")
    return _loads(data, str(path))


def safe_load_npy_object(path: str | Path) -> Any:
    """Load an `.npy` written by `np.save(obj)` of a Python object (a dict, typically) safely.

    The object array's pickled payload goes through the restricted unpickler. Plain numeric arrays load
    with `allow_pickle=False`. Returns the object itself (`arr[()]` for 0-d object arrays).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            if not dtype.hasobject:
                fh.seek(0)
                return np.load(fh, allow_pickle=False)
            payload = fh.read()
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as err:
        raise SafeLoadError(f"{path}: not a readable .npy file ({err})") from None
    if zipfile.is_zipfile(io.BytesIO(payload)):
        raise SafeLoadError(f"{path}: unexpected zip payload in .npy")
    arr = _loads(payload, str(path))
    if isinstance(arr, np.ndarray) and arr.dtype == object and arr.shape == ():
        return arr[()]
    return arr


def file_sha256(path: str | Path, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (checkpoint and weight identities). Missing file: FileNotFoundError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file_sha256: no such file {path}")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()
