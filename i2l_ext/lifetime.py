"""No process of ours outlives its parent.

A child (the worker, the standalone app under its launcher) calls ``exit_with_parent(pid)`` first
thing: it then ends within moments of its parent's death however that comes (a crash, ``kill -9``,
a closed terminal), also while it imports or reads weights.

- Linux: the kernel sends SIGKILL when the parent goes (``prctl(PR_SET_PDEATHSIG)``), whatever
  the child is doing, even inside a long call that holds Python's interpreter lock. The kernel
  counts the *thread* that started the child as its parent, so the host starts children from one
  thread that lives as long as the host (``spawn``), never from a job's thread.
- Windows: a thread waits on a handle to the parent process.
- Elsewhere: a thread looks at ``os.getppid()`` twice a second.

Standard library only.
"""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

PR_SET_PDEATHSIG = 1


def exit_with_parent(parent_pid: int | None) -> None:
    """End this process when process ``parent_pid`` ends (at once if it already has)."""
    if not parent_pid:
        return
    if sys.platform.startswith("linux") and _pdeathsig():
        if os.getppid() != parent_pid:          # it died before the request was in place
            os._exit(1)
        return
    if os.name == "nt":
        _wait_on_windows(parent_pid)
        return
    _poll_ppid(parent_pid)


def _pdeathsig() -> bool:
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _poll_ppid(parent_pid: int) -> None:
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="i2l-parent-watch").start()


def _wait_on_windows(parent_pid: int) -> None:
    import ctypes
    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(0x00100000, False, parent_pid)      # SYNCHRONIZE
    if not handle:
        os._exit(1)                                                     # already gone

    def watch():
        kernel32.WaitForSingleObject(handle, 0xFFFFFFFF)               # INFINITE
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="i2l-parent-watch").start()


class _Spawner:
    """Starts child processes from one thread that lives as long as this process (see above)."""

    def __init__(self):
        self._requests: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, *args, **kwargs) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, daemon=True, name="i2l-spawner")
                self._thread.start()
        done, box = threading.Event(), {}
        self._requests.put((args, kwargs, box, done))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["proc"]

    def _serve(self) -> None:
        while True:
            args, kwargs, box, done = self._requests.get()
            try:
                box["proc"] = subprocess.Popen(*args, **kwargs)
            except BaseException as e:
                box["error"] = e
            finally:
                done.set()


spawn = _Spawner().popen


def forward_signals(proc: subprocess.Popen) -> None:
    """In a launcher's main thread: pass SIGINT and SIGTERM on to ``proc`` (which ends its own
    children in turn) instead of dying and leaving it running."""
    def handler(signum, frame):
        try:
            proc.send_signal(signum)
        except OSError:
            pass
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, handler)
        except (ValueError, OSError):        # not the main thread, or a signal this system lacks
            pass


def stop_on_sigterm() -> None:
    """SIGTERM ends the program the way Ctrl-C does (so its cleanup runs: the worker is stopped)."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        pass
