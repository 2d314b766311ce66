"""ggml's own C quantizer and dequantizer, through ctypes, from the library that llama-cpp-python
ships (tests and benchmarks only; None where it is not installed)."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

import numpy as np


class _Traits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


class GGML:
    """``quantize(float32 (rows, n), type) -> bytes (rows, row bytes)`` and ``dequantize`` by ggml's C code."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]

    def row_bytes(self, qtype: int, n: int) -> int:
        t = self.lib.ggml_get_type_traits(int(qtype)).contents
        return n // t.blck_size * t.type_size

    def quantize(self, x: np.ndarray, qtype: int) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, n = x.shape
        out = np.zeros((rows, self.row_bytes(qtype, n)), dtype=np.uint8)
        imatrix = np.ones(n, dtype=np.float32)
        im = imatrix.ctypes.data if self.lib.ggml_quantize_requires_imatrix(int(qtype)) else None
        self.lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, n, im)
        return out

    def dequantize(self, raw: np.ndarray, qtype: int, n: int) -> np.ndarray:
        t = self.lib.ggml_get_type_traits(int(qtype)).contents
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        rows = raw.shape[0]
        out = np.zeros((rows, n), dtype=np.float32)
        fn = _TO_FLOAT(t.to_float)
        fn(raw.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), rows * n)
        return out


def load() -> Optional[GGML]:
    """ggml from llama-cpp-python's wheel, or None."""
    try:
        import llama_cpp
    except ImportError:
        return None
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (lib_dir / name).exists():
            return GGML(ctypes.CDLL(str(lib_dir / name)))
    return None
