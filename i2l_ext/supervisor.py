"""Starting, talking to and stopping the worker process. Never imports torch.

The worker runs in its own process group (its own session on POSIX), so ending it ends
everything it started, and all of its GPU memory comes back to the system. It ends by itself when
this process dies (``lifetime``: it is started with ``--parent`` from the long-lived spawner thread).
"""
from __future__ import annotations

import collections
import os
import queue
import signal
import subprocess
import sys
import threading
import time

from . import lifetime, protocol
from .settings import EXT_ROOT
from .contract import I2LError, T, Text, raw

IS_WINDOWS = os.name == "nt"
REPAIR_HINT = T("m_repair_hint")


class WorkerProcess:
    def __init__(self, python: str, log=None, extra_env: dict | None = None, args: list[str] | None = None):
        self.python = python
        self.log = log or (lambda level, message: None)
        self.extra_env = extra_env or {}
        self.args = list(args or [])                  # the worker's settings (``Settings.worker_args``)
        self.proc: subprocess.Popen | None = None
        self.hello: dict | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=200)
        self._queue: queue.Queue = queue.Queue()
        self._killed = False
        self._lock = threading.Lock()
        self.standby = False                          # started ahead of need, not woken yet
        self.standby_ready = threading.Event()        # its code is imported (it said so)

    # -- life cycle -----------------------------------------------------------------------
    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
        env.update({
            "PYTHONPATH": EXT_ROOT, "PYTHONUNBUFFERED": "1", "PYTHONNOUSERSITE": "1",
            "PYTHONIOENCODING": "utf-8",
            # The worker gets resolved file paths and never asks a hub for anything.
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DIFFSYNTH_SKIP_DOWNLOAD": "true",
            "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
        })
        env.update(self.extra_env)
        return env

    def start(self, prefetch_files: list[str] | None = None, timeout: float = 600.0) -> dict:
        """Start the worker and wait for its ``hello`` (CUDA up, reading ``prefetch_files``)."""
        self._spawn(["--prefetch", *prefetch_files] if prefetch_files else [])
        return self._wait_hello(timeout)

    def start_standby(self) -> None:
        """Start the worker ahead of need: it imports its code, then waits for ``wake`` holding no
        GPU memory and no weights. Returns at once; ``standby_ready`` is set once the code is in."""
        self.standby = True
        self._spawn(["--standby"])

    def wake(self, prefetch_files: list[str] | None = None, timeout: float = 600.0) -> dict:
        """Turn a standby worker into a working one: it starts reading ``prefetch_files`` at once,
        then brings CUDA up and says ``hello`` (waited for here)."""
        self.send({"type": "wake", "prefetch": list(prefetch_files or [])})
        self.standby = False
        return self._wait_hello(timeout)

    def _spawn(self, more_args: list[str]) -> None:
        if not self.python or not os.path.exists(self.python):
            raise I2LError(I2LError.WORKER_START, T("m_python_not_found", path=self.python or "-"), REPAIR_HINT)
        kwargs = {}
        if IS_WINDOWS:
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True
        try:
            self.proc = lifetime.spawn([self.python, "-u", "-m", "i2l_ext.worker", "--parent", str(os.getpid()),
                                        *self.args, *more_args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, cwd=EXT_ROOT, env=self._env(), **kwargs)
        except OSError as e:
            raise I2LError(I2LError.WORKER_START, T("m_start_failed", python=self.python, error=raw(e)),
                           REPAIR_HINT) from None
        threading.Thread(target=self._read_stdout, daemon=True, name="i2l-worker-out").start()
        threading.Thread(target=self._read_stderr, daemon=True, name="i2l-worker-err").start()

    def _wait_hello(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.next_message(max(0.0, deadline - time.monotonic()))
            if msg is None:
                self.kill()
                raise I2LError(I2LError.TIMEOUT, T("m_start_timeout", s=f"{timeout:.0f}"),
                               T("m_start_timeout_fix", hint=REPAIR_HINT),
                               self.tail())
            if msg["type"] == "hello":
                break
        if msg.get("protocol") != protocol.PROTOCOL_VERSION:
            self.kill()
            raise I2LError(I2LError.WORKER_START,
                           T("m_protocol", a=msg.get('protocol'), b=protocol.PROTOCOL_VERSION),
                           T("m_protocol_fix", hint=REPAIR_HINT))
        self.hello = msg
        return msg

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def send(self, msg: dict) -> None:
        try:
            self.proc.stdin.write(protocol.encode(msg))
            self.proc.stdin.flush()
        except (OSError, ValueError, AttributeError):
            raise self.death_error() from None

    def next_message(self, timeout: float | None) -> dict | None:
        """The next protocol message; None on timeout; raises I2LError if the worker died."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                kind, item = self._queue.get(timeout=remaining)
            except queue.Empty:
                return None
            if kind == "msg":
                if item["type"] == "log":
                    try:
                        self.log(item.get("level", "info"), Text.from_dict(item.get("text")))
                    except ValueError:
                        self.log("debug", raw(repr(item)))
                return item
            if kind == "eof":
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.kill()
                raise self.death_error()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Ask the worker to leave; end it if it doesn't."""
        if not self.alive:
            return
        try:
            self.send({"type": "shutdown"})
            self.proc.wait(timeout=timeout)
        except (I2LError, subprocess.TimeoutExpired):
            pass
        self.kill()

    def kill(self) -> None:
        """End the worker's whole process group, at once."""
        with self._lock:
            self._killed = True
            proc = self.proc
            if proc is None:
                return
            if proc.poll() is None:
                try:
                    if IS_WINDOWS:
                        subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True)
                    else:
                        os.killpg(proc.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError, OSError):
                    pass
                try:
                    proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    pass
            if not IS_WINDOWS:
                try:   # anything the worker left in its group, even after it exited
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError, OSError):
                    pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                try:
                    stream.close()
                except Exception:
                    pass

    # -- diagnostics ----------------------------------------------------------------------
    def tail(self, n: int = 40) -> str:
        return "\n".join(list(self.stderr_tail)[-n:])

    def death_error(self) -> I2LError:
        code = self.proc.poll() if self.proc else None
        tail = self.tail()
        if self._killed:
            return I2LError(I2LError.CANCELLED, T("m_stopped"), None, tail)
        if "out of memory" in tail.lower() and ("cuda" in tail.lower() or "torch" in tail.lower()):
            return I2LError(I2LError.OUT_OF_MEMORY, T("m_oom_stopped"),
                            T("m_oom_fix"), tail)
        if "ModuleNotFoundError" in tail or "ImportError" in tail:
            return I2LError(I2LError.ENVIRONMENT, T("m_env_incomplete", error=raw(
                _last_line(tail, ("ModuleNotFoundError", "ImportError")))), REPAIR_HINT, tail)
        if code is not None and code < 0:
            try:
                sig = signal.Signals(-code).name
            except ValueError:
                sig = f"signal {-code}"
            message = T("m_killed_ram", sig=sig) if sig == "SIGKILL" else T("m_killed", sig=sig)
            return I2LError(I2LError.WORKER_CRASHED, message,
                            T("m_killed_fix"), tail)
        return I2LError(I2LError.WORKER_CRASHED, T("m_exited", code=code),
                        T("m_exited_fix", hint=REPAIR_HINT), tail)

    # -- readers --------------------------------------------------------------------------
    def _read_stdout(self) -> None:
        proc = self.proc
        for line in iter(proc.stdout.readline, b""):
            msg = protocol.decode(line)
            if msg is not None and msg.get("type") == "standby":
                self.standby_ready.set()
            elif msg is not None:
                self._queue.put(("msg", msg))
            else:
                text = line.decode("utf-8", "replace").rstrip()
                if text:
                    self.stderr_tail.append(text)
        self._queue.put(("eof", None))

    def _read_stderr(self) -> None:
        for line in iter(self.proc.stderr.readline, b""):
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                self.stderr_tail.append(text)
                self.log("debug", raw(text))


def _last_line(text: str, needles: tuple[str, ...]) -> str:
    for line in reversed(text.splitlines()):
        if any(n in line for n in needles):
            return line.strip()
    return text.strip().splitlines()[-1] if text.strip() else ""


def current_python() -> str:
    return sys.executable
