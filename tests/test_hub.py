"""Model files: catalog resolution, the downloader against a local hub stand-in, the real hub
clients against the same stand-in, offline use, the models command line."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hubstub import COMMIT, HubStub  # noqa: E402

from i2l_ext import catalog, hub  # noqa: E402
from i2l_ext.catalog import (ENCODERS_REPO, QWEN_EDIT_REPO, QWEN_I2L_REPO, QWEN_IMAGE_REPO,  # noqa: E402
                             Z_IMAGE_REPO, Z_IMAGE_OMNI_REPO)
from i2l_ext.contract import I2LError  # noqa: E402
from i2l_ext.hub import cli as hub_cli  # noqa: E402
from i2l_ext.hub.sources import Source  # noqa: E402


def _blob(n: int, seed: int) -> bytes:
    out, i = bytearray(), 0
    while len(out) < n:
        out += hashlib.sha256(b"%d-%d" % (seed, i)).digest()
        i += 1
    return bytes(out[:n])


def make_repos() -> dict[str, dict[str, bytes]]:
    index = {"metadata": {"total_size": 9000},
             "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    return {
        ENCODERS_REPO: {"SigLIP2-G384/model.safetensors": _blob(3000, 1), "DINOv3-7B/model.safetensors": _blob(9000, 2),
                        "README.md": b"encoders"},
        QWEN_I2L_REPO: {"Qwen-Image-i2L-Style.safetensors": _blob(5000, 3), "Qwen-Image-i2L-Coarse.safetensors": _blob(6000, 4),
                   "Qwen-Image-i2L-Fine.safetensors": _blob(6500, 5), "Qwen-Image-i2L-Bias.safetensors": _blob(700, 6),
                   "README.md": b"i2l"},
        QWEN_IMAGE_REPO: {"text_encoder/model-00001-of-00002.safetensors": _blob(4000, 7),
                          "text_encoder/model-00002-of-00002.safetensors": _blob(2000, 8),
                          "text_encoder/model.safetensors.index.json": json.dumps(index).encode(),
                          "text_encoder/config.json": b'{"hidden_size": 8}',
                          "transformer/diffusion_pytorch_model.safetensors": _blob(3000, 9)},
        QWEN_EDIT_REPO: {f"processor/{n}": (b'{"k": "%s"}' % n.encode()) for n in
                         ("preprocessor_config.json", "tokenizer_config.json", "tokenizer.json", "vocab.json",
                          "special_tokens_map.json")} | {"processor/merges.txt": b"#version: 0.2\na b\n" * 10},
        Z_IMAGE_REPO: {"model.safetensors": _blob(3200, 10), "README.md": b"z"},
        Z_IMAGE_OMNI_REPO: {"model.safetensors": _blob(3300, 11), "README.md": b"zo"},
    }


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy",
              "I2L_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "DIFFSYNTH_MODEL_BASE_PATH"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms-cache"))


@pytest.fixture
def stub(clean_env):
    with HubStub(make_repos()) as s:
        yield s


@pytest.fixture
def models_dir(tmp_path):
    d = tmp_path / "models" / "i2L"
    d.mkdir(parents=True)
    return str(d)


def hf(stub) -> Source:
    return hub.get_source("custom", stub.url, "huggingface")


def ms(stub) -> Source:
    return hub.get_source("custom", stub.url, "modelscope")


def downloader(models_dir, source, **kw):
    kw.setdefault("backoff", 0.01)
    kw.setdefault("reserve", 0)
    return hub.Downloader(models_dir, source=source, **kw)


def repo_file(models_dir, repo, path):
    return os.path.join(models_dir, *repo.split("/"), *path.split("/"))


def assert_same(path, data):
    with open(path, "rb") as f:
        assert f.read() == data


def parts_under(d):
    return [os.path.join(r, n) for r, _, ns in os.walk(d) for n in ns if n.endswith(".part")]


# -- the real clients against the stand-in -------------------------------------------------------------
def test_real_clients_download_from_stub_and_their_caches_are_used_in_place(stub, tmp_path, models_dir, worker_python):
    """The hub clients the worker environment installs (huggingface_hub, modelscope) download from
    the stand-in, and the caches they fill are then used in place."""
    hf_home, ms_cache = tmp_path / "hf-home", tmp_path / "ms-cache"
    env = dict(os.environ, HF_ENDPOINT=stub.url, MODELSCOPE_ENDPOINT=stub.url, HF_HOME=str(hf_home),
               MODELSCOPE_CACHE=str(ms_cache), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1",
               NO_PROXY="127.0.0.1,localhost", PYTHONPATH="")
    code = f"""
