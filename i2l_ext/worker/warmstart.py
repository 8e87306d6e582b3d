"""The worker's first seconds, before torch is imported.

A cold start has two slow parts that both read the disk: the weights (gigabytes, read in big
sequential chunks) and the Python packages (torch, its CUDA libraries, transformers: thousands of
files, faulted in page by page as the imports touch them, which is slow on a cold disk and slower
still while the weights are being read). So, first thing in the worker:

1. ``warm_code()`` asks the operating system to read the files the last successful job
   needed -- shared libraries and byte-code, listed by ``record_code()`` -- so the imports find
   them in the page cache instead of faulting them in page by page. On Linux that is one
   ``posix_fadvise(WILLNEED)`` per range from one thread: the kernel queues all of it at once
   and the thread never needs the interpreter lock while torch's import holds it;
2. ``start_reads()`` starts reading the weights named by the service into host memory once the
   code is in (a second or so): reads of gigabytes queued ahead of the imports' would stall them
   for far longer. One reader runs until the model code is imported, then all of them
   (``weights.FULL_SPEED``): four readers faulting in fresh memory slowed the imports by seconds;
3. torch is imported (``main``) while both go on.

Nothing here imports torch.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import threading
import time

from ..safetensors_header import NotSafetensors
from .weights import RAM_MARGIN, WeightFile, available_ram

MANIFEST = "i2l-import-files.json"
MAX_CODE_BYTES = 6 * 1024 ** 3
_READ = 4 << 20


_T0 = time.time()


def _process_counters() -> str:
    """Major page faults (pages that had to come from the disk), bytes the process had read from
    the disk, CPU seconds of the process and of the calling thread, and the machine's steal time
    (CPU time its hypervisor gave to others): whether a slow step waited for the disk, computed,
    or was kept off the CPU."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        out = (f" [majflt {fields[9]}, process cpu {(int(fields[11]) + int(fields[12])) / tick:.1f}s, "
               f"thread cpu {time.thread_time():.1f}s")
    except (OSError, IndexError, ValueError, AttributeError):
        return ""
    try:
        with open("/proc/self/io") as f:
            io = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        out += f", disk read {int(io['read_bytes']) / 2 ** 20:.0f} MB"
    except (OSError, KeyError, ValueError):
        pass
    try:
        with open("/proc/stat") as f:
            cpu = f.readline().split()
        out += f", steal {int(cpu[8]) / tick:.1f}s, iowait {int(cpu[5]) / tick:.1f}s"
    except (OSError, IndexError, ValueError):
        pass
    return out + "]"


TRACE_FILE: str | None = None      # the ``trace`` setting (the worker's ``--trace``)


def trace(event: str) -> None:
    """With the ``trace`` setting: append when each start-up step ended (for the benchmark)."""
    path = TRACE_FILE
    if path:
        try:
            line = f"{time.time():.3f} +{time.time() - _T0:7.2f}s pid {os.getpid()} {event}{_process_counters()}\n"
            with open(path, "a") as f:
                f.write(line)
        except OSError:
            pass


_GC_PAUSED: list[bool] = []


def pause_gc() -> None:
    """No garbage collection while the worker imports its code: the imports make hundreds of
    thousands of long-lived objects, and each full pass the allocator triggers meanwhile walks
    all of them again (measured on a 2-core machine, medians of five starts: the model code was
    ready 6.4 s after the worker's start instead of 7.4).
    ``resume_gc`` ends it once the model code is in."""
    if not gc.isenabled():
        return
    gc.disable()
    _GC_PAUSED.append(True)


def resume_gc() -> None:
    """After the imports: what they made is set aside from future passes (``gc.freeze``: it stays
    for the life of the worker; the few thousand cycles the imports left, a few MB, go with it
    until models are dropped, which unfreezes), and collection is on again."""
    try:
        _GC_PAUSED.pop()
    except IndexError:
        return
    gc.freeze()
    gc.enable()


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
            after.wait(15)
        trace("weights: reading starts")
        for wf in files:
            try:
                wf.start()
                wf.wait()
                trace(f"weights: read {os.path.basename(wf.path)} ({wf.nbytes / 2 ** 30:.1f} GB, "
                      f"{wf.direct_bytes / max(1, wf.nbytes):.0%} with O_DIRECT)")
            except BaseException:
                return
    threading.Thread(target=run, daemon=True, name="i2l-early-read").start()
    return files


