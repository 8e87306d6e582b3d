"""Reading safetensors files fast, into (pinned) host memory, while the rest starts up.

A ``WeightFile`` reads a whole file with several reader threads into one host buffer (page-locked
when CUDA is there, so copies to the GPU run at full speed and overlap with compute). Tensors
are zero-copy views into that buffer, so a model built on them needs no second copy. Reading starts as soon as it is asked for; a consumer that
needs a tensor before its bytes have arrived waits just for those bytes, so encoding can begin
while later files are still being read.

Where the operating system allows it (Linux), the parts of a file that are not in the page cache
already are read with O_DIRECT: straight from the disk into the buffer, a third faster on a
virtual disk than through the page cache, and without a second copy of gigabytes in the page
cache pushing the WebUI's own files out of it. Parts that are cached are copied from there.

Only the safetensors format is read: the header is parsed as JSON and checked, nothing is ever
unpickled.
"""
from __future__ import annotations

import mmap
import os
import threading
import time

from .. import safetensors_header
from ..safetensors_header import NotSafetensors  # noqa: F401  (raised by WeightFile; callers catch it here)

CHUNK = 64 << 20                 # few, large requests: a reader needs the interpreter lock once per chunk
READERS = 4
# While a cold worker imports its code, only this many readers run: more of them, each faulting
# in fresh pages, slow the imports down (measured: model code ready 6 s later with four) for
# less than they gain. The rest start when ``FULL_SPEED`` is set (imports done).
READERS_WHILE_IMPORTING = 1
FULL_SPEED = threading.Event()
FULL_SPEED.set()                 # cleared by the worker at a cold start, set again when imported
ALIGN = 4096                     # what O_DIRECT needs of offsets, lengths and addresses
DIRECT = hasattr(os, "O_DIRECT") and hasattr(os, "preadv")
_NOWAIT = getattr(os, "RWF_NOWAIT", None)

_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
           "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


_CUDART: list = []


def cudart_ctypes():
    """(cudaHostRegister, cudaHostUnregister) of the CUDA runtime torch has loaded, called through
    ctypes, or None. Unlike torch's own binding, a ctypes call lets go of the interpreter lock, so
    page-locking gigabytes (a second or more) runs beside the imports instead of stopping them."""
    if _CUDART:
        return _CUDART[0]
    found = None
    try:
        import ctypes
        with open("/proc/self/maps") as f:
            paths = {line.split(None, 5)[5].strip() for line in f if "libcudart.so" in line and "/" in line}
        for path in sorted(paths):
            lib = ctypes.CDLL(path)
            reg, unreg = lib.cudaHostRegister, lib.cudaHostUnregister
            reg.argtypes, reg.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint), ctypes.c_int
            unreg.argtypes, unreg.restype = (ctypes.c_void_p,), ctypes.c_int
            found = (reg, unreg)
            break
    except (OSError, AttributeError, IndexError):
        found = None
    _CUDART.append(found)
    return found


def anonymous_memory(n: int) -> mmap.mmap:
    """``n`` bytes of fresh, page-aligned memory for a file's contents, in huge pages where the
    system allows them.

    Private memory: ``mmap.mmap(-1, n)`` alone makes a *shared* anonymous mapping, which Linux
    backs with shared memory (shmem); with the usual ``shmem_enabled=never`` that is 4 KiB pages
    whatever ``MADV_HUGEPAGE`` asks, so filling 19 GB costs five million page faults. A private
    mapping gets transparent huge pages (2 MiB) when ``enabled`` is ``madvise`` or ``always``:
    measured, touching 4 GiB took 4.3 s of CPU instead of 10.3 on a small machine."""
    flags = getattr(mmap, "MAP_PRIVATE", None)
    anon = getattr(mmap, "MAP_ANONYMOUS", None)
    if flags is not None and anon is not None:
        mm = mmap.mmap(-1, n, flags=flags | anon)
    else:
        mm = mmap.mmap(-1, n)         # Windows: memory backed by the paging file
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)     # fewer page faults filling it
        except OSError:
            pass
    return mm


