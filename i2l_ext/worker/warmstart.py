"""The worker's first seconds, before torch is imported.

A cold start has two slow parts that both read the disk: the weights (gigabytes, read in big
sequential chunks) and the Python packages (torch, its CUDA libraries, transformers: thousands of
files, faulted in page by page as the imports touch them, which is slow on a cold disk and slower
still while the weights are being read). So, first thing in the worker:

1. ``warm_code()`` reads the files the last successful job needed -- shared libraries and
   byte-code, listed by ``record_code()`` -- front to back, so the imports find them in the
   page cache instead of seeking for each page;
2. ``start_reads()`` starts reading the weights named by the service into host memory;
3. only then is torch imported (``main``), while both go on.

Nothing here imports torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time

from .weights import RAM_MARGIN, NotSafetensors, WeightFile, available_ram

MANIFEST = "i2l-import-files.json"
MAX_CODE_BYTES = 6 * 1024 ** 3
_READ = 4 << 20


_T0 = time.time()


def trace(event: str) -> None:
    """With ``I2L_TRACE=<file>``: append when each start-up step ended (for the benchmark)."""
    path = os.environ.get("I2L_TRACE")
    if path:
        try:
            with open(path, "a") as f:
                f.write(f"{time.time():.3f} +{time.time() - _T0:7.2f}s pid {os.getpid()} {event}\n")
        except OSError:
            pass


def gpu_likely() -> bool:
    """Whether an NVIDIA driver is present (torch decides for sure later)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    if os.name == "nt":
        root = os.environ.get("SystemRoot", r"C:\Windows")
        return os.path.exists(os.path.join(root, "System32", "nvcuda.dll"))
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")


def start_reads(paths: list[str], after: threading.Event | None = None) -> list[WeightFile]:
    """Start reading ``paths`` (in order) into host memory when a GPU is likely and the RAM can
    hold them; the files, reading in the background (empty when nothing was started)."""
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths or not gpu_likely():
        return []
    ram = available_ram()
    if ram is not None and sum(os.path.getsize(p) for p in paths) + RAM_MARGIN > ram:
        return []
    files = []
    for p in paths:
        try:
            files.append(WeightFile(p).allocate())
        except (OSError, NotSafetensors):
            continue                    # the job reports it

    def run():
        if after is not None:
            after.wait(30)
        trace("weights: reading starts")
        for wf in files:
            try:
                wf.start()
                wf.wait()
                trace(f"weights: read {os.path.basename(wf.path)} ({wf.nbytes / 2 ** 30:.1f} GB)")
            except BaseException:
                return
    threading.Thread(target=run, daemon=True, name="i2l-early-read").start()
    return files


# ----------------------------------------------------------------------------- code files

def _manifest_paths() -> list[str]:
    """Where the list of files is kept: beside the worker environment, else the user's cache."""
    out = [os.path.join(sys.prefix, MANIFEST)]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    tag = hashlib.sha256(sys.prefix.encode("utf-8", "replace")).hexdigest()[:12]
    out.append(os.path.join(cache, "i2l-ext", f"{tag}-{MANIFEST}"))
    return out


def _roots() -> list[str]:
    roots = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix) if p}
    for p in sys.path:
        if p and os.path.isdir(p) and ("site-packages" in p or "dist-packages" in p):
            roots.add(os.path.realpath(p))
    return sorted(roots)


def _mapped_files() -> list[str]:
    """Shared libraries this process has mapped (Linux), in address order."""
    out, seen = [], set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    path = parts[5].strip()
                    if path not in seen and not path.endswith(" (deleted)"):
                        seen.add(path)
                        out.append(path)
    except OSError:
        pass
    return out


def record_code(where: str | None = None) -> str | None:
    """Write the list of code files this process has used (after a job has run). Returns where."""
    roots = _roots()

    def ours(p):
        rp = os.path.realpath(p)
        return any(rp.startswith(r + os.sep) for r in roots) and os.path.isfile(rp)

    files, seen = [], set()
    libs = [p for p in _mapped_files() if ours(p)]
    mods = []
    for m in list(sys.modules.values()):
        d = getattr(m, "__dict__", None)
        if not isinstance(d, dict):
            continue
        f = d.get("__cached__") or d.get("__file__")
        if isinstance(f, str) and ours(f):
            mods.append(f)
    # The libraries that ``import torch`` maps come first: they are needed first and are the bulk.
    libs.sort(key=lambda p: (f"{os.sep}torch{os.sep}" not in p, f"{os.sep}nvidia{os.sep}" not in p))
    for p in libs + mods:
        rp = os.path.realpath(p)
        if rp not in seen:
            seen.add(rp)
            files.append(rp)
    data = {"python": sys.executable, "files": files}
    for path in [where] if where else _manifest_paths():
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(data, f)
            os.replace(tmp, path)
            return path
        except OSError:
            continue
    return None


def code_files(where: str | None = None) -> list[str]:
    for path in [where] if where else _manifest_paths():
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if data.get("python") == sys.executable and isinstance(data.get("files"), list):
            return [p for p in data["files"] if isinstance(p, str)]
    return []


def warm_code(readers: int = 2, where: str | None = None) -> threading.Event:
    """Read the recorded code files into the page cache in the background; the event is set when done."""
    done = threading.Event()
    files, total = [], 0
    for p in code_files(where):
        try:
            size = os.path.getsize(p)
        except OSError:
            continue
        if total + size > MAX_CODE_BYTES:
            break
        files.append(p)
        total += size
    if not files:
        done.set()
        return done
    lock = threading.Lock()
    queue = iter(files)
    left = [readers]

    def run():
        buf = bytearray(_READ)
        while True:
            with lock:
                p = next(queue, None)
            if p is None:
                break
            try:
                with open(p, "rb", buffering=0) as f:
                    while f.readinto(buf):
                        pass
            except OSError:
                continue
        with lock:
            left[0] -= 1
            if left[0] == 0:
                trace(f"code: read {len(files)} files ({total / 2 ** 30:.2f} GB)")
                done.set()
    for i in range(readers):
        threading.Thread(target=run, daemon=True, name=f"i2l-warm-code-{i}").start()
    return done