# ----------------------------------------------------------------------------- code files

def saved_file_paths(name: str = MANIFEST) -> list[str]:
    """Where a file the worker keeps for its next starts lives (the list of code files, the
    ``importcache`` map): beside the worker environment, else the user's cache."""
    out = [os.path.join(sys.prefix, name)]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    tag = hashlib.sha256(sys.prefix.encode("utf-8", "replace")).hexdigest()[:12]
    out.append(os.path.join(cache, "i2l-ext", f"{tag}-{name}"))
    return out


_opened: dict[str, None] = {}        # files and folders the worker's Python code opened, in order
_watching: list[bool] = [True]       # emptied once the list is written (a worker records once)


def watch_opens() -> None:
    """Note every file Python opens for reading and every folder it lists (metadata lookups,
    data files, imports), so ``record_code`` can list them too."""
    def hook(event, args):
        if not _watching:
            return
        if event == "open":
            path, mode = args[0], args[1]
            if isinstance(path, str) and (mode is None or "r" in str(mode)) and "w" not in str(mode or ""):
                _opened.setdefault(path, None)
        elif event in ("os.listdir", "os.scandir") and args and isinstance(args[0], str):
            _opened.setdefault(args[0] + os.sep, None)
    sys.addaudithook(hook)


def _roots() -> list[str]:
    roots = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix) if p}
    for p in sys.path:
        if p and os.path.isdir(p) and ("site-packages" in p or "dist-packages" in p):
            roots.add(os.path.realpath(p))
    return sorted(roots)


PAGE = 4096
GAP = 64            # touched pages closer than this are read as one range


def _present(top: bytes) -> list[int]:
    """Indices of the entries whose top byte has bit 7 set (numpy when there, it is fast)."""
    try:
        import numpy as np
        return np.flatnonzero(np.frombuffer(top, dtype=np.uint8) & 0x80).tolist()
    except ImportError:
        return [i for i, b in enumerate(top) if b & 0x80]


