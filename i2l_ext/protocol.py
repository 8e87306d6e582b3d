"""The worker protocol: JSON objects, one per line. See docs/architecture.md."""
from __future__ import annotations

import json

PROTOCOL_VERSION = 2           # 2: messages as Text (key + fields), JobSpec / JobResult

PHASES = ("start", "load", "encode", "decode", "merge", "write")


def encode(msg: dict) -> bytes:
    return (json.dumps(msg, separators=(",", ":"), ensure_ascii=True) + "\n").encode("ascii")


def decode(line: bytes | str) -> dict | None:
    """A message, or None for a line that is not one (stray library output)."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", "replace")
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        msg = json.loads(line)
    except ValueError:
        return None
    return msg if isinstance(msg, dict) and "type" in msg else None
