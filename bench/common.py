"""Shared helpers of the benchmark: clocks, page cache, GPU memory of a process, images, JSON.

Imports only the standard library at module level (Pillow, numpy and pynvml where used), so the
bench process itself stays a light "host" like the WebUI.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time

GiB = 1024 ** 3
MiB = 1024 ** 2


def now() -> float:
    return time.perf_counter()


def wall() -> float:
    return time.time()


# ----------------------------------------------------------------------------- page cache

def drop_caches() -> bool:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``. False when not allowed (not root)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- GPU memory per process

class _Nvml:
    def __init__(self):
        self.ok = False
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nv = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or 0))
            self.ok = True
        except Exception:
            self.ok = False

    def used_by_pid(self) -> dict[int, int]:
        if self.ok:
            try:
                procs = self.nv.nvmlDeviceGetComputeRunningProcesses(self.handle)
                return {p.pid: int(p.usedGpuMemory or 0) for p in procs}
            except Exception:
                pass
        return _smi_used_by_pid()

    def device_used(self) -> int | None:
        if self.ok:
            try:
                return int(self.nv.nvmlDeviceGetMemoryInfo(self.handle).used)
            except Exception:
                return None
        return None


def _smi_used_by_pid() -> dict[int, int]:
    if not shutil.which("nvidia-smi"):
        return {}
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    used = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            try:
                used[int(parts[0])] = int(float(parts[1])) * MiB
            except ValueError:
                pass
    return used


_NVML = None


def nvml() -> _Nvml:
    global _NVML
    if _NVML is None:
        _NVML = _Nvml()
    return _NVML


def can_see_gpu_processes() -> bool:
    return nvml().ok or bool(shutil.which("nvidia-smi"))


def process_vram(pid: int | None) -> int | None:
    """Bytes of GPU memory the driver charges to ``pid`` (context included); None if unknown."""
    if not pid or not can_see_gpu_processes():
        return None
    return nvml().used_by_pid().get(pid, 0)


def device_used() -> int | None:
    """Bytes in use on the whole GPU (every process), from the driver."""
    return nvml().device_used()


class VramSampler:
    """Polls the GPU memory of one process (``pid_fn()`` gives the current pid) in a thread and
    keeps the peak. The driver's figure includes the CUDA context and the allocator's cache."""

    def __init__(self, pid_fn, interval: float = 0.05):
        self.pid_fn = pid_fn
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._t = None

    def __enter__(self):
        self._t = threading.Thread(target=self._loop, daemon=True, name="vram-sampler")
        self._t.start()
        return self

    def _loop(self):
        if self.interval <= 0:          # not sampled: the job runs with nothing polling the driver
            return
        nv = nvml()
        while not self._stop.is_set():
            pid = self.pid_fn()
            if pid:
                v = nv.used_by_pid().get(pid, 0)
                self.peak = max(self.peak, v)
                self.samples += 1
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        if self._t is not None:
            self._t.join(5)


# ----------------------------------------------------------------------------- host memory

def meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def proc_status(pid: int | None) -> dict[str, int]:
    out = {}
    if not pid:
        return out
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS", "VmHWM", "VmLck", "VmPin", "RssFile", "RssAnon", "RssShmem")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


# ----------------------------------------------------------------------------- a memory control group

def _cgroup_roots() -> list[tuple[str, str, str]]:
    """(folder where groups are made, limit file, peak file): cgroup v1's memory controller, or v2."""
    out = []
    if os.path.isfile("/sys/fs/cgroup/memory/memory.limit_in_bytes") or os.path.isdir("/sys/fs/cgroup/memory"):
        out.append(("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.max_usage_in_bytes"))
    if os.path.isfile("/sys/fs/cgroup/cgroup.controllers"):
        out.append(("/sys/fs/cgroup", "memory.max", "memory.peak"))
    return out


def memory_cgroup(name: str, limit: int) -> tuple | None:
    """A memory control group with ``limit`` bytes (made as root), or None where this machine
    lets none be made or does not keep the limit."""
    for root, limit_file, peak_file in _cgroup_roots():
        path = os.path.join(root, name)
        try:
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, limit_file), "w") as f:
                f.write(str(limit))
            with open(os.path.join(path, limit_file)) as f:
                if abs(int(f.read().strip()) - limit) > 1 << 20:
                    raise OSError("limit not kept")
            return path, root, peak_file
        except (OSError, ValueError):
            try:
                os.rmdir(path)
            except OSError:
                pass
    return None


class in_cgroup:
    """``with in_cgroup(group):`` this process (and what it starts meanwhile) in the group."""

    def __init__(self, group):
        self.group = group

    def __enter__(self):
        if self.group:
            with open(os.path.join(self.group[0], "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))

    def __exit__(self, *exc):
        if self.group:
            with open(os.path.join(self.group[1], "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))


def cgroup_peak(group) -> int | None:
    if not group:
        return None
    try:
        with open(os.path.join(group[0], group[2])) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def remove_cgroup(group) -> None:
    if not group:
        return
    for _ in range(20):
        try:
            os.rmdir(group[0])
            return
        except OSError:
            time.sleep(0.25)          # its last process is still exiting


# ----------------------------------------------------------------------------- inputs

def make_images(folder: str, n: int, size: int = 1024, seed: int = 0) -> list[str]:
    """``n`` random RGB PNGs of ``size``x``size`` (the same pixels on every machine)."""
    import numpy as np
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = os.path.join(folder, f"input_{i}.png")
        arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        if not os.path.isfile(p):
            Image.fromarray(arr).save(p, compress_level=1)
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------- output

def gb(n) -> float | None:
    """Bytes -> GB as the reference figures count them (2**30 bytes)."""
    return None if n is None else round(n / GiB, 2)


def write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


def job_args(description: str):
    """The arguments every product-path script takes: the models and Lora folders, the images, the
    output file."""
    import argparse
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--models", required=True)
    ap.add_argument("--lora", required=True)
    ap.add_argument("--images", required=True, help="comma-separated image files")
    ap.add_argument("--out", help="a JSON file for the figures")
    return ap


def service(models: str, lora: str, **settings):
    """A ``Service`` as the tab makes one, its worker this interpreter with the project on its path
    (no standby worker; kept warm for an hour), with ``settings`` on top."""
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from i2l_ext.service import Service
    from i2l_ext.settings import Settings
    os.makedirs(lora, exist_ok=True)
    env = {"PYTHONPATH": os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    return Service(Settings(models_dir=models, lora_dir=lora, worker_python=sys.executable, worker_env_vars=env,
                            **{"keep_warm_minutes": 60.0, "standby": False, **settings}))