class WeightFile:
    """One safetensors file read into a host buffer by background threads.

    The buffer holds the file from the page boundary before its data section (so reads can be
    page-aligned for O_DIRECT); ``buffer`` is the data section itself."""

    def __init__(self, path: str, pin: bool = True):
        self.path = path
        h = safetensors_header.read(path)
        self.header, self.data_start = h.tensors, h.data_start
        self.size = os.path.getsize(path)
        self.nbytes = self.size - self.data_start
        self.pin = pin
        self._base = self.data_start - self.data_start % ALIGN   # file offset of the buffer's first byte
        self._lead = self.data_start - self._base                # where the data starts in the buffer
        self._span = -(-(self.size - self._base) // ALIGN) * ALIGN
        self._mm = None                  # anonymous memory holding the file from _base (no torch needed)
        self._buffer = None              # the data section as a torch.uint8 tensor, made on first use
        self.done_bytes = 0              # contiguous bytes ready from the start of the data section
        self.direct_bytes = 0            # bytes read with O_DIRECT (the rest came from the page cache)
        self.error: BaseException | None = None
        self.started = self.finished = None
        self._chunks_done: set[int] = set()
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._registered: list[int] = []  # base addresses of the page-locked pieces

    # -- reading -----------------------------------------------------------------------------
    def allocate(self) -> "WeightFile":
        """The host buffer: anonymous, page-aligned memory of the file's size from ``_base``.
        Needs no torch, so reading can begin before torch is imported; ``pin_memory``
        page-locks it in place later."""
        with self._cond:
            if self._mm is None:
                self._mm = anonymous_memory(max(ALIGN, self._span))
        return self

    @property
    def buffer(self):
        """The data section as a torch.uint8 tensor sharing the host buffer (None before ``allocate``)."""
        if self._buffer is None and self._mm is not None:
            import torch
            with self._cond:
                if self._buffer is None and self._mm is not None:
                    self._buffer = (torch.frombuffer(self._mm, dtype=torch.uint8, count=self.nbytes,
                                                     offset=self._lead)
                                    if self.nbytes else torch.empty(0, dtype=torch.uint8))
        return self._buffer

    def pin_memory(self) -> bool:
        """Page-lock the host buffer in place when CUDA is there (no rounding up, unlike torch's
        pinned allocator), so copies to the GPU run at full speed. One registration for the whole
        buffer: a copy may not straddle two. Safe while reads go on."""
        import torch
        self.allocate()
        with self._cond:
            if self._registered or not self.pin or not self.nbytes or not torch.cuda.is_available():
                return bool(self._registered)
        base = self.buffer.data_ptr() - self._lead
        try:
            fast = cudart_ctypes()
            rc = fast[0](base, len(self._mm), 0) if fast else torch.cuda.cudart().cudaHostRegister(base, len(self._mm), 0)
            ok = int(getattr(rc, "value", rc)) == 0
        except Exception:      # no page-locked memory to spare: plain RAM still works
            ok = False
        with self._cond:
            self._registered = [base] if ok else []
        return ok

    def start(self) -> "WeightFile":
        """Begin reading (allocating first if needed); returns at once."""
        self.allocate()
        with self._cond:
            if self._threads:
                return self
            self.started = time.monotonic()
            n_chunks = max(1, -(-(self.size - self._base) // CHUNK))
            self._next = self._frontier = 0
            self._n_chunks = n_chunks
            self._direct = DIRECT and not self._in_page_cache()
            for i in range(min(READERS, n_chunks)):
                t = threading.Thread(target=self._reader, args=(i,), daemon=True, name=f"i2l-read-{i}")
                self._threads.append(t)
            threads = list(self._threads)
        for t in threads:
            t.start()
        if self.nbytes == 0:
            with self._cond:
                self.finished = time.monotonic()
        return self

    def _take(self) -> int | None:
        with self._cond:
            if self._next >= self._n_chunks or self.error is not None:
                return None
            i = self._next
            self._next += 1
            return i

    def _in_page_cache(self) -> bool:
        """Whether the file looks to be in the page cache already (four of its pages probed
        without waiting for the disk); then it is copied from there rather than read again."""
        if _NOWAIT is None:
            return False
        probe = bytearray(1)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return True
        try:
            for k in range(4):
                os.preadv(fd, [probe], self._base + (self.size - 1 - self._base) * k // 3, _NOWAIT)
            return True
        except BlockingIOError:
            return False
        except OSError:
            return True             # cannot tell: read through the page cache, as always worked
        finally:
            os.close(fd)

    def _open_direct(self) -> int | None:
        if not self._direct:
            return None
        try:
            return os.open(self.path, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            return None             # a file system without O_DIRECT (tmpfs, some network shares)

    def _read_chunk(self, f, direct: int | None, view, i: int) -> int:
        """Read chunk ``i`` into the buffer; returns how many of its bytes came with O_DIRECT."""
        a = i * CHUNK                             # in the buffer; the file offset is _base + a
        b = min(self.size - self._base, a + CHUNK)
        got = 0
        if direct is not None:
            stop = min(len(view), -(-b // ALIGN) * ALIGN)      # whole pages: the buffer has them
            try:
                while a + got < b:
                    n = os.preadv(direct, [view[a + got:stop]], self._base + a + got)
                    if n <= 0:
                        break
                    got += n
                    if got % ALIGN:                # a short read: only at the end of the file
                        break
            except OSError:
                got -= got % ALIGN                 # go on through the page cache from there
            got = min(got, b - a)
        direct_got = got
        if a + got < b:
            f.seek(self._base + a + got)
            mv = view[a + got:b]
            done = 0
            while done < len(mv):
                n = f.readinto(mv[done:])
                if not n:
                    raise OSError(f"{self.path} ended early (truncated?)")
                done += n
        return direct_got

    def _reader(self, index: int = 0) -> None:
        if index >= READERS_WHILE_IMPORTING:
            FULL_SPEED.wait(120)
        view = memoryview(self._mm)
        direct = self._open_direct()
        try:
            with open(self.path, "rb", buffering=0) as f:
                while True:
                    i = self._take()
                    if i is None:
                        return
                    nd = self._read_chunk(f, direct, view, i)
                    with self._cond:
                        self.direct_bytes += nd
                        self._chunks_done.add(i)
                        while self._frontier in self._chunks_done:
                            self._frontier += 1
                        if self._frontier >= self._n_chunks:
                            self.done_bytes = self.nbytes
                            self.finished = time.monotonic()
                        else:
                            self.done_bytes = max(0, min(self.nbytes, self._frontier * CHUNK - self._lead))
                        self._cond.notify_all()
        except BaseException as e:
            with self._cond:
                self.error = e
                self._cond.notify_all()
        finally:
            if direct is not None:
                os.close(direct)

    def wait(self, upto: int | None = None) -> None:
        """Block until the first ``upto`` bytes of the data section (all of it by default) are read."""
        if not self._threads:
            self.start()
        upto = self.nbytes if upto is None else upto
        with self._cond:
            while self.done_bytes < upto and self.error is None:
                self._cond.wait(0.5)
            if self.error is not None:
                raise self.error

    @property
    def ready(self) -> bool:
        return self._mm is not None and self.done_bytes >= self.nbytes

    @property
    def read_bytes(self) -> int:
        """Bytes of the data section read so far, in whatever order the readers went."""
        if self.ready:
            return self.nbytes
        with self._cond:
            return min(self.nbytes, len(self._chunks_done) * CHUNK)

    # -- tensors -----------------------------------------------------------------------------
    def shapes(self) -> dict:
        return {k: (tuple(v["shape"]), v["dtype"]) for k, v in self.header.items()}

    def contains(self, t) -> bool:
        if self._mm is None:
            return False
        base = self.buffer.data_ptr()
        return base <= t.data_ptr() < base + self.nbytes

    def wait_for(self, t) -> None:
        """Wait for the bytes behind tensor ``t`` (a view of this file's buffer)."""
        self.wait(t.data_ptr() - self.buffer.data_ptr() + t.numel() * t.element_size())

    def tensor(self, key: str):
        import torch
        self.allocate()
        info = self.header[key]
        a, b = info["data_offsets"]
        dtype = getattr(torch, _DTYPES[info["dtype"]])
        raw = self.buffer[a:b]
        itemsize = torch.empty((), dtype=dtype).element_size()
        if a % itemsize:
            raw = raw.clone()
        return raw.view(dtype).view(tuple(info["shape"]))

    def end_of(self, key: str) -> int:
        return self.header[key]["data_offsets"][1]

    def state_dict(self) -> dict:
        """Every tensor as a view; data may still be arriving (``wait`` / ``end_of``)."""
        return {k: self.tensor(k) for k in self.header}

    def release(self) -> None:
        """Give the memory back (after the readers are done with it)."""
        with self._cond:
            self._next = getattr(self, "_n_chunks", 0)      # hand out no more chunks
        for t in self._threads:
            t.join()
        buf, self._buffer = self._buffer, None
        if buf is not None and self._registered:
            import torch
            fast = cudart_ctypes()
            for ptr in self._registered:
                try:
                    fast[1](ptr) if fast else torch.cuda.cudart().cudaHostUnregister(ptr)
                except Exception:
                    pass
            self._registered = []
        self._mm = None          # freed once no tensor views it any more

    def __del__(self):
        try:
            if self._registered:
                self.release()
        except Exception:
            pass


RAM_MARGIN = 4 * 1024 ** 3


RAM_LIMIT_BYTES: int | None = None     # the ``ram_limit_gb`` setting, set when the worker starts


def available_ram() -> int | None:
    """Bytes of RAM this worker can still take: what the system can give (MemAvailable on Linux,
    ullAvailPhys on Windows), within the memory limit of the container or control group it runs
    in (Docker's ``--memory``, systemd's ``MemoryMax``) and within the ``ram_limit_gb`` setting
    less what this worker holds now."""
    found = [x for x in (_system_available(), cgroup_room()) if x is not None]
    if RAM_LIMIT_BYTES is not None:
        found.append(max(0, RAM_LIMIT_BYTES - _own_rss()))
    return min(found) if found else None


def _own_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        pass
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except Exception:
        return 0


def cgroup_room(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> int | None:
    """The room left under the tightest memory limit of this process's control group and its
    parents (cgroup v2 ``memory.max``, or v1 ``memory.limit_in_bytes``), the page cache they may
    reclaim (``inactive_file``) counted as free; None where no limit is set or none is readable."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":                                   # v2: one unified hierarchy
            names, base = ("memory.max", "memory.current", "inactive_file"), root
        elif "memory" in controllers.split(","):                 # v1: the memory controller's own
            names, base = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"), \
                os.path.join(root, "memory")
        else:
            continue
        rel = path.strip("/")
        while True:
            room = _cgroup_level(os.path.join(base, rel) if rel else base, *names)
            if room is not None:
                rooms.append(room)
            if not rel:
                break
            rel = os.path.dirname(rel)
    return min(rooms) if rooms else None


def _cgroup_level(folder: str, limit_name: str, usage_name: str, inactive_name: str) -> int | None:
    def read(name):
        try:
            with open(os.path.join(folder, name)) as f:
                return f.read()
        except OSError:
            return None
    limit = (read(limit_name) or "").strip()
    if not limit.isdigit() or int(limit) >= 1 << 60:        # "max", or v1's "no limit" (a huge number)
        return None
    usage = (read(usage_name) or "").strip()
    used = int(usage) if usage.isdigit() else 0
    for row in (read("memory.stat") or "").splitlines():
        key, _, value = row.partition(" ")
        if key == inactive_name and value.strip().isdigit():
            used -= int(value)
            break
    return max(0, int(limit) - max(0, used))


def _system_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if os.name == "nt":
        import ctypes

        class MemoryStatus(ctypes.Structure):
            _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                        ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                        ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                        ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                        ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]
        st = MemoryStatus()
        st.dwLength = ctypes.sizeof(MemoryStatus)
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(st)):
            return int(st.ullAvailPhys)
    return None
