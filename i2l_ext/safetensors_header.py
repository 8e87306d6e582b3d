"""The one reader of safetensors headers, for both sides: the Lora library (host) and the weight
files' checks and streaming (worker). Reads the 8-byte length and the JSON header only; never the
tensors, never anything pickled. Standard library only."""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

MAX_HEADER = 100 * 1024 * 1024


class NotSafetensors(ValueError):
    """The file is not a (whole) safetensors file; ``truncated``: its header promises more bytes
    than the file holds (a download cut short)."""

    def __init__(self, reason: str, truncated: bool = False):
        super().__init__(reason)
        self.truncated = truncated


@dataclass
class Header:
    tensors: dict          # name -> {"dtype", "shape", "data_offsets"}
    metadata: dict         # the ``__metadata__`` strings
    data_start: int        # the byte where the tensors' data begins
    size: int              # the file's size

    def shapes(self) -> dict[str, list[int]]:
        return {k: list(v["shape"]) for k, v in self.tensors.items()}


def read(path: str) -> Header:
    """The header of ``path``. Raises ``NotSafetensors`` (with the reason) when it is not one, and
    ``OSError`` when the file cannot be read."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise NotSafetensors("the file is too short")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > min(size - 8, MAX_HEADER):
            raise NotSafetensors("it has no safetensors header")
        raw = f.read(n)
    if not raw.lstrip().startswith(b"{"):
        raise NotSafetensors("it has no safetensors header")
    try:
        header = json.loads(raw)
    except ValueError:                      # UnicodeDecodeError included
        raise NotSafetensors("its safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise NotSafetensors("its safetensors header is not valid JSON")
    meta = header.pop("__metadata__", None)
    end = 0
    for k, v in header.items():
        if not (isinstance(v, dict) and "dtype" in v and "shape" in v and isinstance(v.get("data_offsets"), list)
                and len(v["data_offsets"]) == 2):
            raise NotSafetensors(f"entry {k!r} of its header is malformed")
        end = max(end, int(v["data_offsets"][1]))
    if 8 + n + end > size:
        raise NotSafetensors(f"it is truncated ({size} bytes, the header needs {8 + n + end})", truncated=True)
    return Header(header, {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}, 8 + n, size)
