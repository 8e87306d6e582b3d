"""Helpers shared by the tests (imported as ``helpers``; conftest files are not for importing)."""
from __future__ import annotations

import json
import os
import struct
import threading
import time
from contextlib import contextmanager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOW_PYTHON = os.path.join(ROOT, "tests", "shims", "slow-python")
CHROMIUM = os.environ.get("I2L_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextmanager
def chromium():
    """Debian's Chromium driven by Playwright (skips the test when either is missing)."""
    import pytest
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; no browser download needed)")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set I2L_CHROMIUM)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class QueueLock:
    """Shaped like the WebUIs' FIFOLock (modules/fifo_lock.py): ``acquire(blocking=True)`` takes no timeout."""

    def __init__(self):
        self._lock = threading.Lock()

    def acquire(self, blocking=True):
        return self._lock.acquire(blocking)

    def release(self):
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc):
        self.release()


def make_image(path, size=(96, 64), mode="RGB", color=(200, 30, 60), fmt=None, **save):
    from PIL import Image
    im = Image.new(mode, size, color if mode in ("RGB", "RGBA", "CMYK") else 128)
    if mode == "RGB":
        # a little structure so encoders see more than a flat colour
        for x in range(0, size[0], 8):
            for y in range(0, size[1], 8):
                if (x + y) // 8 % 2:
                    im.putpixel((x, y), (x * 2 % 256, y * 3 % 256, 90))
    im.save(str(path), format=fmt, **save)
    return str(path)


def read_header(path) -> dict:
    """A safetensors file's header: ``__metadata__`` and each tensor's dtype, shape and offsets."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def gone(pid, timeout=10.0):
    """Whether process ``pid`` has ended (or is a zombie) within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a zombie still answers kill(0); look at its state
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def slow_worker(worker_python: str, pause: float = 30.0) -> tuple[str, dict]:
    """(the worker interpreter, its extra environment) for a worker that pauses ``pause`` s before
    it moves a job's files into place (tests/shims/slow_worker.py)."""
    return SLOW_PYTHON, {"SHIM_PYTHON": worker_python, "SHIM_PAUSE_BEFORE_WRITE": str(pause)}


def children(parent: int, command_part: bytes | None = None) -> list[int]:
    """Live processes whose parent is ``parent`` (with ``command_part`` in their command line, if given)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z" and (command_part is None or command_part in cmd):
            out.append(int(d))
    return out
