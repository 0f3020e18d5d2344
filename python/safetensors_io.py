"""Minimal reader/writer for the safetensors file format (numpy only).

Format (https://github.com/huggingface/safetensors):
  * 8 bytes: little-endian uint64 N, the length of the JSON header;
  * N bytes: UTF-8 JSON object {name: {"dtype", "shape", "data_offsets": [begin, end]}, ...}
    with an optional "__metadata__": {str: str}; padded with spaces so that the
    data section starts at a multiple of 8 bytes;
  * the raw little-endian tensor data; offsets are relative to the start of the
    data section. This writer lays tensors out contiguously in header order.

Supported dtypes: F32, F16, BF16, I32, I64 (and F64, I8, U8, BOOL for completeness).
numpy has no bfloat16, so BF16 tensors are carried as uint16 arrays holding the raw
bit patterns: pass ``uint16`` arrays to ``save_file`` to write BF16, and ``load_file``
returns BF16 tensors as ``uint16`` arrays (use ``bf16_bits_to_float32`` to widen them
exactly). FP8 tensors (F8_E4M3, F8_E5M2) are carried as uint8 arrays of their bytes:
wrap them in ``Raw(array, "F8_E4M3")`` to write them; ``load_file`` returns them as uint8.
The package ``safetensors`` is deliberately not used.
"""

import json
import struct

import numpy as np

# numpy dtype <-> safetensors dtype string. uint16 means "BF16 bit patterns".
_NP_TO_ST = {
    np.dtype("<f4"): "F32",
    np.dtype("<f2"): "F16",
    np.dtype("<u2"): "BF16",
    np.dtype("<i4"): "I32",
    np.dtype("<i8"): "I64",
    np.dtype("<f8"): "F64",
    np.dtype("i1"): "I8",
    np.dtype("u1"): "U8",
    np.dtype("bool"): "BOOL",
}
_ST_TO_NP = {v: k for k, v in _NP_TO_ST.items()}
_ST_TO_NP.update({"F8_E4M3": np.dtype("u1"), "F8_E5M2": np.dtype("u1")})


class Raw:
    """An array written under an explicit safetensors dtype (its bytes as they are)."""

    def __init__(self, array, st_dtype):
        self.array = np.ascontiguousarray(array)
        self.st_dtype = st_dtype
        assert self.array.dtype.itemsize == _ST_TO_NP[st_dtype].itemsize, st_dtype

    @property
    def nbytes(self):
        return self.array.nbytes


def float32_to_bf16_bits(a):
    """Round float32 values to bfloat16 (round to nearest, ties to even); returns uint16 bits."""
    a = np.ascontiguousarray(a, dtype="<f4")
    u = a.view("<u4").astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    # NaN stays NaN (quiet it), rounding must not turn a NaN into Inf.
    nan = np.isnan(a)
    rounded = np.where(nan, (u >> 16) | 0x40, rounded)
    return rounded.astype("<u2")


def bf16_bits_to_float32(bits):
    """Widen bfloat16 bit patterns (uint16) to float32 exactly."""
    bits = np.ascontiguousarray(bits, dtype="<u2")
    return (bits.astype("<u4") << 16).view("<f4")


def save_file(tensors, path, metadata=None):
    """Write ``tensors`` (dict name -> numpy array, in the order given) to ``path``.

    uint16 arrays are written as BF16. ``metadata`` is an optional dict of str -> str.
    """
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs = []
    offset = 0
    for name, arr in tensors.items():
        if name == "__metadata__":
            raise ValueError("tensor name __metadata__ is reserved")
        st_dtype = None
        if isinstance(arr, Raw):
            arr, st_dtype = arr.array, arr.st_dtype
        arr = np.asarray(arr)
        dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        if dt not in _NP_TO_ST:
            raise TypeError(f"{name}: unsupported dtype {arr.dtype}")
        data = np.ascontiguousarray(arr, dtype=dt).tobytes()
        header[name] = {
            "dtype": st_dtype or _NP_TO_ST[dt],
            "shape": [int(s) for s in arr.shape],
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * ((-len(hjson)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for b in blobs:
            f.write(b)


def read_header(path):
    """Return (header dict without __metadata__, metadata dict, data start offset)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n).decode("utf-8"))
    metadata = header.pop("__metadata__", {}) or {}
    return header, metadata, 8 + n


def load_file(path):
    """Read a safetensors file. Returns (tensors, dtypes, metadata).

    tensors: dict name -> numpy array (BF16 as uint16 bit patterns), in file header order;
    dtypes: dict name -> safetensors dtype string; metadata: dict str -> str.
    """
    header, metadata, start = read_header(path)
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read()
    tensors, dtypes = {}, {}
    for name, info in header.items():
        st = info["dtype"]
        if st not in _ST_TO_NP:
            raise TypeError(f"{name}: unsupported dtype {st}")
        dt = _ST_TO_NP[st]
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        count = int(np.prod(shape)) if shape else 1
        if end - begin != count * dt.itemsize or end > len(data):
            raise ValueError(f"{name}: data_offsets {begin},{end} do not match shape {shape} {st}")
        tensors[name] = np.frombuffer(data[begin:end], dtype=dt).reshape(shape).copy()
        dtypes[name] = st
    return tensors, dtypes, metadata


def to_float32(arr, st_dtype):
    """Widen a tensor read by ``load_file`` to float32 (exact for F16/BF16)."""
    if st_dtype == "BF16":
        return bf16_bits_to_float32(arr)
    return np.asarray(arr, dtype=np.float32)
