"""The typed job contract: messages as keys with fields (rendered in the reader's language, never
matched back from English), errors with codes, a request checked once in the host and a spec
checked once in the worker."""
from __future__ import annotations

import ast
import glob
import json
import math
import os
import re
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, ROOT)
from i2l_ext import i18n  # noqa: E402
from i2l_ext.contract import (CONTRACT_VERSION, MAX_RANK, I2LError, JobRequest, JobResult, JobSpec, T,  # noqa: E402
                              Text, raw)

PRODUCT = glob.glob(os.path.join(ROOT, "i2l_ext", "**", "*.py"), recursive=True) + \
    glob.glob(os.path.join(ROOT, "scripts", "*.py"))


def load(lang):
    with open(os.path.join(ROOT, "i2l_ext", "locales", f"{lang}.json"), encoding="utf-8") as f:
        return json.load(f)


def test_text_renders_in_each_language_and_round_trips():
    t = T("m_bad_name", name="'a/b'", problem=T("m_name_slash"))
    assert t.render("en") == "Bad LoRA name 'a/b': The name can't contain / or \\ (use the subfolder field for folders)."
    zh = t.render("zh_CN")
    assert "a/b" in zh and "子文件夹" in zh and "Bad" not in zh
    assert t.render("en", surface="cli").endswith("(put folders in --subfolder).")     # the command line's words
    back = Text.from_dict(json.loads(json.dumps(t.to_dict())))
    assert back == t and back.render("zh_CN") == zh
    lines = T("m_weights_missing", head=T("m_variant_needs", variant="Style", n=2),
              lines=[T("m_missing_line", title=T("m_file_style"), repo="r", path="p", size="1 GB")] * 2,
              looked=T("m_looked_in", dirs="/m"))
    assert lines.render("zh_CN").count("\n") == 3 and "解码器" in lines.render("zh_CN")
    assert raw("No such file").render("zh_CN") == "No such file"


def test_error_carries_code_key_and_fields_across_the_pipe():
    e = I2LError(I2LError.NAME_TAKEN, T("m_name_being_made", name="x"), T("m_name_being_made_fix"), "detail")
    back = I2LError.from_dict(json.loads(json.dumps(e.to_dict())))
    assert (back.code, back.text, back.fix_text, back.details) == (e.code, e.text, e.fix_text, "detail")
    assert back.render("zh_CN")[0] == T("m_name_being_made", name="x").render("zh_CN")
    assert I2LError.from_dict({"code": "nonsense", "text": {"key": "m_done", "fields": {}}}).code == I2LError.INTERNAL
    assert I2LError.from_dict({"text": "English"}).code == I2LError.INTERNAL        # unreadable: said so
    with pytest.raises(TypeError):
        I2LError(I2LError.BAD_INPUT, "plain English")


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            yield name, node


def _is_text(node) -> bool:
    return isinstance(node, (ast.Constant, ast.JoinedStr)) and isinstance(getattr(node, "value", ""), str) \
        or isinstance(node, ast.BinOp)


def test_no_english_where_a_message_is_made():
    """Errors, progress steps and job log lines are made of keys: no string literal or f-string is
    handed to them, anywhere in the product (a string there could never be translated)."""
    bad = []
    for path in PRODUCT:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for name, node in _calls(tree):
            if name in ("I2LError", "bad_input", "os_error"):
                args = node.args[1:3] if name == "I2LError" else node.args[:1]
            elif name in ("_progress", "progress"):
                args = node.args[3:4]
            elif name in ("_log",) or (name == "log" and len(node.args) == 2):
                args = node.args[1:2]
            else:
                continue
            args = list(args) + [k.value for k in node.keywords if k.arg in ("text", "fix")]
            for a in args:
                if isinstance(a, (ast.JoinedStr, ast.BinOp)) or (isinstance(a, ast.Constant) and isinstance(a.value, str)):
                    bad.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert bad == []