import json, sys
from huggingface_hub import hf_hub_download
from modelscope import model_file_download, snapshot_download
out = {{}}
out["hf_siglip"] = hf_hub_download({ENCODERS_REPO!r}, "SigLIP2-G384/model.safetensors")
out["hf_dino"] = hf_hub_download({ENCODERS_REPO!r}, "DINOv3-7B/model.safetensors")
out["hf_json"] = hf_hub_download({QWEN_IMAGE_REPO!r}, "text_encoder/config.json")
out["ms_style"] = model_file_download({QWEN_I2L_REPO!r}, "Qwen-Image-i2L-Style.safetensors")
out["ms_snap"] = snapshot_download({QWEN_EDIT_REPO!r}, allow_patterns=["processor/*"])
print(json.dumps(out))
"""
    r = subprocess.run([worker_python, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    repos = make_repos()
    assert_same(out["hf_siglip"], repos[ENCODERS_REPO]["SigLIP2-G384/model.safetensors"])
    assert_same(out["hf_dino"], repos[ENCODERS_REPO]["DINOv3-7B/model.safetensors"])
    assert_same(out["ms_style"], repos[QWEN_I2L_REPO]["Qwen-Image-i2L-Style.safetensors"])
    assert os.path.isfile(os.path.join(out["ms_snap"], "processor", "tokenizer.json"))
    assert stub.count("/api/v1/models/") > 0 and stub.count(f"/{ENCODERS_REPO}/resolve/main/") > 0

    # Both caches are found and used where they are, with no request and no copy.
    before = len(stub.requests)
    dirs = [str(hf_home / "hub"), str(ms_cache)]
    files = catalog.resolve_files("style", models_dir, search_dirs=dirs)
    assert os.path.realpath(files["siglip2"][0]) == os.path.realpath(out["hf_siglip"])
    assert files["siglip2"][0].startswith(str(hf_home))
    assert files["style"][0].startswith(str(ms_cache))
    proc = catalog.locate("processor", models_dir, dirs)
    assert proc.present and proc.in_place and proc.paths[0].startswith(str(ms_cache))
    assert os.listdir(models_dir) == []
    assert len(stub.requests) == before


# -- our downloader ------------------------------------------------------------------------------------
def test_full_download_huggingface_api(stub, models_dir):
    events = []
    dl = downloader(models_dir, hf(stub), progress=events.append)
    result = dl.download("style")
    repos = make_repos()
    for repo, path in [(ENCODERS_REPO, "SigLIP2-G384/model.safetensors"), (ENCODERS_REPO, "DINOv3-7B/model.safetensors"),
                       (QWEN_I2L_REPO, "Qwen-Image-i2L-Style.safetensors")]:
        assert_same(repo_file(models_dir, repo, path), repos[repo][path])
    assert len(result["downloaded"]) == 3 and result["bytes"] == 3000 + 9000 + 5000
    assert not os.path.exists(repo_file(models_dir, ENCODERS_REPO, "README.md"))   # only what the variant needs
    assert parts_under(models_dir) == []
    last = events[-1]
    assert last["state"] == "done" and last["done"] == last["total"] == 17000
    assert any(e["state"] == "downloading" and e["file_count"] == 3 for e in events)
    files = catalog.resolve_files("style", models_dir)
    assert set(files) == {"siglip2", "dinov3", "style"}
    manifest = catalog.load_manifest(models_dir)
    assert manifest[QWEN_I2L_REPO]["Qwen-Image-i2L-Style.safetensors"]["sha256"] == HubStub.sha256(
        repos[QWEN_I2L_REPO]["Qwen-Image-i2L-Style.safetensors"])
    # Everything present: a second download asks nothing.
    n = len(stub.requests)
    again = downloader(models_dir, hf(stub)).download("style")
    assert again["downloaded"] == [] and len(stub.requests) == n


def test_full_download_modelscope_api_sharded_encoder_and_processor(stub, models_dir):
    result = downloader(models_dir, ms(stub)).download("coarse-fine")
    repos = make_repos()
    files = catalog.resolve_files("coarse-fine", models_dir)
    assert [os.path.basename(p) for p in files["text_encoder"]] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for p in files["text_encoder"]:
        assert_same(p, repos[QWEN_IMAGE_REPO]["text_encoder/" + os.path.basename(p)])
    assert os.path.isfile(repo_file(models_dir, QWEN_IMAGE_REPO, catalog.TEXT_ENCODER_INDEX))
    assert not os.path.exists(repo_file(models_dir, QWEN_IMAGE_REPO, "text_encoder/config.json"))
    assert not os.path.exists(repo_file(models_dir, QWEN_IMAGE_REPO, "transformer"))
    assert files["processor"] == [repo_file(models_dir, QWEN_EDIT_REPO, "processor")]
    assert sorted(os.listdir(files["processor"][0])) == sorted(p.split("/")[1] for p in repos[QWEN_EDIT_REPO])
    assert "bias" in files and result["source"]["api"] == "modelscope"
    assert stub.count("/api/v1/models/") > 0 and stub.count("/api/models/") == 0


def test_interrupted_transfer_resumes_with_range_in_the_same_run(stub, models_dir):
    path = "DINOv3-7B/model.safetensors"
    stub.drop_after[path] = [2500, 6000]
    dl = downloader(models_dir, hf(stub), retries=3, chunk=1000)
    dl.download("style")
    assert_same(repo_file(models_dir, ENCODERS_REPO, path), make_repos()[ENCODERS_REPO][path])
    assert stub.ranges(path) == [None, "bytes=2500-", "bytes=6000-"]
    assert any("resuming at 2500" in str(line) for line in dl.log)


def test_interrupted_transfer_then_resume_later(stub, models_dir):
    path = "Qwen-Image-i2L-Style.safetensors"
    stub.drop_after[path] = [3000]
    with pytest.raises(I2LError) as e:
        downloader(models_dir, ms(stub), retries=0, chunk=1000).download("style")
    assert e.value.code == I2LError.DOWNLOAD
    dest = repo_file(models_dir, QWEN_I2L_REPO, path)
    assert not os.path.exists(dest)
    assert os.path.getsize(dest + ".part") == 3000
    # Finished files stay; the next run fetches only the rest of the unfinished one.
    plan = downloader(models_dir, ms(stub)).plan("style")
    assert [(i.remote.path, i.have) for i in plan.items] == [(path, 3000)]
    n_before = len(stub.ranges(path))
    downloader(models_dir, ms(stub)).download("style")
    assert_same(dest, make_repos()[QWEN_I2L_REPO][path])
    assert stub.ranges(path)[n_before:] == ["bytes=3000-"]
    assert parts_under(models_dir) == []


def test_cancel_keeps_the_part_and_a_new_task_resumes(stub, models_dir):
    path = "DINOv3-7B/model.safetensors"
    holder = {}

    def on_progress(s):
        if s["state"] == "downloading" and s["file"] and s["file"].endswith(path) and s["file_done"] >= 2000:
            holder["task"].cancel()

    task = hub.DownloadTask(models_dir, "style", source=hf(stub), on_progress=on_progress, chunk=1000, reserve=0)
    holder["task"] = task
    task._progress.min_interval = 0          # every chunk reports, so the cancel lands mid-file
    task.start()
    assert task.wait(30)
    assert task.error is not None and task.error.code == I2LError.CANCELLED
    assert task.progress()["state"] == "cancelled"
    part = repo_file(models_dir, ENCODERS_REPO, path) + ".part"
    kept = os.path.getsize(part)
    assert 2000 <= kept < 9000
    task2 = hub.DownloadTask(models_dir, "style", source=hf(stub), reserve=0).start()
    assert task2.wait(30) and task2.error is None, task2.error
    assert not task2.is_alive() and task2.progress()["bytes"] == 9000 + 5000   # SigLIP2 was already here
    assert task2.progress()["state"] == "done"
    assert_same(repo_file(models_dir, ENCODERS_REPO, path), make_repos()[ENCODERS_REPO][path])
    assert stub.ranges(path)[-1] == f"bytes={kept}-"


def test_cancel_while_the_connection_hangs_is_immediate(stub, models_dir):
    path = "DINOv3-7B/model.safetensors"
    stub.stall_at[path] = 4000              # the hub stops sending part way and keeps the connection open
    task = hub.DownloadTask(models_dir, "style", source=hf(stub), reserve=0).start()
    assert stub.stalled.wait(30)
    deadline = time.monotonic() + 10
    while task.progress()["file_done"] < 4000:      # the bytes that came are counted, not a whole chunk later
        assert time.monotonic() < deadline, task.progress()
        time.sleep(0.02)
    time.sleep(hub.download.STALLED_S + 0.5)
    p = task.progress()
    assert p["state"] == "downloading" and p["speed"] == 0 and p["eta"] is None   # no made-up time left
    t0 = time.monotonic()
    task.cancel()
    assert task.wait(5), "Cancel waited for the hung connection"
    assert time.monotonic() - t0 < 2
    assert task.error is not None and task.error.code == I2LError.CANCELLED
    assert os.path.getsize(repo_file(models_dir, ENCODERS_REPO, path) + ".part") == 4000
    assert not os.path.exists(repo_file(models_dir, ENCODERS_REPO, path))
    stub.release.set()
    task2 = hub.DownloadTask(models_dir, "style", source=hf(stub), reserve=0).start()
    assert task2.wait(30) and task2.error is None, task2.error
    assert_same(repo_file(models_dir, ENCODERS_REPO, path), make_repos()[ENCODERS_REPO][path])
    assert stub.ranges(path)[-1] == "bytes=4000-"


def test_corrupted_file_is_detected_and_fetched_again(stub, models_dir):
    path = "Qwen-Image-i2L-Style.safetensors"
    stub.corrupt[path] = 1
    dl = downloader(models_dir, hf(stub))
    dl.download("style")
    assert_same(repo_file(models_dir, QWEN_I2L_REPO, path), make_repos()[QWEN_I2L_REPO][path])
    assert len(stub.ranges(path)) == 2
    assert any("sha256" in str(line) and path in str(line) for line in dl.log)


def test_file_corrupted_every_time_is_never_used(stub, models_dir):
    path = "Qwen-Image-i2L-Style.safetensors"
    stub.corrupt[path] = 99
    with pytest.raises(I2LError) as e:
        downloader(models_dir, ms(stub), attempts=3).download("style")
    assert e.value.code == I2LError.DOWNLOAD and "damaged 3 times" in e.value.message
    dest = repo_file(models_dir, QWEN_I2L_REPO, path)
    assert not os.path.exists(dest) and not os.path.exists(dest + ".part")
    with pytest.raises(I2LError) as e:
        catalog.resolve_files("style", models_dir)
    assert e.value.code == I2LError.WEIGHTS_MISSING and path in e.value.message


def test_small_non_lfs_files_are_checked_by_git_hash(stub, models_dir):
    path = "processor/tokenizer.json"
    stub.corrupt[path] = 1
    dl = downloader(models_dir, hf(stub))
    dl.download("coarse")
    assert any("git hash" in str(line) and path in str(line) for line in dl.log)
    assert_same(repo_file(models_dir, QWEN_EDIT_REPO, path), make_repos()[QWEN_EDIT_REPO][path])


def test_refuses_when_the_disk_is_too_small(stub, models_dir, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10_000))
    with pytest.raises(I2LError) as e:
        downloader(models_dir, hf(stub)).download("style")
    msg = e.value.message
    assert e.value.code == I2LError.DOWNLOAD and "need 17 KB" in msg and "10 KB free" in msg
    assert stub.count(f"/{ENCODERS_REPO}/resolve/") == 0 and stub.count(f"/{QWEN_I2L_REPO}/resolve/") == 0
    assert parts_under(models_dir) == []


def test_user_files_are_never_overwritten_or_deleted(stub, models_dir):
    downloader(models_dir, hf(stub)).download("coarse")       # the hub's listing is now known
    dest = repo_file(models_dir, QWEN_I2L_REPO, "Qwen-Image-i2L-Style.safetensors")
    with open(dest, "wb") as f:
        f.write(b"my own partial copy")
    with pytest.raises(I2LError) as e:
        downloader(models_dir, hf(stub)).download("style")
    assert e.value.code == I2LError.WEIGHTS_INVALID and dest in e.value.message
    assert_same(dest, b"my own partial copy")
    # A same-size file with other bytes: present for a job, reported by verify, left alone.
    good = make_repos()[QWEN_I2L_REPO]["Qwen-Image-i2L-Style.safetensors"]
    with open(dest, "wb") as f:
        f.write(b"x" * len(good))
    downloader(models_dir, hf(stub)).download("style")
    assert_same(dest, b"x" * len(good))
    rows = hub.verify(models_dir, "style", source=hf(stub))
    status = {r["path"]: r["status"] for r in rows}
    assert status["Qwen-Image-i2L-Style.safetensors"] == "mismatch"
    assert status["DINOv3-7B/model.safetensors"] == "ok"
    assert_same(dest, b"x" * len(good))
    assert hub_cli.main(["verify", "style", "--models-dir", models_dir, "--offline"]) == 1


def test_size_differing_from_published_blocks_a_job(stub, models_dir):
    downloader(models_dir, hf(stub)).download("style")
    dest = repo_file(models_dir, ENCODERS_REPO, "SigLIP2-G384/model.safetensors")
    with open(dest, "ab") as f:
        f.write(b"extra")
    with pytest.raises(I2LError) as e:
        catalog.resolve_files("style", models_dir)
    assert e.value.code == I2LError.WEIGHTS_INVALID and dest in e.value.message


# -- offline -------------------------------------------------------------------------------------------
@pytest.fixture
def no_network(monkeypatch):
    calls = []
    real = socket.socket.connect

    def refuse(self, address):
        calls.append(address)
        raise OSError("network use in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield calls
    monkeypatch.setattr(socket.socket, "connect", real)


def test_z_image_after_style_needs_only_its_decoder(stub, models_dir):
    """The encoders are the same files for Style and Z-Image: a user who has Style is told of one
    missing file, and the download fetches only that."""
    downloader(models_dir, ms(stub)).download("style")
    with pytest.raises(I2LError) as ei:
        catalog.resolve_files("z-image", models_dir)
    missing = json.loads(ei.value.details)["missing"]
    assert [(m["repo"], m["path"]) for m in missing] == [(Z_IMAGE_REPO, "model.safetensors")]
    assert "Z-Image i2L decoder" in ei.value.message and "models download z-image" in ei.value.fix
    n = len(stub.requests)
    got = downloader(models_dir, ms(stub)).download("z-image")
    assert got["downloaded"] == [catalog.FILES["z_image"].local_path(models_dir)]
    assert not any("General-Image-Encoders" in r["path"] or "General-Image-Encoders" in str(r["query"])
               for r in stub.requests[n:])
    assert set(catalog.resolve_files("z-image", models_dir)) == {"siglip2", "dinov3", "z_image"}


def test_offline_job_with_everything_present_makes_no_request(stub, models_dir, monkeypatch, tmp_path, capsys):
    for v in ("coarse-fine", "style", "z-image", "z-image-omni"):
        downloader(models_dir, ms(stub)).download(v)
    hub.save_settings(models_dir, source="custom", endpoint=stub.url, api="modelscope")
    monkeypatch.setenv("HF_ENDPOINT", stub.url)
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", stub.url)
    n = len(stub.requests)
    with pytest.MonkeyPatch.context() as mp:
        calls = []
        mp.setattr(socket.socket, "connect", lambda self, a: calls.append(a) or (_ for _ in ()).throw(OSError("net")))
        for v in catalog.VARIANTS:
            files = catalog.resolve_files(v, models_dir)
            assert files and all(files.values())
        # The job service resolves the same way before starting the worker.
        from i2l_ext.settings import Settings
        from i2l_ext.service import Service
        svc = Service(Settings(models_dir=models_dir, lora_dir=str(tmp_path / "Lora"), offline=True))
        assert set(svc.resolve_files("coarse-fine", True)) == {"siglip2", "dinov3", "text_encoder", "processor",
                                                               "coarse", "fine", "bias"}
        assert all(v["complete"] for v in hub.models_status(models_dir))
        assert downloader(models_dir, None, offline=True).download("coarse-fine")["downloaded"] == []
        rows = hub.verify(models_dir, offline=True)
        assert rows and all(r["status"] == "ok" for r in rows)
        assert hub_cli.main(["list", "--models-dir", models_dir, "--offline"]) == 0
        assert hub_cli.main(["download", "style", "--models-dir", models_dir, "--offline"]) == 0
        assert calls == []
    assert len(stub.requests) == n


def test_offline_flag_forbids_every_call(stub, models_dir, monkeypatch, capsys):
    with pytest.raises(I2LError) as e:
        downloader(models_dir, hf(stub), offline=True).download("style")
    assert e.value.code == I2LError.DOWNLOAD and "Offline" in e.value.message
    monkeypatch.setenv("I2L_OFFLINE", "1")
    assert hub_cli.main(["download", "style", "--models-dir", models_dir, "--endpoint", stub.url]) == 1
    assert "Offline" in capsys.readouterr().err
    assert stub.requests == []


# -- files already on disk -----------------------------------------------------------------------------
def _hf_cache_entry(cache, repo, files, rev=COMMIT):
    org, name = repo.split("/")
    base = os.path.join(cache, f"models--{org}--{name}")
    os.makedirs(os.path.join(base, "refs"), exist_ok=True)
    with open(os.path.join(base, "refs", "main"), "w") as f:
        f.write(rev)
    for path, data in files.items():
        blob = os.path.join(base, "blobs", hashlib.sha256(data).hexdigest())
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        with open(blob, "wb") as f:
            f.write(data)
        link = os.path.join(base, "snapshots", rev, *path.split("/"))
        os.makedirs(os.path.dirname(link), exist_ok=True)
        try:
            os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
        except OSError:
            shutil.copyfile(blob, link)


def test_hf_cache_and_diffsynth_folder_used_in_place_without_copies(stub, models_dir, tmp_path):
    repos = make_repos()
    cache = str(tmp_path / "hf-cache" / "hub")
    enc = repos[ENCODERS_REPO]
    _hf_cache_entry(cache, ENCODERS_REPO, {k: v for k, v in enc.items() if k != "README.md"})
    diffsynth = tmp_path / "DiffSynth-Studio" / "models"
    style = repo_file(str(diffsynth), QWEN_I2L_REPO, "Qwen-Image-i2L-Style.safetensors")
    os.makedirs(os.path.dirname(style))
    with open(style, "wb") as f:
        f.write(repos[QWEN_I2L_REPO]["Qwen-Image-i2L-Style.safetensors"])
    dirs = [cache, str(diffsynth)]
    files = catalog.resolve_files("style", models_dir, search_dirs=dirs)
    assert files["siglip2"][0] == os.path.join(cache, f"models--DiffSynth-Studio--General-Image-Encoders",
                                               "snapshots", COMMIT, "SigLIP2-G384", "model.safetensors")
    assert files["style"] == [style]
    st = {r["role"]: r for r in hub.models_status(models_dir, dirs)[0]["roles"]}
    assert st["siglip2"]["in_place"] and st["siglip2"]["where"] == cache
    # A download for style fetches nothing; for coarse it fetches only what is not anywhere.
    assert downloader(models_dir, hf(stub), search_dirs=dirs).download("style")["downloaded"] == []
    downloader(models_dir, hf(stub), search_dirs=dirs).download("coarse", bias=False)
    assert stub.count(f"/{ENCODERS_REPO}/") == 0
    assert not os.path.exists(os.path.join(models_dir, "DiffSynth-Studio", "General-Image-Encoders"))
    assert sorted(catalog.resolve_files("coarse", models_dir, search_dirs=dirs)) == [
        "coarse", "dinov3", "processor", "siglip2", "text_encoder"]
    # Nothing in the search folders changed.
    assert_same(style, repos[QWEN_I2L_REPO]["Qwen-Image-i2L-Style.safetensors"])


def test_remembered_search_folders_and_hub_caches(stub, models_dir, tmp_path, capsys):
    repos = make_repos()
    diffsynth = tmp_path / "DiffSynth-Studio" / "models"
    style = repo_file(str(diffsynth), QWEN_I2L_REPO, "Qwen-Image-i2L-Style.safetensors")
    os.makedirs(os.path.dirname(style))
    with open(style, "wb") as f:
        f.write(repos[QWEN_I2L_REPO]["Qwen-Image-i2L-Style.safetensors"])
    enc = repos[ENCODERS_REPO]
    _hf_cache_entry(str(tmp_path / "hf-home" / "hub"), ENCODERS_REPO, {k: v for k, v in enc.items() if k != "README.md"})
    with pytest.raises(I2LError):
        catalog.resolve_files("style", models_dir)
    assert hub_cli.main(["search-dirs", "--add", str(diffsynth), "--hub-caches", "--models-dir", models_dir]) == 0
    assert str(diffsynth) in capsys.readouterr().out
    files = catalog.resolve_files("style", models_dir)           # the job path: no explicit folders
    assert files["style"] == [style] and files["siglip2"][0].startswith(str(tmp_path / "hf-home"))
    assert hub.models_status(models_dir)[0]["complete"]
    assert hub_cli.main(["search-dirs", "--remove", str(diffsynth), "--no-hub-caches", "--models-dir", models_dir]) == 0
    with pytest.raises(I2LError):
        catalog.resolve_files("style", models_dir)
    assert stub.requests == []


# -- messages --------------------------------------------------------------------------------------------
def test_missing_files_are_named_exactly_with_the_fix(models_dir, tmp_path):
    te = repo_file(models_dir, QWEN_IMAGE_REPO, "text_encoder")
    os.makedirs(te)
    repos = make_repos()
    for name in ("model-00001-of-00002.safetensors", "model.safetensors.index.json"):
        with open(os.path.join(te, name), "wb") as f:
            f.write(repos[QWEN_IMAGE_REPO]["text_encoder/" + name])
    with pytest.raises(I2LError) as e:
        catalog.resolve_files("coarse", models_dir, bias=False, search_dirs=[str(tmp_path / "elsewhere")])
    err = e.value
    assert err.code == I2LError.WEIGHTS_MISSING
    assert "Qwen/Qwen-Image/text_encoder/model-00002-of-00002.safetensors" in err.message
    assert "model-00001-of-00002" not in err.message
    assert "Qwen-Image-i2L-Coarse.safetensors" in err.message and "about 15.9 GB" in err.message
    assert models_dir in err.message and str(tmp_path / "elsewhere") in err.message
    assert "`python -m i2l_ext models download coarse`" in err.fix and "Models panel" in err.fix
    with pytest.raises(I2LError) as e:            # a flag only where it changes what is fetched, inside the command
        catalog.resolve_files("coarse-fine", models_dir, bias=False)
    assert "`python -m i2l_ext models download coarse-fine --no-bias`" in e.value.fix
    details = json.loads(err.details)
    assert details["variant"] == "coarse"
    assert {m["role"] for m in details["missing"]} == {"siglip2", "dinov3", "text_encoder", "processor", "coarse"}
    assert catalog.missing_roles(catalog.VARIANTS["coarse"], models_dir) == [
        "siglip2", "dinov3", "text_encoder", "processor", "coarse"]


# -- sources and settings ------------------------------------------------------------------------------
def test_sources_and_remembered_settings(models_dir, capsys):
    assert hub.get_source().endpoint == "https://www.modelscope.cn"
    assert hub.get_source("modelscope-intl").endpoint == "https://www.modelscope.ai"
    hfs = hub.get_source("huggingface")
    assert hfs.file_url("Qwen/Qwen-Image", "text_encoder/a b.json") == \
        "https://huggingface.co/Qwen/Qwen-Image/resolve/main/text_encoder/a%20b.json"
    assert hfs.list_url("Qwen/Qwen-Image") == "https://huggingface.co/api/models/Qwen/Qwen-Image/tree/main?recursive=true"
    m = hub.get_source("modelscope")
    assert m.file_url("Qwen/Qwen-Image", "text_encoder/x.json") == \
        "https://www.modelscope.cn/api/v1/models/Qwen/Qwen-Image/repo?Revision=master&FilePath=text_encoder%2Fx.json"
    mirror = hub.get_source(endpoint="hf-mirror.com/")
    assert (mirror.name, mirror.api, mirror.endpoint) == ("custom", "huggingface", "https://hf-mirror.com")
    with pytest.raises(I2LError):
        hub.get_source("nowhere")
    with pytest.raises(I2LError):
        hub.get_source("custom")
    assert hub_cli.main(["source", "custom", "--endpoint", "https://hf-mirror.com", "--models-dir", models_dir]) == 0
    src = hub.get_source(settings=hub.load_settings(models_dir))
    assert (src.name, src.endpoint, src.api) == ("custom", "https://hf-mirror.com", "huggingface")
    assert hub_cli.main(["source", "modelscope-intl", "--models-dir", models_dir]) == 0
    assert hub.get_source(settings=hub.load_settings(models_dir)).endpoint == "https://www.modelscope.ai"
    assert hub_cli.main(["path", "--models-dir", models_dir]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == models_dir


def test_proxy_variables_are_honoured(stub, models_dir, monkeypatch):
    """urllib reads HTTP(S)_PROXY itself: point it at the stand-in and ask for an unreachable host."""
    monkeypatch.setenv("HTTP_PROXY", stub.url)
    monkeypatch.setenv("http_proxy", stub.url)
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("no_proxy", "")
    src = hub.get_source("custom", "http://hub.invalid", "huggingface")
    files = hub.list_repo(src, QWEN_I2L_REPO)
    assert {f.path for f in files} >= {"Qwen-Image-i2L-Style.safetensors"}


# -- the command line ----------------------------------------------------------------------------------
def test_cli_download_list_verify(stub, models_dir, capsys):
    assert hub_cli.main(["download", "style", "--models-dir", models_dir, "--endpoint", stub.url, "--api",
                         "modelscope"]) == 0
    cap = capsys.readouterr()
    assert "Downloaded 3 file(s)" in cap.out
    assert "%" in cap.err and "left" in cap.err            # the progress line
    assert hub_cli.main(["list", "--models-dir", models_dir]) == 0
    out = capsys.readouterr().out
    assert "Style [style]: complete" in out and "python -m i2l_ext models download coarse-fine" in out
    assert hub_cli.main(["verify", "style", "--models-dir", models_dir, "--offline"]) == 0
    out = capsys.readouterr().out
    assert out.count("ok ") == 3
    assert hub_cli.main(["download", "coarse", "--dry-run", "--models-dir", models_dir, "--endpoint", stub.url]) == 0
    out = capsys.readouterr().out
    assert "Qwen-Image-i2L-Coarse.safetensors" in out and "SigLIP2" not in out


def test_registered_in_the_main_command_line(models_dir, capsys):
    import argparse
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    hub_cli.register(sub)
    args = parser.parse_args(["models", "path", "--models-dir", models_dir])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == models_dir
