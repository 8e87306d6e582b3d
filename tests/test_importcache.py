"""transformers' map of its model modules, saved for the next cold start (worker/importcache.py).

Each case runs a fresh worker interpreter: the map is made when transformers is first imported.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from i2l_ext.worker import importcache, lightimport
importcache.PATHS = [sys.argv[2]] if sys.argv[2] != "0" else []
lightimport.install()
import transformers
from transformers import Siglip2VisionModel, DINOv3ViTModel, Siglip2ImageProcessor
from transformers.utils import import_utils as iu
from pathlib import Path
models = Path(transformers.__file__).parent / "models"
same = None
if hasattr(iu.define_import_structure, "_i2l_original"):
    hits = importcache.state["hits"]
    same = iu.define_import_structure(models, prefix="models") == iu.define_import_structure._i2l_original(models, prefix="models")
    assert importcache.state["hits"] == hits + 1 or importcache.state["misses"] > 0
print(json.dumps(dict(importcache.state, same=same, classes=[Siglip2VisionModel.__name__, DINOv3ViTModel.__name__,
                                                            Siglip2ImageProcessor.__name__])))
"""


def probe(cache):
    r = subprocess.run([sys.executable, "-c", PROBE, ROOT, str(cache)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_made_once_then_read_back_the_same(tmp_path):
    cache = tmp_path / "models.json"
    first = probe(cache)
    assert first["misses"] >= 1 and first["writes"] >= 1        # made by transformers, then saved
    assert first["classes"] == ["Siglip2VisionModel", "DINOv3ViTModel", "Siglip2ImageProcessor"]
    assert cache.is_file()
    second = probe(cache)
    assert second["misses"] == 0 and second["writes"] == 0 and second["hits"] >= 2
    assert second["same"] is True                  # the saved map is transformers' own, exactly
    assert second["classes"] == first["classes"]


def test_stale_or_broken_copy_is_rebuilt(tmp_path):
    cache = tmp_path / "models.json"
    probe(cache)
    entries = json.loads(cache.read_text())["entries"]
    stale = {}
    for k, v in entries.items():
        path, prefix, mtime, init = k.split("|")
        stale[f"{path}|{prefix}|{int(mtime) - 1}|{init}"] = v        # transformers reinstalled since
    cache.write_text(json.dumps({"entries": stale}))
    got = probe(cache)
    assert got["misses"] >= 1 and got["writes"] >= 1
    assert set(json.loads(cache.read_text())["entries"]) == set(entries)   # the stale keys replaced
    cache.write_text("{not json")
    got = probe(cache)
    assert got["misses"] >= 1 and got["classes"][0] == "Siglip2VisionModel"
    assert set(json.loads(cache.read_text())["entries"]) == set(entries)


def test_off_switch_leaves_transformers_alone(tmp_path):
    got = probe("0")
    assert got["hits"] == got["misses"] == got["writes"] == 0 and got["same"] is None