def test_every_key_the_code_uses_exists_in_every_language():
    tables = {lang: load(lang) for lang in ("en", "zh_CN")}
    used = set()
    for path in PRODUCT:
        with open(path, encoding="utf-8") as f:
            src = f.read()
        used |= set(re.findall(r'\bT\("([A-Za-z0-9_@.]+)"', src)) | set(re.findall(r'\bt\("([a-z0-9_]+)"[,)]', src))
    from i2l_ext import catalog, output
    used |= {f"m_file_{r}" for r in catalog.FILES} | {f"field_{n}" for n in ("name", "subfolder", "activation_text",
                                                                           "description")}
    used |= set(output._ERRNO_KEYS.values()) | set(output._REFUSED_CATEGORIES.values())
    used |= {"m_writing_lora", "m_writing_extras"} | {f"profile_{p}" for p in ("auto", "gpu", "cpu_offload", "disk", "cpu")}
    used.discard("key")                   # i18n's own docstring
    for lang, table in tables.items():
        assert sorted(k for k in used if k not in table) == [], lang
    assert len(used) > 250


@pytest.mark.parametrize("field,value", [("preferred_weight", float("nan")), ("preferred_weight", float("inf")),
                                         ("preferred_weight", 11), ("preferred_weight", "1"),
                                         ("preferred_weight", True), ("description", "a\ud800b"),
                                         ("activation_text", "x" * 10_001), ("variant", "nope"),
                                         ("key_format", "peft"), ("vram_profile", "fast"), ("images", "a.png"),
                                         ("bias", "yes"), ("max_rank", 0), ("max_rank", -4), ("max_rank", 2.5),
                                         ("max_rank", "8"), ("max_rank", True), ("max_rank", MAX_RANK + 1)])
def test_request_checked_once_with_the_reason(field, value):
    req = JobRequest(images=["a.png"], name="n")
    setattr(req, field, value)
    with pytest.raises(I2LError) as e:
        req.check()
    assert e.value.code == I2LError.BAD_INPUT
    assert e.value.text.render("zh_CN") != e.value.text.render("en")


def test_a_good_request_passes():
    JobRequest(images=["a.png"], name="n", preferred_weight=-10, description="表情 ✓").check()
    for cap in (1, 8, MAX_RANK):
        JobRequest(images=["a.png"], name="n", max_rank=cap).check()
    assert math.isfinite(JobRequest(images=[], name="n").preferred_weight)


def test_spec_checked_as_it_enters_the_worker():
    good = JobSpec(variant="style", images=["/a.png"], files={"style": ["/s"]}, output={"tmp_path": "/t"})
    assert JobSpec.from_dict(json.loads(json.dumps(good.to_dict()))) == good
    for change in ({"version": CONTRACT_VERSION + 1}, {"surprise": 1}, {"images": "/a.png"}, {"bias": "no"},
                   {"gpu_hold_s": float("nan")}, {"gpu_hold_gb": -1}, {"key_format": "x"}, {"metadata": {"a": 1}},
                   {"device": "tpu"}, {"max_rank": 0}, {"max_rank": "8"}):
        with pytest.raises(I2LError) as e:
            JobSpec.from_dict(dict(good.to_dict(), **change))
        assert e.value.code == I2LError.INTERNAL and "m_bad_spec" == e.value.text.key
    assert JobSpec.from_dict({"files": {"style": "/s"}}).files == {"style": ["/s"]}
    assert JobSpec.from_dict(dict(good.to_dict(), max_rank=8)).max_rank == 8
    old_host = good.to_dict()
    del old_host["max_rank"]                  # a spec from a host without the rank cap: no cap
    assert JobSpec.from_dict(old_host).max_rank is None


def test_result_round_trips_with_warnings():
    r = JobResult(path="/p", sidecar="/s", preview="/v", bytes=3, keys=2, rank=4, variant="style", images=1,
                  bias=False, seconds=0.5, warnings=[T("m_tiny")], extra={"copied_to_gpu": 9})
    back = JobResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back == r and back.get("copied_to_gpu") == 9 and back.warnings[0].render("zh_CN") != back.warnings[0].render("en")


def test_language_switch_changes_the_words_not_the_message():
    t = T("m_job_timeout", s="60")
    try:
        i18n.set_language("zh_CN")
        assert "60" in t.render() and "任务" in t.render()
    finally:
        i18n.set_language("en")
    assert t.render() == "The job took longer than 60 s and was stopped."
