"""The host side stays light: no torch, no diffsynth, fast to import, pure protocol."""
import json
import os
import subprocess
import sys

import pytest

from i2l_ext import protocol
from i2l_ext.contract import I2LError, T
from helpers import ROOT, QueueLock

HOST_MODULES = ["i2l_ext", "i2l_ext.cli", "i2l_ext.service", "i2l_ext.supervisor", "i2l_ext.output",
                "i2l_ext.images", "i2l_ext.catalog", "i2l_ext.settings", "i2l_ext.protocol"]


def test_host_modules_import_no_torch():
    code = ("import sys, time; t=time.perf_counter(); " + "; ".join(f"import {m}" for m in HOST_MODULES)
            + "; dt=time.perf_counter()-t; heavy=[m for m in ('torch','transformers','diffsynth','numpy','gradio') "
              "if m in sys.modules]; print(__import__('json').dumps({'s': dt, 'heavy': heavy}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT), check=True)
    r = json.loads(out.stdout)
    assert r["heavy"] == []
    assert r["s"] < 0.5


def test_protocol_round_trip_and_noise():
    msg = {"type": "progress", "job": "a", "phase": "encode", "step": 1, "total": 3, "message": "图像 1/3"}
    line = protocol.encode(msg)
    assert line.endswith(b"\n") and b"\n" not in line[:-1]
    assert protocol.decode(line) == msg
    for noise in (b"", b"Loading checkpoint shards: 100%\n", b"{not json}\n", b"[1, 2]\n", b'{"no_type": 1}\n'):
        assert protocol.decode(noise) is None


def test_error_round_trip():
    e = I2LError(I2LError.OUT_OF_MEMORY, T("m_oom"), T("m_oom_fix"), "tb")
    back = I2LError.from_dict(json.loads(json.dumps(e.to_dict())))
    assert (back.code, back.message, back.fix, back.details) == (e.code, e.message, e.fix, e.details)
    assert "Fix: Pick" in str(back)


def test_lock_waiter_with_a_lock_that_takes_no_timeout():
    import time
    from i2l_ext.hosts import LockWaiter
    lock = QueueLock()
    assert lock.acquire()                       # a txt2img generation holds the lock
    w = LockWaiter(lock)
    assert w.wait(0.2) is False                 # still waiting, and the caller is not blocked
    lock.release()
    assert w.wait(5) is True                    # the waiter now holds it for the caller
    assert lock.acquire(blocking=False) is False
    lock.release()

    assert lock.acquire()
    w = LockWaiter(lock)
    assert w.wait(0.1) is False
    w.abandon()                                 # the page went away while waiting
    lock.release()
    time.sleep(0.2)                             # the waiter takes it and hands it straight back
    assert lock.acquire(blocking=False) is True
    lock.release()
    w.abandon()                                 # twice is harmless


def test_host_gate_one_hold_for_jobs_side_by_side():
    """Jobs on two GPUs share one hold of the WebUI's queue lock: the first waits for a generation in
    progress (and says so), the VRAM is freed once and given back once, after the last job."""
    import threading
    import time
    from i2l_ext.hosts import HostGate
    lock, calls = QueueLock(), []
    gate = HostGate(lock, first=lambda: calls.append("first"), last=lambda: calls.append("last"))
    assert lock.acquire()                                   # a txt2img generation runs
    got = []
    t = threading.Thread(target=lambda: got.append(gate.enter(lambda: False, lambda: calls.append("waiting"))))
    t.start()
    time.sleep(0.6)
    assert got == [] and calls == ["waiting"]              # the job waits, and says it does
    lock.release()
    t.join(5)
    assert got == [True] and calls == ["waiting", "first"]
    assert gate.enter(lambda: False, lambda: calls.append("waiting")) is True    # a second job: no wait
    assert lock.acquire(blocking=False) is False           # txt2img waits for our jobs
    gate.leave()
    assert calls == ["waiting", "first"] and lock.acquire(blocking=False) is False
    gate.leave()                                            # the last job ends
    assert calls == ["waiting", "first", "last"]
    assert lock.acquire(blocking=False) is True             # the WebUI's again
    # a job cancelled while waiting holds nothing once it has left
    cancelled = threading.Event()
    t = threading.Thread(target=lambda: got.append(gate.enter(cancelled.is_set, lambda: None)))
    t.start()
    cancelled.set()
    t.join(5)
    assert got[-1] is False
    gate.leave()
    lock.release()
    time.sleep(0.3)
    assert lock.acquire(blocking=False) is True             # the abandoned wait gave it straight back
    lock.release()
    assert calls == ["waiting", "first", "last"]


def test_lora_cards_refreshed_only_where_the_host_can(monkeypatch):
    """A1111 / reForge refresh every extra-networks page at once, and their Textual Inversion page
    raises with no checkpoint loaded: the page then leaves the Lora cards alone."""
    import types
    from i2l_ext.hosts import lora_cards_refreshable
    model_data = types.SimpleNamespace(sd_model=None)
    modules = types.ModuleType("modules")
    modules.__path__ = []
    modules.sd_models = types.ModuleType("modules.sd_models")
    modules.sd_models.model_data = model_data
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.sd_models", modules.sd_models)
    assert lora_cards_refreshable("a1111") is False
    assert lora_cards_refreshable("reforge") is False
    assert lora_cards_refreshable("forge") is True and lora_cards_refreshable("neo") is True
    assert lora_cards_refreshable("standalone") is False
    model_data.sd_model = object()
    assert lora_cards_refreshable("a1111") is True


def test_one_controller_per_webui_process_across_reload_ui():
    """Reload UI runs scripts/i2l_tab.py again; the controller (and its worker) must be reused."""
    from i2l_ext import hosts
    made = []
    saved = hosts._controller
    hosts._controller = None
    try:
        first = hosts.webui_controller(lambda: made.append(1) or object())
        again = hosts.webui_controller(lambda: made.append(1) or object())
        assert first is again and made == [1]
    finally:
        hosts._controller = saved


def test_code_files_listed_once_after_a_quiet_spell_never_mid_burst(monkeypatch):
    """The worker lists its code files (for the next cold start) once after its first GPU job,
    but only when no job has come for RECORD_AFTER_S: jobs in a row are never slowed by it."""
    import threading
    import time
    from i2l_ext.worker import main, warmstart
    calls = []
    monkeypatch.setattr(warmstart, "record_code", lambda: calls.append(time.monotonic()))
    monkeypatch.setattr(main, "RECORD_AFTER_S", 0.4)
    engine = type("E", (), {"_lock": threading.RLock()})()
    rec = main._CodeRecorder(engine)
    rec.job_ended(False)                      # a CPU job: nothing to list for a GPU start
    time.sleep(0.6)
    assert calls == [] and rec._timer is None
    t0 = time.monotonic()
    for _ in range(5):                        # a burst of GPU jobs, 0.2 s apart
        rec.job_ended(True)
        time.sleep(0.2)
    last = rec.last_job
    time.sleep(0.8)
    assert len(calls) == 1 and calls[0] - last >= 0.4 - 0.02 and calls[0] - t0 > 1.0
    rec.job_ended(True)                       # listed once: later jobs change nothing
    time.sleep(0.6)
    assert len(calls) == 1


def test_api_callers_beyond_this_computer_need_a_login():
    """With no login set and a server others can reach, only this computer's callers get in; with
    logins, every caller shows one."""
    import types
    from i2l_ext import api
    from i2l_ext.contract import I2LError
    req = lambda host: types.SimpleNamespace(client=types.SimpleNamespace(host=host))   # noqa: E731
    open_api = api.Api(None, [], local_only=lambda: False)
    open_api.allowed(req("192.168.1.5"), None)                     # served to this computer only: no check
    closed = api.Api(None, [], local_only=lambda: True)
    closed.allowed(req("127.0.0.1"), None)
    closed.allowed(req("::1"), None)
    with pytest.raises(I2LError) as e:
        closed.allowed(req("192.168.1.5"), None)
    assert e.value.code == I2LError.NOT_ALLOWED and "--api-auth" in e.value.fix
    login = api.Api(None, [("ann", "s3cret")], local_only=lambda: True)
    cred = lambda u, p: types.SimpleNamespace(username=u, password=p)   # noqa: E731
    login.allowed(req("192.168.1.5"), cred("ann", "s3cret"))
    for c in (None, cred("ann", "wrong"), cred("bob", "s3cret")):
        with pytest.raises(api._Unauthorized):
            login.allowed(req("127.0.0.1"), c)


def test_lora_folders_as_neo_gives_them(monkeypatch, tmp_path):
    """Forge Neo: --lora-dir is its Lora folder (new LoRAs go there), --lora-dirs (repeatable) are more
    folders its Lora cards read, e.g. another WebUI's or ComfyUI's."""
    import types
    from i2l_ext import hosts
    modules = types.ModuleType("modules")
    modules.__path__ = []
    main, comfy, a1111 = (str(tmp_path / n) for n in ("Lora", "comfy-loras", "a1111-Lora"))
    modules.shared = types.SimpleNamespace(cmd_opts=types.SimpleNamespace(lora_dir=main, lora_dirs=[comfy, a1111, main]))
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.shared", modules.shared)
    assert hosts.lora_dirs() == [main, comfy, a1111] and hosts.lora_dir() == main
    modules.shared.cmd_opts = types.SimpleNamespace(lora_dir=main)          # AUTOMATIC1111, Forge, reForge
    assert hosts.lora_dirs() == [main]
