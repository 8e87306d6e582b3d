"""The output as a transaction: names checked (characters, bytes), the name claimed before anything is
written, only this job's files ever removed, dead jobs' leftovers swept, every OSError a clear error."""
import errno
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from helpers import ROOT
from i2l_ext import output
from i2l_ext.contract import I2LError


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", "..", "", " x", "CON", "lpt1", "x:y", "a*b", "q?",
                                  "a\x01b", "ends.", ".hidden", "x.safetensors", "n" * 121,
                                  "zero\u200bwidth", "bidi\u202eevil", "line\u2028sep", "para\u2029sep",
                                  "soft\u00adhyphen", "bom\ufeff", "tab\tname", "lone\ud800surrogate", "del\x7f"])
def test_bad_names(name, lora_dir):
    problem = output.name_problem(name)
    assert problem is not None
    assert problem.render("zh_CN") != problem.render("en")           # the reason, in the user's language
    with pytest.raises(I2LError) as e:
        output.plan_output(lora_dir, name)
    assert e.value.code == I2LError.BAD_INPUT and e.value.fix
    assert output.name_problem(output.suggest_name(name)) is None
    assert os.listdir(lora_dir) == []


def test_invisible_characters_are_named():
    assert "U+200B" in output.name_problem("a\u200bb").render("en")
    assert "U+202E" in output.name_problem("a\u202eb").render("en")


def test_length_limit_and_its_message_agree(lora_dir):
    assert output.name_problem("n" * output.MAX_NAME) is None
    msg = output.name_problem("n" * (output.MAX_NAME + 1)).render("en")
    assert f"at most {output.MAX_NAME}" in msg
    output.release(output.plan_output(lora_dir, "n" * output.MAX_NAME))


