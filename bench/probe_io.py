"""Where a cold start's time goes on this machine: fresh memory, the disk, the page cache.

    python3 bench/probe_io.py [--dir /tmp/i2l-probe] [--gib 4] [--out probe.json]

Run as root (the page cache is dropped before each cold read). Measures, on a file of ``--gib``
GiB written first: touching fresh anonymous memory (1 and 8 threads, with and without huge
pages); reading the file cold through the page cache into fresh and into already-touched memory;
reading it cold with O_DIRECT (4, 8, 16 readers; 8 and 32 MiB requests); reading it from the
page cache; page-locking a buffer and copying it to the GPU; and reading the worker's listed
code files cold with 4, 16 and 32 readers, alone and while the weights are read.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
GiB = 1 << 30


def drop() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def fresh(n: int, huge: bool = False) -> mmap.mmap:
    m = mmap.mmap(-1, n)
    if huge and hasattr(m, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE)
    return m


def touch(m: mmap.mmap, threads: int) -> float:
    """Write every page of ``m`` with memset from ``threads`` threads (ctypes lets go of the GIL)."""
    import ctypes
    libc = ctypes.CDLL(None)
    libc.memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
    n = len(m)
    holder = ctypes.c_char.from_buffer(m)
    base = ctypes.addressof(holder)
    part = n // threads

    def run(i):
        a, b = i * part, (n if i == threads - 1 else (i + 1) * part)
        libc.memset(base + a, 0, b - a)
    t = time.perf_counter()
    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for x in ts:
        x.start()
    for x in ts:
        x.join()
    del holder
    return time.perf_counter() - t


def read_into(path: str, m: mmap.mmap, threads: int, chunk: int, direct: bool) -> float:
    size = min(os.path.getsize(path), len(m))
    n_chunks = -(-size // chunk)
    nxt = [0]
    lock = threading.Lock()

    def run():
        flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
        fd = os.open(path, flags)
        mv = memoryview(m)
        try:
            while True:
                with lock:
                    i = nxt[0]
                    nxt[0] += 1
                if i >= n_chunks:
                    return
                a = i * chunk
                b = min(size, a + chunk)
                got = 0
                while got < b - a:
                    k = os.preadv(fd, [mv[a + got:b]], a + got)
                    if k <= 0:
                        return
                    got += k
        finally:
            os.close(fd)
    t = time.perf_counter()
    ts = [threading.Thread(target=run) for _ in range(threads)]
    for x in ts:
        x.start()
    for x in ts:
        x.join()
    return time.perf_counter() - t


def make_file(path: str, n: int) -> None:
    if os.path.exists(path) and os.path.getsize(path) == n:
        return
    block = os.urandom(64 << 20)
    with open(path + ".tmp", "wb") as f:
        left = n
        while left > 0:
            f.write(block[:min(left, len(block))])
            left -= len(block)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/i2l-probe")
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-code", action="store_true")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    n = int(a.gib * GiB)
    path = os.path.join(a.dir, "big.bin")
    res: dict = {"gib": a.gib}

    def rec(name, seconds, nbytes=n):
        res[name] = {"s": round(seconds, 3), "GBps": round(nbytes / 1e9 / seconds, 2)}
        print(f"{name:48s} {seconds:7.3f} s  {nbytes / 1e9 / seconds:6.2f} GB/s", flush=True)

    t = time.perf_counter()
    make_file(path, n)
    rec("write file (fsync)", time.perf_counter() - t)

    for threads in (1, 8):
        for huge in (False, True):
            m = fresh(n, huge)
            rec(f"touch fresh memory, {threads} thr{' huge' if huge else ''}", touch(m, threads))
            m.close()

    drop()
    m = fresh(n)
    rec("cold buffered -> fresh memory, 4 thr 32M", read_into(path, m, 4, 32 << 20, False))
    drop()
    rec("cold buffered -> touched memory, 4 thr 32M", read_into(path, m, 4, 32 << 20, False))
    rec("page cache -> touched memory, 4 thr 32M", read_into(path, m, 4, 32 << 20, False))
    rec("page cache -> touched memory, 1 thr 32M", read_into(path, m, 1, 32 << 20, False))
    for threads, chunk in ((4, 32 << 20), (8, 32 << 20), (16, 8 << 20), (8, 8 << 20), (2, 32 << 20)):
        drop()
        rec(f"cold O_DIRECT -> touched memory, {threads} thr {chunk >> 20}M",
            read_into(path, m, threads, chunk, True))
    m.close()
    drop()
    m = fresh(n, huge=True)
    rec("cold O_DIRECT -> fresh huge memory, 8 thr 32M", read_into(path, m, 8, 32 << 20, True))
    m.close()
    drop()
    m = fresh(n)
    rec("cold O_DIRECT -> fresh memory, 8 thr 32M", read_into(path, m, 8, 32 << 20, True))

    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.init()
            buf = torch.frombuffer(m, dtype=torch.uint8)
            t = time.perf_counter()
            rc = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), n, 0)
            rec("cudaHostRegister (touched)", time.perf_counter() - t)
            res["register_rc"] = int(getattr(rc, "value", rc))
            dev = torch.empty(n, dtype=torch.uint8, device="cuda")
            for _ in range(2):
                torch.cuda.synchronize()
                t = time.perf_counter()
                dev.copy_(buf, non_blocking=True)
                torch.cuda.synchronize()
            rec("pinned -> GPU", time.perf_counter() - t)
            del dev
            torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
            del buf
            m2 = fresh(n, huge=True)
            b2 = torch.frombuffer(m2, dtype=torch.uint8)
            t = time.perf_counter()
            torch.cuda.cudart().cudaHostRegister(b2.data_ptr(), n, 0)
            rec("cudaHostRegister (fresh huge, untouched)", time.perf_counter() - t)
            torch.cuda.cudart().cudaHostUnregister(b2.data_ptr())
            del b2
            m2.close()
    except Exception as e:
        res["torch_error"] = repr(e)
    m.close()

    if not a.skip_code:
        from i2l_ext.worker import warmstart
        items = warmstart.code_files()
        res["code_files"] = len(items)
        for readers in (4, 16, 32):
            drop()
            t = time.perf_counter()
            warmstart.warm_code(readers=readers).wait()
            rec(f"code files cold, {readers} readers", time.perf_counter() - t, 1)
        # code and weights together
        for readers, wthreads in ((32, 4), (32, 8)):
            drop()
            m = fresh(n, huge=True)
            out = {}

            def weights():
                out["w"] = read_into(path, m, wthreads, 32 << 20, True)
            t = time.perf_counter()
            th = threading.Thread(target=weights)
            th.start()
            warmstart.warm_code(readers=readers).wait()
            code_s = time.perf_counter() - t
            th.join()
            rec(f"together: code ({readers} readers)", code_s, 1)
            rec(f"together: weights O_DIRECT {wthreads} thr", out["w"])
            m.close()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
