"""End to end through a real worker subprocess with the tiny model set.

The test process plays the host: it never imports torch. Each test checks what a user would
see (the files in the Lora folder, the message) and that no process is left behind.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from i2l_ext import catalog
from i2l_ext.settings import Settings
from i2l_ext.contract import I2LError
from i2l_ext.service import JobRequest, Service
from helpers import ROOT, children, gone, read_header, slow_worker


def group_members(pgid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().split(")")[-1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    out.append(int(d))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    return out


@pytest.fixture
def service(worker_python, tiny_models, lora_dir):
    cfg = Settings(models_dir=tiny_models, lora_dir=lora_dir, worker_python=worker_python, host="cli",
                   keep_warm_minutes=1)
    s = Service(cfg)
    yield s
    s.shutdown()


@pytest.fixture
def paused_service(worker_python, tiny_models, lora_dir):
    """A service whose worker pauses 30 s before writing, so a test can act mid-job."""
    python, env = slow_worker(worker_python, 30)
    cfg = Settings(models_dir=tiny_models, lora_dir=lora_dir, worker_python=python, worker_env_vars=env)
    s = Service(cfg)
    yield s
    s.shutdown()


def test_z_image_end_to_end(service, images, lora_dir):
    """A Z-Image LoRA from the same service: the keys Forge Neo and ComfyUI read for Z-Image, the
    base model in the metadata, the card's advice on CFG; kohya names and a Bias are refused
    before a worker is asked, with the reason."""
    job = service.run(JobRequest(images=images[:2], name="my_z", variant="z-image"))
    assert job.state == "done", job.error
    header = read_header(job.result.path)
    meta = header.pop("__metadata__")
    assert meta["modelspec.architecture"] == "Z-Image/lora" and meta["ss_base_model_version"] == "z_image"
    assert {k.split(".")[1] for k in header} == {"layers", "context_refiner", "noise_refiner"}
    assert all(k.startswith("diffusion_model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in header)
    card = json.load(open(job.result.sidecar))
    assert "CFG" in card["notes"] and card["sd version"] == "Unknown"
    for bad, words in ((dict(key_format="kohya"), "cannot be written with 'kohya'"), (dict(bias=True), "no Bias LoRA")):
        with pytest.raises(I2LError) as ei:
            service.run(JobRequest(images=images[:1], name="bad_z", variant="z-image", **bad))
        assert ei.value.code == I2LError.BAD_INPUT and words in ei.value.message
    assert sorted(os.listdir(lora_dir)) == ["my_z.json", "my_z.preview.png", "my_z.safetensors"]


def test_forge_neo_cards_name_the_family():
    from i2l_ext import families, hosts
    assert hosts.WebUIHooks(host="neo").sd_version(families.Z_IMAGE) == "zit"
    assert hosts.WebUIHooks(host="neo").sd_version(families.QWEN_IMAGE) == "qwen"
    assert hosts.WebUIHooks(host="a1111").sd_version(families.Z_IMAGE) == "Unknown"


def test_style_end_to_end(service, images, lora_dir):
    job = service.run(JobRequest(images=images, name="my_style", variant="style", preferred_weight=0.8))
    assert job.state == "done", job.error
    r = job.result
    assert r.prompt == "<lora:my_style:0.8>"
    assert sorted(os.listdir(lora_dir)) == ["my_style.json", "my_style.preview.png", "my_style.safetensors"]
    header = read_header(r.path)
    meta = header.pop("__metadata__")
    assert meta["modelspec.architecture"] == "Qwen-Image/lora"
    assert meta["ss_base_model_version"] == "qwen_image"
    assert meta["i2l.variant"] == "style" and meta["i2l.images"] == "3"
    assert len(json.loads(meta["i2l.image_sha256"])) == 3
    assert "ss_output_name" not in meta
    assert all(k.startswith("diffusion_model.transformer_blocks.") for k in header)
    a = [v["shape"] for k, v in header.items() if k.endswith("lora_A.weight")]
    assert a and all(s[0] == 4 * len(images) for s in a)       # rank 4 per image
    card = json.load(open(r.sidecar))
    assert card["preferred weight"] == 0.8 and card["sd version"] == "Unknown"
    phases = [e["phase"] for e in job._events if e["type"] == "progress"]
    for p in ("load", "encode", "decode", "write"):
        assert p in phases
    fractions = [e["fraction"] for e in job._events if e["type"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    # the warm worker serves the next job without starting again
    pid = service.worker_pid()
    job2 = service.run(JobRequest(images=images[:1], name="second", variant="style", key_format="kohya"))
    assert job2.state == "done", job2.error
    assert service.worker_pid() == pid
    h2 = read_header(job2.result.path)
    h2.pop("__metadata__")
    assert any(k.endswith(".alpha") for k in h2) and any(k.startswith("lora_unet_") for k in h2)
    assert "torch" not in sys.modules and "diffsynth" not in sys.modules


def test_coarse_fine_bias_end_to_end(service, images, lora_dir):
    job = service.run(JobRequest(images=images[:2], name="cfb", variant="coarse-fine"))
    assert job.state == "done", job.error
    meta = read_header(job.result.path)["__metadata__"]
    assert meta["i2l.variant"] == "coarse-fine" and meta["i2l.bias"] == "true"
    header = read_header(job.result.path)
    a = [v["shape"][0] for k, v in header.items() if k.endswith("lora_A.weight")]
    assert set(a) == {2 * 4 * 2 + 4}      # 2 decoders x 2 images x rank 4, plus Bias rank 4
    job2 = service.run(JobRequest(images=images[:2], name="cf", variant="coarse-fine", bias=False))
    assert job2.state == "done", job2.error
    a2 = {v["shape"][0] for k, v in read_header(job2.result.path).items() if k.endswith("lora_A.weight")}
    assert a2 == {16}


def test_cancel_mid_run_leaves_nothing(paused_service, lora_dir, images):
    service = paused_service
    job = service.start(JobRequest(images=images, name="cancelled", variant="style"))
    for ev in job.events(timeout=120):
        if ev["type"] == "log" and "pausing" in ev.get("message", ""):
            break
        if ev["type"] == "progress" and ev["phase"] == "merge":
            break
    pid = service.worker_pid()
    assert pid
    time.sleep(0.5)
    t0 = time.monotonic()
    service.cancel()
    assert job.wait(15)
    assert time.monotonic() - t0 < 10
    assert job.state == "cancelled"
    assert os.listdir(lora_dir) == []
    assert gone(pid) and group_members(pid) == []


def test_worker_killed_mid_run(paused_service, lora_dir, images):
    service = paused_service
    job = service.start(JobRequest(images=images, name="killed", variant="style"))
    for ev in job.events(timeout=120):
        if ev["type"] == "progress" and ev["phase"] in ("decode", "merge"):
            break
    pid = service.worker_pid()
    time.sleep(1.0)
    os.kill(pid, signal.SIGKILL)
    assert job.wait(20)
    assert job.state == "error"
    assert job.error.code == I2LError.WORKER_CRASHED and "SIGKILL" in job.error.message
    assert job.error.fix
    assert os.listdir(lora_dir) == []
    assert gone(pid)
    # the service recovers: the next job starts a fresh worker
    service.config.worker_env = {}
    job2 = service.run(JobRequest(images=images[:1], name="after", variant="style"))
    assert job2.state == "done", job2.error


def test_missing_weights_named(worker_python, tmp_path, lora_dir, images):
    cfg = Settings(models_dir=str(tmp_path / "empty"), lora_dir=lora_dir, worker_python=worker_python)
    with pytest.raises(I2LError) as e:
        Service(cfg).start(JobRequest(images=images, name="x", variant="style"))
    assert e.value.code == I2LError.WEIGHTS_MISSING
    assert "SigLIP2-G384" in e.value.message and str(tmp_path / "empty") in e.value.message
    assert "download" in e.value.fix
    assert os.listdir(lora_dir) == []


@pytest.fixture
def broken_models(tiny_models, tmp_path):
    d = tmp_path / "models"
    shutil.copytree(tiny_models, d)
    return d


def test_wrong_weight_file_named(worker_python, broken_models, lora_dir, images):
    style = catalog.FILES["style"].local_path(str(broken_models))
    shutil.copy(catalog.FILES["siglip2"].local_path(str(broken_models)), style)
    cfg = Settings(models_dir=str(broken_models), lora_dir=lora_dir, worker_python=worker_python)
    service = Service(cfg)
    try:
        job = service.run(JobRequest(images=images, name="x", variant="style"))
        assert job.state == "error" and job.error.code == I2LError.WEIGHTS_INVALID
        assert "Qwen-Image-i2L-Style.safetensors" in job.error.message
        assert os.listdir(lora_dir) == []
    finally:
        service.shutdown()


def test_pickle_weight_file_refused(worker_python, broken_models, lora_dir, images, tmp_path):
    style = catalog.FILES["style"].local_path(str(broken_models))
    marker = tmp_path / "unpickled"
    # A pickle that would create a file if it were ever loaded.
    import pickle

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    with open(style, "wb") as f:
        pickle.dump({"x": Boom()}, f)
    cfg = Settings(models_dir=str(broken_models), lora_dir=lora_dir, worker_python=worker_python)
    service = Service(cfg)
    try:
        job = service.run(JobRequest(images=images, name="x", variant="style"))
        assert job.state == "error" and job.error.code == I2LError.WEIGHTS_INVALID
        assert "safetensors" in job.error.message and "Qwen-Image-i2L-Style" in job.error.message
        assert not marker.exists()
        assert os.listdir(lora_dir) == []
    finally:
        service.shutdown()


def test_jobs_wait_in_one_queue(paused_service, lora_dir, images, monkeypatch):
    """A job started while the worker is busy waits in the queue with its place shown; its name is
    claimed meanwhile; a queued job can be cancelled (its name free again); the next job starts when
    the running one ends; a full queue refuses clearly."""
    from i2l_ext import service as service_mod
    monkeypatch.setattr(service_mod, "QUEUE_MAX", 2)
    svc = paused_service
    one = svc.start(JobRequest(images=images, name="one", variant="style"))
    two = svc.start(JobRequest(images=images, name="two", variant="style"))
    with pytest.raises(I2LError) as e:                      # a queued job's name is taken
        svc.start(JobRequest(images=images, name="two", variant="style"))
    assert e.value.code == I2LError.NAME_TAKEN
    three = svc.start(JobRequest(images=images, name="three", variant="style"))
    assert one.state in ("starting", "running") and one.worker == 0
    assert (two.state, svc.position(two), three.state, svc.position(three)) == ("queued", 0, "queued", 1)
    with pytest.raises(I2LError) as e:                      # two are waiting: the queue is full
        svc.start(JobRequest(images=images, name="four", variant="style"))
    assert e.value.code == I2LError.QUEUE_FULL

    two.cancel()                                            # leaves the queue at once
    assert two.state == "cancelled" and two.finished and svc.position(three) == 0
    assert svc.check_name("two") is None                    # and gives its name back
    assert svc.job(two.id) is two and svc.job("nope") is None

    assert svc.cancel(one.id) and one.wait(30) and one.state == "cancelled"
    deadline = time.monotonic() + 60
    while three.state == "queued" and time.monotonic() < deadline:   # the next one is taken at once
        time.sleep(0.05)
    assert three.state in ("starting", "running") and svc.position(three) is None
    svc.shutdown()
    assert three.state == "cancelled"
    assert os.listdir(lora_dir) == []                       # nothing written, no claim left


def test_two_workers_run_two_jobs_at_once(worker_python, tiny_models, lora_dir, images):
    """``gpus`` 0,1: one worker per GPU, each seeing only its own (CUDA_VISIBLE_DEVICES), and two jobs
    run side by side, one on each (here on the CPU, each worker pausing 4 s before it writes)."""
    python, env = slow_worker(worker_python, 4)
    cfg = Settings(models_dir=tiny_models, lora_dir=lora_dir, worker_python=python, worker_env_vars=env,
                   gpus="0,1", standby=False)
    svc = Service(cfg)
    try:
        a = svc.start(JobRequest(images=images[:1], name="left", variant="style"))
        b = svc.start(JobRequest(images=images[:1], name="right", variant="style"))
        assert (a.worker, b.worker) == (0, 1) and svc.position(b) is None   # no waiting: a worker each
        both = False
        deadline = time.monotonic() + 240
        while not (a.finished and b.finished) and time.monotonic() < deadline:
            pids = svc.worker_pids()
            both = both or (len(pids) == 2 and a.state == b.state == "running" and not a.finished and not b.finished)
            time.sleep(0.05)
        assert a.state == b.state == "done", (a.error, b.error)
        assert both                                          # they overlapped
        seen = {}
        for sl in svc.slots:
            with open(f"/proc/{sl.worker_pid()}/environ", "rb") as f:
                seen[sl.index] = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv).get(
                    b"CUDA_VISIBLE_DEVICES")
        assert seen == {0: b"0", 1: b"1"}
        assert sorted(os.listdir(lora_dir)) == ["left.json", "left.preview.png", "left.safetensors",
                                                "right.json", "right.preview.png", "right.safetensors"]
        # a worker killed mid-job: its job fails clearly, the other worker goes on serving
        a = svc.start(JobRequest(images=images[:1], name="killed", variant="style"))
        b = svc.start(JobRequest(images=images[:1], name="survivor", variant="style"))
        deadline = time.monotonic() + 120
        while not (a.state == b.state == "running" and a.phase in ("decode", "merge", "write")):
            assert time.monotonic() < deadline and not a.finished, (a.state, a.phase)
            time.sleep(0.05)
        os.kill(svc.slots[a.worker].worker_pid(), signal.SIGKILL)
        assert a.wait(30) and a.state == "error" and a.error.code == I2LError.WORKER_CRASHED, a.error
        assert b.wait(120) and b.state == "done", b.error
        assert "killed.safetensors" not in os.listdir(lora_dir)
    finally:
        svc.shutdown()
    assert svc.worker_pids() == []


def load_gpu_script(monkeypatch):
    """scripts/i2l_gpu.py loaded as a WebUI loads it (a stand-in ``modules.scripts``)."""
    import importlib.util
    import types
    scripts = types.ModuleType("modules.scripts")
    scripts.AlwaysVisible = object()
    scripts.Script = type("Script", (), {})
    modules = types.ModuleType("modules")
    modules.__path__ = []
    modules.scripts = scripts
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.scripts", scripts)
    spec = importlib.util.spec_from_file_location("i2l_gpu_script", os.path.join(ROOT, "scripts", "i2l_gpu.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    script = mod.ImageToLoraFreeGpu()
    assert script.show(False) is scripts.AlwaysVisible and script.ui(False) == []
    return script


def test_webui_generation_asks_the_worker_to_let_go_of_the_gpu(service, images, monkeypatch):
    """Before every txt2img / img2img generation the always-on script asks the idle worker to free
    the VRAM it kept for a next job; it never starts a worker, and never waits on a running job."""
    import types
    from i2l_ext import hosts
    script = load_gpu_script(monkeypatch)
    monkeypatch.setattr(hosts, "_controller", types.SimpleNamespace(service=service))
    script.process(object())                      # no worker yet: nothing happens, nothing starts
    assert service.worker_pid() is None
    job = service.run(JobRequest(images=images[:1], name="held", variant="style"))
    assert job.state == "done", job.error
    assert job.result.held_on_gpu == 0         # the CPU keeps nothing on a GPU
    assert service.worker_stats()["parks"] == 0
    t = time.monotonic()
    script.process(object())
    assert time.monotonic() - t < 2.0
    stats = service.worker_stats()
    assert stats["parks"] == 1 and stats["held_on_gpu"] == 0
    assert stats["gc"] is True                    # paused while the worker imported, on again since
    reply = service.park()
    assert reply["type"] == "parked" and reply["freed"] == 0 and reply["parks"] == 2


def test_park_never_waits_for_a_worker_to_start(service):
    """The WebUI asks before every generation; a worker being started (tab just opened) holds
    nothing yet, and the generation must not wait for its start."""
    t = service.prewarm("style")
    deadline = time.monotonic() + 10
    while service.slots[0].worker is None and time.monotonic() < deadline:     # spawned, not yet answered
        time.sleep(0.005)
    assert service.slots[0].worker is not None and not service.slots[0].worker.hello
    started = time.monotonic()
    assert service.park() is None
    assert time.monotonic() - started < 0.5
    t.join(120)
    assert service.worker_pid() is not None
    reply = service.park()
    assert reply["type"] == "parked" and reply["freed"] == 0


def test_park_during_a_job_returns_at_once(paused_service, images):
    paused_service.start(JobRequest(images=images[:1], name="busy", variant="style"))
    t = time.monotonic()
    assert paused_service.park() is None
    assert time.monotonic() - t < 0.5
    paused_service.shutdown()


def test_bad_worker_python(tiny_models, lora_dir, images, tmp_path):
    cfg = Settings(models_dir=tiny_models, lora_dir=lora_dir, worker_python=str(tmp_path / "no-python"))
    job = Service(cfg).run(JobRequest(images=images, name="x", variant="style"))
    assert job.state == "error" and job.error.code == I2LError.ENVIRONMENT
    assert "no-python" in job.error.message and "--i2l-python" in job.error.fix


def test_cli_make_and_bad_input(worker_python, tiny_models, tmp_path, images):
    lora = tmp_path / "L"
    lora.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT)
    base = [sys.executable, "-m", "i2l_ext", "make", "--models-dir", tiny_models, "--lora-dir", str(lora),
            "--python", worker_python]
    # a rank cap of 0 is refused before anything runs
    p = subprocess.run(base + images + ["--name", "cli_style", "--max-rank", "0"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 2 and "rank cap 0" in p.stderr and "--max-rank" in p.stderr
    p = subprocess.run(base + images + ["--name", "cli_style", "--max-rank", "5", "-v"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "<lora:cli_style:1>" in p.stdout and "rank 5" in p.stdout
    assert "encode" in p.stderr and "100%" in p.stderr
    assert "Rank capped at 5: rank 12 became 5" in p.stderr
    header = read_header(str(lora / "cli_style.safetensors"))
    assert header.pop("__metadata__")["i2l.max_rank"] == "5"
    assert {v["shape"][0] for k, v in header.items() if k.endswith("lora_A.weight")} == {5}
    # same name again: refused, the first file untouched
    before = os.path.getmtime(lora / "cli_style.safetensors")
    p = subprocess.run(base + images + ["--name", "cli_style"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and "already exists" in p.stderr and "fix:" in p.stderr
    assert os.path.getmtime(lora / "cli_style.safetensors") == before
    # a name with ../ is refused with a suggestion
    p = subprocess.run(base + images + ["--name", "../escape"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and "Bad LoRA name" in p.stderr
    # not an image
    txt = tmp_path / "notes.png"
    txt.write_text("hello")
    p = subprocess.run(base + [str(txt), "--name", "t"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and "notes.png is not an image" in p.stderr
    assert sorted(os.listdir(lora)) == ["cli_style.json", "cli_style.preview.png", "cli_style.safetensors"]


# -- the standby worker (started ahead of need: code imported, no weights, no GPU) -------------------
def _cmdline(pid) -> list[bytes]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")


def test_standby_worker_takes_the_next_job(worker_python, tiny_models, lora_dir, images):
    s = Service(Settings(models_dir=tiny_models, lora_dir=lora_dir, worker_python=worker_python, keep_warm_minutes=1))
    try:
        assert s.standby() is True
        pid = s.standby_pid()
        assert pid and s.worker_pid() is None
        assert s.standby_ready(timeout=180), "the standby worker never said its code was imported"
        args = _cmdline(pid)
        assert b"--standby" in args and b"--prefetch" not in args                  # it reads no weights
        assert s.standby() is True and s.standby_pid() == pid                       # one at a time
        job = s.run(JobRequest(images=images, name="from_standby", variant="style"))
        assert job.state == "done", job.error
        assert s.worker_pid() == pid and s.standby_pid() is None                    # woken, not replaced
        assert any(f"pid {pid}" in line for line in job.log_lines())
        assert os.path.isfile(os.path.join(lora_dir, "from_standby.safetensors"))
        assert s.standby() is False                                                  # a warm worker is there
    finally:
        s.shutdown()
    assert gone(pid)


def test_standby_woken_while_it_still_imports(worker_python, tiny_models, lora_dir, images):
    s = Service(Settings(models_dir=tiny_models, lora_dir=lora_dir, worker_python=worker_python, keep_warm_minutes=1))
    try:
        s.standby()
        pid = s.standby_pid()
        assert not s.standby_ready()          # the click comes before its imports are done
        job = s.run(JobRequest(images=images, name="early_click", variant="style"))
        assert job.state == "done", job.error
        assert s.worker_pid() == pid
    finally:
        s.shutdown()
    assert gone(pid)


def test_standby_not_used_once_the_settings_changed(worker_python, tiny_models, lora_dir, images):
    cfg = Settings(models_dir=tiny_models, lora_dir=lora_dir, worker_python=worker_python, keep_warm_minutes=1)
    s = Service(cfg)
    try:
        s.standby()
        old = s.standby_pid()
        cfg.vram_limit_gb = 6.5                         # the user changed a setting the worker keeps
        job = s.run(JobRequest(images=images, name="fresh", variant="style"))
        assert job.state == "done", job.error
        assert s.worker_pid() not in (None, old)
        assert gone(old)
        assert b"6.5" in _cmdline(s.worker_pid())
    finally:
        s.shutdown()


def test_idle_worker_gives_way_to_a_standby(worker_python, tiny_models, lora_dir, images):
    """The warm worker (weights in RAM) goes after its idle time; a standby (code only) takes its place."""
    s = Service(Settings(models_dir=tiny_models, lora_dir=lora_dir, worker_python=worker_python, keep_warm_minutes=1 / 60))
    try:
        job = s.run(JobRequest(images=images, name="before_idle", variant="style"))
        assert job.state == "done", job.error
        started = [line for line in job.log_lines() if "Worker ready: pid " in line]
        assert started
        worker = int(started[0].split("Worker ready: pid ")[1].split(",")[0])   # it may be gone already
        deadline = time.monotonic() + 30
        while (s.worker_pid() is not None or s.standby_pid() is None) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert s.worker_pid() is None and s.standby_pid() not in (None, worker)
        assert gone(worker)
        standby = s.standby_pid()
    finally:
        s.shutdown()
    assert gone(standby)                                   # and it goes with the service


def test_standby_off_and_for_one_shot_jobs(worker_python, tiny_models, lora_dir, images):
    """As the CLI runs: one job, no worker kept, none on standby; when it returns, its worker is gone."""
    s = Service(Settings(models_dir=tiny_models, lora_dir=lora_dir, worker_python=worker_python, standby=False,
                         keep_warm_minutes=0))
    try:
        assert s.standby() is False and s.standby_pid() is None
        job = s.run(JobRequest(images=images, name="no_standby", variant="style"))
        assert job.state == "done", job.error
        started = [line for line in job.log_lines() if "Worker ready: pid " in line]
        worker = int(started[0].split("Worker ready: pid ")[1].split(",")[0])
    finally:
        s.shutdown()
    assert s.worker_pid() is None and s.standby_pid() is None
    assert gone(worker, 0.1)          # shutdown waited for the worker the job's end was stopping


HOST_WITH_STANDBY = """
import sys, time
from i2l_ext.settings import Settings
from i2l_ext.service import Service
s = Service(Settings(models_dir=sys.argv[1], lora_dir=sys.argv[2], worker_python=sys.argv[3]))
s.standby()
print(s.standby_pid(), flush=True)
s.standby_ready(timeout=180)
print("ready", flush=True)
time.sleep(600)
"""


def test_standby_ends_with_its_host(worker_python, tiny_models, lora_dir):
    """The WebUI killed outright: its standby worker notices its pipe closing and ends (no orphan)."""
    host = subprocess.Popen([sys.executable, "-c", HOST_WITH_STANDBY, tiny_models, lora_dir, worker_python],
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        pid = int(host.stdout.readline())
        assert host.stdout.readline().strip() == "ready"
        assert not gone(pid, 0.5)
        host.kill()
        host.wait(10)
        assert gone(pid, 15)
    finally:
        host.kill()


# -- no process outlives its parent ----------------------------------------------------------------
def test_cli_killed_mid_job_leaves_no_worker_and_the_next_job_sweeps_its_partials(worker_python, tiny_models,
                                                                                   tmp_path, images):
    lora = tmp_path / "L"
    lora.mkdir()
    python, shim = slow_worker(worker_python, 60)
    env = dict(os.environ, PYTHONPATH=ROOT, **shim)
    base = [sys.executable, "-m", "i2l_ext", "make", *images, "--models-dir", tiny_models, "--lora-dir", str(lora)]
    cli = subprocess.Popen(base + ["--name", "killed", "--python", python], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(n.endswith(".i2l-partial") and ".safetensors" in n
                                                       for n in os.listdir(lora)):
            time.sleep(0.1)
        workers = children(cli.pid, b"i2l_ext.worker")
        assert workers, "no worker found"
        cli.kill()                                        # kill -9: no cleanup of its own
        cli.wait(10)
        assert all(gone(w, 2.0) for w in workers)
    finally:
        cli.kill()
    left = sorted(os.listdir(lora))
    assert any(n.endswith(".i2l-partial") for n in left) and any(n.endswith(".i2l-claim") for n in left)
    p = subprocess.run(base + ["--name", "next", "--python", worker_python], env=dict(os.environ, PYTHONPATH=ROOT),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(lora)) == ["next.json", "next.preview.png", "next.safetensors"]


# -- every OSError ends the job with a clear error ---------------------------------------------------
def _in_private_mount(script: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) in a mount namespace of its own, where it may mount a tmpfs as the Lora
    folder and make it full or read-only; skipped where this machine allows no such namespace."""
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs none /mnt"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no private mount namespace here (unshare -rm): " + probe.stderr.decode()[-200:])
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=ROOT))