def test_names_are_measured_in_bytes_against_the_folder(lora_dir):
    emoji = "\U0001f3a8" * 60                      # 60 characters, 240 bytes in UTF-8
    assert output.name_problem(emoji) is None
    with pytest.raises(I2LError) as e:
        output.plan_output(lora_dir, emoji)
    assert e.value.code == I2LError.BAD_INPUT and "bytes" in e.value.message
    assert output.check_name(lora_dir, emoji) is not None                       # said as the user types
    fits = "\U0001f3a8" * ((output.name_max(lora_dir) - output.LONGEST_EXTRA) // 4)
    plan = output.plan_output(lora_dir, fits)
    for p in (plan.tmp_path, plan.tmp_sidecar, plan.tmp_preview):
        open(p, "wb").close()                      # the longest names this step writes all fit
    output.commit(plan)
    output.release(plan)
    assert sorted(os.listdir(lora_dir)) == sorted(fits + ext for ext in (".json", ".preview.png", ".safetensors"))


@pytest.mark.parametrize("name", ["my_style", "Style 2", "油画风格", "a.b-c", "🎨 art"])
def test_good_names(name, lora_dir):
    plan = output.plan_output(lora_dir, name)
    assert plan.path == os.path.join(lora_dir, name + ".safetensors")
    assert not plan.tmp_path.endswith(".safetensors")   # never listed by a WebUI while partial
    assert os.path.basename(plan.claim).startswith(".")
    output.release(plan)
    assert os.listdir(lora_dir) == []


def test_subfolders_only_inside_and_taken_back_when_the_job_fails(lora_dir, tmp_path):
    plan = output.plan_output(lora_dir, "x", "new/deep")
    assert plan.folder == os.path.join(lora_dir, "new", "deep") and os.path.isdir(plan.folder)
    assert plan.made_dirs == [os.path.join(lora_dir, "new"), os.path.join(lora_dir, "new", "deep")]
    open(plan.tmp_path, "wb").write(b"partial")
    assert output.abort(plan) == []
    assert os.listdir(lora_dir) == []                 # the folders this job made are gone again
    os.makedirs(os.path.join(lora_dir, "keep"))
    plan = output.plan_output(lora_dir, "x", "keep/deeper")
    open(os.path.join(plan.folder, "users_file.txt"), "w").write("mine")
    output.abort(plan)
    assert os.listdir(os.path.join(lora_dir, "keep", "deeper")) == ["users_file.txt"]   # not empty: kept
    for sub in ("../out", "/abs", "a/../../b", "C:/x"):
        with pytest.raises(I2LError):
            output.plan_output(lora_dir, "x", sub)
    os.symlink(str(tmp_path), os.path.join(lora_dir, "link"))
    with pytest.raises(I2LError) as e:
        output.plan_output(lora_dir, "x", "link")
    assert "outside" in e.value.message


def test_missing_lora_dir(tmp_path):
    with pytest.raises(I2LError) as e:
        output.plan_output(str(tmp_path / "nope"), "x")
    assert e.value.code == I2LError.OUTPUT and "does not exist" in e.value.message


def test_existing_name_refused_unless_overwrite(lora_dir):
    open(os.path.join(lora_dir, "taken.safetensors"), "wb").write(b"mine")
    with pytest.raises(I2LError) as e:
        output.plan_output(lora_dir, "taken")
    assert e.value.code == I2LError.NAME_TAKEN and "already exists" in e.value.message
    open(os.path.join(lora_dir, "card_only.json"), "w").write("{}")
    with pytest.raises(I2LError):
        output.plan_output(lora_dir, "card_only")
    plan = output.plan_output(lora_dir, "taken", overwrite=True)
    assert plan.overwrite
    output.release(plan)
    assert sorted(os.listdir(lora_dir)) == ["card_only.json", "taken.safetensors"]     # refusals leave nothing


def test_one_claim_per_name(lora_dir):
    first = output.plan_output(lora_dir, "same")
    with pytest.raises(I2LError) as e:
        output.plan_output(lora_dir, "same")
    assert e.value.code == I2LError.NAME_TAKEN and "being made" in e.value.message
    assert output.claimed(lora_dir, "same")
    assert "being made" in output.check_name(lora_dir, "same").render("en")
    output.release(first)
    assert not output.claimed(lora_dir, "same")
    output.release(output.plan_output(lora_dir, "same"))


CLAIMER = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
from i2l_ext import output
from i2l_ext.contract import I2LError
while not os.path.exists(sys.argv[3]):      # all start together
    time.sleep(0.001)
try:
    plan = output.plan_output(sys.argv[2], "race")
except I2LError as e:
    print(e.code, flush=True)
    sys.exit(0)
print("claimed", flush=True)
time.sleep(float(sys.argv[4]))
"""


def test_racing_processes_get_one_claim_and_a_dead_ones_claim_is_taken_over(lora_dir, tmp_path):
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, ROOT, lora_dir, str(go), "3"], stdout=subprocess.PIPE,
                              text=True) for _ in range(4)]
    go.touch()
    outs = sorted(p.communicate(timeout=30)[0].strip() for p in procs)
    assert outs == ["claimed", "name_taken", "name_taken", "name_taken"]
    # A claimer killed outright: its claim is dead, and the next job takes the name.
    go2 = tmp_path / "go2"
    go2.touch()
    p = subprocess.Popen([sys.executable, "-c", CLAIMER, ROOT, lora_dir, str(go2), "60"], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "claimed"
    assert output.claimed(lora_dir, "race")
    p.kill()
    p.wait()
    assert not output.claimed(lora_dir, "race")
    output.release(output.plan_output(lora_dir, "race"))


def test_a_dead_jobs_partial_files_are_swept_by_the_next_job(lora_dir):
    dead = output.plan_output(lora_dir, "crashed")
    for p in (dead.tmp_path, dead.tmp_sidecar, dead.tmp_preview):
        open(p, "wb").write(b"partial")
    os.close(output._HELD.pop(dead.claim)[1])       # as after a kill -9: the lock goes with its holder
    live = output.plan_output(lora_dir, "running")
    open(live.tmp_path, "wb").write(b"live partial")
    users = [os.path.join(lora_dir, n) for n in (".hidden_notes", ".x.abc.safetensors.i2l-partial", "keep.txt")]
    for p in users:
        open(p, "w").write("users")
    plan = output.plan_output(lora_dir, "next")
    names = sorted(os.listdir(lora_dir))
    assert not any(n.startswith(".crashed.") for n in names)          # the dead job's files and claim
    assert os.path.exists(live.tmp_path) and os.path.exists(live.claim)   # a running job's are left alone
    assert all(os.path.exists(p) for p in users)                         # not our pattern: never touched
    for p in (plan, live):
        output.release(p)


def test_commit_places_everything_and_never_clobbers(lora_dir):
    plan = output.plan_output(lora_dir, "x")
    open(plan.tmp_path, "wb").write(b"lora")
    output.write_card(plan, output.card_data("d", "act", 0.8, "qwen"))
    output.write_preview(plan, [Image.new("RGB", (50, 30), (9, 9, 9))] * 3)
    os.chmod(plan.tmp_path, 0o600)          # as some writers create it
    output.commit(plan)
    output.release(plan)
    assert sorted(os.listdir(lora_dir)) == ["x.json", "x.preview.png", "x.safetensors"]
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(plan.path).st_mode & 0o777 == 0o666 & ~mask   # readable like any new file
    card = json.load(open(plan.sidecar))
    assert card["sd version"] == "qwen" and card["preferred weight"] == 0.8 and card["activation text"] == "act"
    # a file that appears after planning is left alone, and so is everything else of the user's
    plan2 = output.plan_output(lora_dir, "y")
    for p in (plan2.tmp_path, plan2.tmp_sidecar, plan2.tmp_preview):
        open(p, "wb").write(b"new")
    open(plan2.path, "wb").write(b"users")
    with pytest.raises(I2LError) as e:
        output.commit(plan2)
    assert e.value.code == I2LError.NAME_TAKEN
    assert open(plan2.path, "rb").read() == b"users"
    assert not os.path.exists(plan2.preview) and not os.path.exists(plan2.sidecar)    # what it placed, taken back
    output.abort(plan2)
    output.release(plan2)
    assert sorted(os.listdir(lora_dir)) == ["x.json", "x.preview.png", "x.safetensors", "y.safetensors"]


def test_abort_removes_only_what_this_job_put_in_place(lora_dir):
    """A commit cut short (the worker killed between two renames): the files it placed are still
    this job's partials (hard links), so they go; a user's file of the same name would not."""
    plan = output.plan_output(lora_dir, "cut")
    for p in (plan.tmp_path, plan.tmp_sidecar, plan.tmp_preview):
        open(p, "wb").write(b"ours")
    os.link(plan.tmp_preview, plan.preview)          # placed, then the process died
    open(plan.sidecar, "wb").write(b"the user's card")   # not ours
    assert output.abort(plan) == []
    output.release(plan)
    assert sorted(os.listdir(lora_dir)) == ["cut.json"] and open(plan.sidecar, "rb").read() == b"the user's card"


def test_card_is_valid_json_or_refused(lora_dir):
    plan = output.plan_output(lora_dir, "c")
    with pytest.raises(ValueError):
        output.write_card(plan, output.card_data(preferred_weight=float("nan")))
    output.abort(plan)
    output.release(plan)


def test_contact_sheet_grid():
    sheet = output.contact_sheet([Image.new("RGB", (100, 50))] * 5)
    assert sheet.size == (768, 512)
    assert output.contact_sheet([Image.new("RGB", (10, 10))]).size == (768, 768)


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only"),
                                        (errno.EACCES, "permission denied"), (errno.ENAMETOOLONG, "too long"),
                                        (errno.EIO, "read or write error"), (errno.EXDEV, "Invalid cross-device")])
def test_every_os_error_is_a_clear_output_error(code, words):
    from i2l_ext.contract import T
    err = output.os_error(OSError(code, os.strerror(code)), T("m_writing_lora"), "/x/Lora", "59.0 MB")
    assert err.code == I2LError.OUTPUT
    assert err.message.startswith("Stopped while writing the LoRA in /x/Lora: ") and words in err.message
    assert "59.0 MB" in err.fix
    zh_message, zh_fix = err.render("zh_CN")
    assert "写入 LoRA" in zh_message and "59.0 MB" in zh_fix
