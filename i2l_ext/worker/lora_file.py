"""Writing a LoRA as a safetensors file straight from the tensors' memory.

``safetensors.torch.save_file`` first copies every tensor into a bytes object, then writes them.
A finished LoRA already lies in one page-locked host buffer, tensor after tensor, so here the
header is written and then each run of tensors that follow one another in memory goes out with a
single write (the interpreter lock is let go while the kernel copies): no second copy of up to
hundreds of megabytes.

The file is an ordinary safetensors file: an 8-byte little-endian header length, a JSON header
(``__metadata__`` plus each tensor's dtype, shape and byte range), padded with spaces so the data
begins at a multiple of 8, then the data; wider types first so every tensor starts at a multiple
of its own element size, as ``save_file`` lays them out.
"""
from __future__ import annotations

import json
import os
import sys
import struct

from .weights import _DTYPES

SMALL = 1 << 16                 # pieces under this size are gathered into one write

_NAMES = {torch_name: st_name for st_name, torch_name in _DTYPES.items()}     # torch's name -> safetensors'


def _dtype_name(t) -> str:
    name = str(t.dtype).replace("torch.", "")
    if name not in _NAMES:
        raise ValueError(f"cannot write a tensor of type {name}")
    return _NAMES[name]


def layout(tensors: dict, metadata: dict | None = None) -> tuple[bytes, list]:
    """(the header with its length prefix, the tensors in the order their bytes follow it)."""
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError("safetensors metadata must map strings to strings")
    # Wider elements first (as save_file): every tensor then starts at a multiple of its size.
    order = sorted(tensors, key=lambda k: -tensors[k].element_size())
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    off = 0
    for k in order:
        t = tensors[k]
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _dtype_name(t), "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


def _runs(tensors: list) -> list:
    """The tensors' bytes as flat uint8 tensors; neighbours in the same memory block joined into one."""
    import torch
    runs: list = []                  # [storage, byte offset in it, length]
    for t in tensors:
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        n = t.numel() * t.element_size()
        if n == 0:
            continue
        st, at = t.untyped_storage(), t.storage_offset() * t.element_size()
        last = runs[-1] if runs else None
        if last is not None and last[0].data_ptr() == st.data_ptr() and last[1] + last[2] == at:
            last[2] += n
        else:
            runs.append([st, at, n])
    return [torch.empty(0, dtype=torch.uint8).set_(st, at, (n,)) for st, at, n in runs]


def _writeback_starter():
    """Linux's ``sync_file_range(SYNC_FILE_RANGE_WRITE)``: start writing a range to the disk without
    waiting, so the ``fsync`` at the end waits only for the last piece. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
        fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        return lambda fd, offset, n: fn(fd, offset, n, 2)
    except (OSError, AttributeError):
        return None


_START_WRITEBACK = _writeback_starter()


def write(path: str, tensors: dict, metadata: dict | None = None) -> int:
    """Write ``tensors`` (name -> CPU tensor) and ``metadata`` to ``path`` as safetensors, on the
    disk (``fsync``) when this returns; returns the file's size. The caller writes to a temporary
    name and renames."""
    head, order = layout(tensors, metadata)
    size = len(head)
    with open(path, "wb", buffering=0) as f:
        pending = bytearray(head)     # small pieces (the header, kohya's alpha scalars) go out together
        written = 0

        def put(mv):
            nonlocal written
            done = 0
            while done < len(mv):
                done += f.write(mv[done:])
            if _START_WRITEBACK is not None and len(mv) >= SMALL:
                _START_WRITEBACK(f.fileno(), written, len(mv))
            written += len(mv)
        for run in _runs([tensors[k] for k in order]):
            mv = memoryview(run.numpy()).cast("B")
            size += len(mv)
            if len(mv) < SMALL:
                pending += mv
                continue
            if pending:
                put(memoryview(pending))
                pending = bytearray()
            put(mv)
        if pending:
            put(memoryview(pending))
        os.fsync(f.fileno())
    return size