def test_a_full_disk_ends_the_job_with_a_clear_error(worker_python, tiny_models, tmp_path, images):
    lora = tmp_path / "L"
    lora.mkdir()
    make = " ".join([sys.executable, "-m", "i2l_ext", "make", *images, "--models-dir", tiny_models,
                     "--lora-dir", str(lora), "--name", "full", "--python", worker_python])
    p = _in_private_mount(f"mount -t tmpfs -o size=1m none {lora} && {make}; echo rc=$?; ls -a {lora}")
    assert "rc=2" in p.stdout, p.stderr
    assert "the disk is full" in p.stderr and "this needs" in p.stderr, p.stderr
    assert p.stdout.split("rc=2", 1)[1].split() == [".", ".."]        # nothing left behind


def test_a_folder_turned_read_only_mid_job_ends_it_with_a_clear_error(worker_python, tiny_models, tmp_path, images):
    lora = tmp_path / "L"
    lora.mkdir()
    python, shim = slow_worker(worker_python, 5)
    make = " ".join([sys.executable, "-m", "i2l_ext", "make", *images, "--models-dir", tiny_models,
                     "--lora-dir", str(lora), "--name", "ro", "--python", python])
    script = (f"export SHIM_PYTHON={shim['SHIM_PYTHON']} SHIM_PAUSE_BEFORE_WRITE=5; "
              f"mount -t tmpfs none {lora} && "
              f"(while ! ls -a {lora} | grep -q 'safetensors.i2l-partial'; do sleep 0.1; done; "
              f"mount -o remount,ro {lora}) & {make}; echo rc=$?; ls -a {lora}")
    t0 = time.monotonic()
    p = _in_private_mount(script)
    assert time.monotonic() - t0 < 240                                   # it ended: no hang
    assert "rc=2" in p.stdout, p.stdout + p.stderr
    assert "read-only" in p.stderr, p.stderr
    assert not [n for n in p.stdout.split("rc=2", 1)[1].split() if not n.startswith(".")]   # no LoRA appeared


def test_cli_refuses_a_weight_that_is_not_a_number_and_says_each_notice_once(worker_python, tiny_models, tmp_path):
    from helpers import make_image
    lora = tmp_path / "L"
    small = make_image(tmp_path / "small.png", size=(100, 80))
    base = [sys.executable, "-m", "i2l_ext", "make", small, "--models-dir", tiny_models, "--lora-dir", str(lora),
            "--python", worker_python]
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run(base + ["--name", "w", "--weight", "nan"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and "not a number between -10 and 10" in p.stderr
    p = subprocess.run(base + ["--name", "w", "--description", "a\udc80b"], capture_output=True, text=True, env=env,
                       timeout=120, errors="surrogateescape")
    assert p.returncode == 2 and "broken character" in p.stderr
    assert not lora.exists() or os.listdir(lora) == []
    p = subprocess.run(base + ["--name", "once"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("small.png is small (100x80)") == 1, p.stderr
    assert "Made the Lora folder" not in p.stderr or p.stderr.count("Made the Lora folder") == 1