def _touched_ranges(wanted=lambda path: True) -> dict[str, list[list[int]]]:
    """For each file this process has mapped (Linux): the byte ranges of it whose pages the
    process actually touched (present in its page table), merged into few sequential reads."""
    pages: dict[str, set[int]] = {}
    try:
        maps = open("/proc/self/maps").read().splitlines()
        pm = open("/proc/self/pagemap", "rb", buffering=0)
    except OSError:
        return {}
    with pm:
        for line in maps:
            parts = line.split(None, 5)
            if len(parts) < 6 or not parts[5].startswith("/") or parts[5].endswith(" (deleted)"):
                continue
            if not wanted(parts[5].strip()):      # device and driver mappings can be huge
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            off = int(parts[2], 16)
            n = (hi - lo) // PAGE
            try:
                pm.seek(lo // PAGE * 8)
                raw = pm.read(n * 8)
            except (OSError, OverflowError):
                continue
            got = pages.setdefault(parts[5].strip(), set())
            first = off // PAGE
            top = raw[7::8]                        # the byte holding bit 63 (page present)
            for i in _present(top):
                got.add(first + i)
    out = {}
    for path, ps in pages.items():
        ranges: list[list[int]] = []
        for pg in sorted(ps):
            if ranges and pg - ranges[-1][1] <= GAP:
                ranges[-1][1] = pg + 1
            else:
                ranges.append([pg, pg + 1])
        out[path] = [[a * PAGE, (b - a) * PAGE] for a, b in ranges]
    return out


def record_code(where: str | None = None) -> str | None:
    """Write the list of code this process has used (after a job has run): the touched parts of
    its shared libraries and its byte-code files. Returns where it was written."""
    roots = _roots()

    def ours(p):
        rp = os.path.realpath(p)
        return any(rp.startswith(r + os.sep) for r in roots) and os.path.isfile(rp)

    touched = {os.path.realpath(p): r for p, r in _touched_ranges(ours).items()}
    libs = sorted(touched, key=lambda p: (f"{os.sep}torch{os.sep}" not in p, f"{os.sep}nvidia{os.sep}" not in p))
    items, seen = [], set()
    for p in libs:
        if touched[p]:
            seen.add(p)
            items.append([p, touched[p]])
    for m in list(sys.modules.values()):
        d = getattr(m, "__dict__", None)
        if not isinstance(d, dict):
            continue
        f = d.get("__cached__") or d.get("__file__")
        if isinstance(f, str) and ours(f):
            rp = os.path.realpath(f)
            if rp not in seen:
                seen.add(rp)
                items.append([rp, None])          # the whole file
    for f in list(_opened):
        rp = os.path.realpath(f)
        if rp in seen:
            continue
        if f.endswith(os.sep):
            if os.path.isdir(rp) and any(rp == r or rp.startswith(r + os.sep) for r in roots):
                seen.add(rp)
                items.append([rp + os.sep, None])        # a folder: listed again
        elif ours(f):
            seen.add(rp)
            items.append([rp, None])
    data = {"python": sys.executable, "files": items}
    for path in [where] if where else saved_file_paths():
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(data, f)
            os.replace(tmp, path)
            _watching.clear()
            _opened.clear()
            return path
        except OSError:
            continue
    return None


def code_files(where: str | None = None) -> list[tuple[str, list | None]]:
    """(path, byte ranges or None for the whole file) from this interpreter's list."""
    for path in [where] if where else saved_file_paths():
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if data.get("python") != sys.executable or not isinstance(data.get("files"), list):
            continue
        out = []
        for item in data["files"]:
            if isinstance(item, list) and len(item) == 2 and isinstance(item[0], str):
                out.append((item[0], item[1] if isinstance(item[1], list) else None))
        return out
    return []


def _wait_cached(samples, timeout: float = 10.0) -> None:
    """Until the last page of each sampled range is in the page cache (the kernel reads what
    was asked for roughly in order), probing without waiting for the disk."""
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None or not hasattr(os, "preadv"):
        return
    probe = bytearray(1)
    left = list(samples)
    end = time.monotonic() + timeout
    while left and time.monotonic() < end:
        still = []
        for p, (a, n) in left:
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.preadv(fd, [probe], a + max(0, n - 1), flag)
            except BlockingIOError:
                still.append((p, (a, n)))
            except OSError:
                pass
            finally:
                os.close(fd)
        left = still
        if left:
            time.sleep(0.01)


def _stat_sources(items, threads: int = 16, timeout: float = 5.0) -> None:
    """Look up the ``.py`` file beside each listed ``.pyc``, from many threads, before torch's
    import starts. Python checks each source's date before it uses the byte-code; on a cold
    disk each of those thousands of lookups is a small read of file-system metadata, which
    waits behind the weights' large reads for tens of milliseconds once they run."""
    sources = []
    for p, _ in items:
        head, name = os.path.split(p)
        if name.endswith(".pyc") and os.path.basename(head) == "__pycache__":
            sources.append(os.path.join(os.path.dirname(head), name.split(".", 1)[0] + ".py"))
    if not sources:
        return
    t0 = time.monotonic()
    it = iter(sources)
    lock = threading.Lock()

    def run():
        while True:
            with lock:
                p = next(it, None)
            if p is None:
                return
            try:
                os.stat(p)
            except OSError:
                pass
    ts = [threading.Thread(target=run, daemon=True, name=f"i2l-stat-{i}") for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(max(0.0, timeout - (time.monotonic() - t0)))
    trace(f"code: {len(sources)} sources looked up")


_PIECES: dict[int, int] = {}
MIN_PIECE = 128 << 10


def _advice_piece(dev: int) -> int:
    """How much one ``POSIX_FADV_WILLNEED`` reads on the disk holding ``dev`` (Linux): the kernel
    reads at most the disk's read-ahead window (or its largest request, if larger) per call and
    silently drops the rest of a longer range -- 128 KiB on most disks, so a 40 MB range of a
    shared library was mostly left for the imports to fault in, from a disk busy with the
    weights. Asked in pieces of this size, all of it is read."""
    got = _PIECES.get(dev)
    if got is None:
        got = MIN_PIECE
        try:
            base = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
            for q in (os.path.join(base, "queue"), os.path.join(base, "..", "queue")):
                if os.path.isdir(q):
                    kb = []
                    for name in ("read_ahead_kb", "max_sectors_kb"):
                        try:
                            with open(os.path.join(q, name)) as f:
                                kb.append(int(f.read().strip()))
                        except (OSError, ValueError):
                            pass
                    if kb:
                        got = max(MIN_PIECE, max(kb) << 10)
                    break
        except (OSError, AttributeError, ValueError):
            pass
        _PIECES[dev] = got
    return got


def warm_code(readers: int = 4, where: str | None = None, advise: bool | None = None) -> threading.Event:
    """Read the listed code into the page cache in the background; the event is set when it is
    there. ``advise`` (the default where ``posix_fadvise`` exists): the reads are asked of the
    kernel, then a sample of them is watched until done; else reader threads do them."""
    done = threading.Event()
    items, total = [], 0
    for p, ranges in code_files(where):
        try:
            size = os.path.getsize(p)
        except OSError:
            continue
        if p.endswith(os.sep):
            items.append((p, None))
            continue
        ranges = [[0, size]] if ranges is None else [[a, min(n, size - a)] for a, n in ranges if a < size]
        n = sum(r[1] for r in ranges)
        if total + n > MAX_CODE_BYTES:
            break
        items.append((p, ranges))
        total += n
    if not items:
        done.set()
        return done
    _stat_sources(items)
    if advise is None:
        advise = hasattr(os, "posix_fadvise")
    if advise:
        def ask():
            last = []
            for p, ranges in items:
                try:
                    if ranges is None:
                        os.listdir(p)
                        continue
                    fd = os.open(p, os.O_RDONLY)
                    try:
                        piece = _advice_piece(os.fstat(fd).st_dev)
                        for a, n in ranges:
                            for off in range(a, a + n, piece):
                                os.posix_fadvise(fd, off, min(piece, a + n - off), os.POSIX_FADV_WILLNEED)
                    finally:
                        os.close(fd)
                    last.append((p, ranges[-1]))
                except OSError:
                    continue
            trace(f"code: read-ahead asked for {len(items)} files ({total / 2 ** 20:.0f} MB)")
            _wait_cached(last[::max(1, len(last) // 32)] + last[-1:])
            trace("code: in the page cache")
            done.set()
        threading.Thread(target=ask, daemon=True, name="i2l-warm-code").start()
        return done
    lock = threading.Lock()
    queue = iter(items)
    left = [readers]

    def run():
        buf = bytearray(_READ)
        view = memoryview(buf)
        while True:
            with lock:
                item = next(queue, None)
            if item is None:
                break
            p, ranges = item
            try:
                if ranges is None and p.endswith(os.sep):
                    os.listdir(p)
                    continue
                with open(p, "rb", buffering=0) as f:
                    for a, n in ranges:
                        f.seek(a)
                        while n > 0:
                            got = f.readinto(view[:min(n, _READ)])
                            if not got:
                                break
                            n -= got
            except OSError:
                continue
        with lock:
            left[0] -= 1
            if left[0] == 0:
                trace(f"code: read {len(items)} files ({total / 2 ** 20:.0f} MB)")
                done.set()
    for i in range(readers):
        threading.Thread(target=run, daemon=True, name=f"i2l-warm-code-{i}").start()
    return done
