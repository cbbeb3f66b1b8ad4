"""Disk-backed tensors: what a later stage needs is written to safetensors as it is made and read
back one tensor at a time, so no stage holds every layer of every task in memory.

* ``TensorWriter``: writes a safetensors file tensor by tensor (the data goes to a side file as
  each tensor arrives; the header and data are joined at ``close``). Memory: one tensor.
* ``LazyTensors``: a read-only ``Mapping`` over a safetensors file; ``t[name]`` reads that one
  tensor (``slice(name, a, b)`` only rows ``a:b``). Memory: the tensors the caller holds.

Both speak the plain safetensors format (8-byte little-endian header length, a JSON header with
``dtype``/``shape``/``data_offsets`` and ``__metadata__``, then the data in offset order), so
every file they write loads with ``safetensors.safe_open`` and ``load_file``.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from circuitq.errors import UsageError

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


class TensorWriter:
    """Write ``path`` (safetensors) one tensor at a time: ``w[name] = tensor`` (or ``add``), then
    ``close(metadata)``. A name may be written once. Use as a context manager: on an exception the
    partial files are removed and nothing is left at ``path``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._data_path = self.path.with_name(self.path.name + ".data")
        self._data = self._data_path.open("wb")
        self._header: dict[str, dict] = {}
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._header:
            raise ValueError(f"{self.path}: tensor {name!r} written twice")
        t = tensor.detach().contiguous().cpu()
        if t.dtype not in _DTYPES:
            raise TypeError(f"{self.path}: dtype {t.dtype} of {name!r} cannot be stored")
        n = t.numel() * t.element_size()
        if n:
            self._data.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))   # no copy of the tensor
        self._header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self._offset, self._offset + n]}
        self._offset += n

    __setitem__ = add

    def __contains__(self, name: str) -> bool:
        return name in self._header

    def close(self, metadata: dict[str, str] | None = None) -> Path:
        """Join header and data into ``path``; returns it."""
        self._data.close()
        header = dict(self._header)
        if metadata:
            header["__metadata__"] = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with self.path.open("wb") as out, self._data_path.open("rb") as data:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            shutil.copyfileobj(data, out, 1 << 22)
        self._data_path.unlink()
        return self.path

    def abort(self) -> None:
        self._data.close()
        for p in (self._data_path, self.path):
            if p.exists():
                p.unlink()

    def __enter__(self) -> "TensorWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._data.closed:
            self.close()


_FROM = {v: k for k, v in _DTYPES.items()}


class LazyTensors(Mapping):
    """``{name: tensor}`` over a safetensors file, read on demand with plain file reads (each
    access reads from disk: hold what you reuse). Nothing is memory-mapped, so the process's
    resident memory is what it holds, not the pages of the file it has touched. ``prefix`` exposes
    only ``PREFIX/name`` keys, under ``name``; ``device`` moves each tensor there as it is read."""

    def __init__(self, path: str | Path, prefix: str | None = None, device=None):
        self.path = Path(path)
        with self.path.open("rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                raise UsageError(f"{self.path} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000:
                raise UsageError(f"{self.path} is not a safetensors file (header of {n} bytes)")
            header = json.loads(fh.read(n))
        self._start = 8 + n
        self._meta = header.pop("__metadata__", None) or {}
        self._hdr = header
        self.prefix = f"{prefix}/" if prefix else ""
        self.device = device
        self._keys = [k[len(self.prefix):] for k in header if k.startswith(self.prefix)]
        self._ks = set(self._keys)

    def metadata(self) -> dict[str, str]:
        return dict(self._meta)

    def _read(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        info = self._hdr[key]
        dtype, shape = _FROM[info["dtype"]], list(info["shape"])
        b0, b1 = info["data_offsets"]
        if start is not None:
            row = (b1 - b0) // max(shape[0], 1)
            start, stop = max(0, start), min(shape[0], stop)
            stop = max(start, stop)
            b0, b1, shape[0] = b0 + start * row, b0 + stop * row, stop - start
        t = torch.empty(shape, dtype=dtype)
        if b1 > b0:
            with self.path.open("rb") as fh:
                fh.seek(self._start + b0)
                got = fh.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            if got != b1 - b0:
                raise UsageError(f"{self.path}: tensor {key!r} is truncated ({got} of {b1 - b0} bytes)")
        return t.to(self.device) if self.device is not None else t

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._ks:
            raise KeyError(name)
        return self._read(self.prefix + name)

    def slice(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``name`` (only those bytes are read)."""
        return self._read(self.prefix + name, start, stop)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._hdr[self.prefix + name]["shape"])

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, name) -> bool:
        return name in self._ks


class ParameterBackup:
    """The values of some parameters of a model, kept on disk so the model can be changed in place
    (quantized for one evaluation) and restored exactly, without a second copy in memory (a deep
    copy costs ``4P`` bytes; this costs one tensor of memory and ``bytes(names)`` of disk).
    ``restore()`` copies every saved value back; ``close()`` deletes the file."""

    def __init__(self, model: torch.nn.Module, names, path: str | Path):
        self.model, self.path = model, Path(path)
        self.names = list(names)
        with TensorWriter(self.path) as w:
            for n in self.names:
                w[n] = model.get_parameter(n).detach()
            w.close({"format": "circuitq.parameter-backup"})
        self._saved = LazyTensors(self.path)

    @torch.no_grad()
    def restore(self) -> None:
        for n in self.names:
            p = self.model.get_parameter(n)
            if tuple(p.shape) != self._saved.shape(n):
                raise RuntimeError(f"{n} changed shape; cannot restore it")
            p.data.copy_(self._saved[n].to(p.device, p.dtype))

    def saved(self, name: str) -> torch.Tensor:
        """The saved value of parameter ``name`` (read from disk)."""
        return self._saved[name]

    def close(self) -> None:
        self._saved = None
        if self.path.exists():
            os.remove(self.path)


def file_bytes(path: str | Path) -> int:
    return os.path.getsize(path)


@contextmanager
def replaced(model, entries: dict[str, torch.Tensor], values: dict[str, torch.Tensor]):
    """Inside the block, ``model``'s entries (``{name: [out, in] bool}``) hold ``values``; they are
    restored bit for bit afterwards."""
    saved = {}
    try:
        with torch.no_grad():
            for n, m in entries.items():
                p = model.get_parameter(n)
                saved[n] = p.data.clone()
                m = m.to(p.device)
                p.data[m] = values[n].to(p.device, p.dtype)[m]
        yield model
    finally:
        with torch.no_grad():
            for n, old in saved.items():
                model.get_parameter(n).data.copy_(old)
