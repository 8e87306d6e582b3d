"""Names, folders and atomic placement: nothing a user owns is ever overwritten silently."""
import os

import pytest
from PIL import Image

from i2l_ext import output
from i2l_ext.errors import I2LError


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", "..", "", " x", "CON", "lpt1", "x:y", "a*b", "q?",
                                  "a\x01b", "ends.", ".hidden", "x.safetensors", "n" * 200])
def test_bad_names(name, lora_dir):
    assert output.name_problem(name)
    with pytest.raises(I2LError) as e:
        output.plan_output(lora_dir, name)
    assert e.value.code == I2LError.BAD_INPUT and e.value.fix
    assert output.name_problem(output.suggest_name(name)) is None
    assert os.listdir(lora_dir) == []


@pytest.mark.parametrize("name", ["my_style", "Style 2", "油画风格", "a.b-c"])
def test_good_names(name, lora_dir):
    plan = output.plan_output(lora_dir, name)
    assert plan.path == os.path.join(lora_dir, name + ".safetensors")
    assert not plan.tmp_path.endswith(".safetensors")   # never listed by a WebUI while partial


def test_subfolders_only_inside(lora_dir, tmp_path):
    plan = output.plan_output(lora_dir, "x", "styles/oil")
    assert plan.folder == os.path.join(lora_dir, "styles", "oil") and os.path.isdir(plan.folder)
    for sub in ("../out", "/abs", "a/../../b", "C:/x"):
        with pytest.raises(I2LError):
            output.plan_output(lora_dir, "x", sub)
    os.symlink(str(tmp_path), os.path.join(lora_dir, "link"))
    with pytest.raises(I2LError) as e:
        output.plan_output(lora_dir, "x", "link")
    assert "outside" in e.value.message


def test_missing_and_unwritable_lora_dir(tmp_path):
    with pytest.raises(I2LError) as e:
        output.plan_output(str(tmp_path / "nope"), "x")
    assert e.value.code == I2LError.OUTPUT and "does not exist" in e.value.message
    ro = tmp_path / "ro"; ro.mkdir(); ro.chmod(0o500)
    try:
        if os.access(str(ro), os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(I2LError) as e:
            output.plan_output(str(ro), "x")
        assert "not writable" in e.value.message
    finally:
        ro.chmod(0o700)


def test_existing_name_refused_unless_overwrite(lora_dir):
    open(os.path.join(lora_dir, "taken.safetensors"), "wb").write(b"mine")
    with pytest.raises(I2LError) as e:
        output.plan_output(lora_dir, "taken")
    assert "already exists" in e.value.message
    open(os.path.join(lora_dir, "card_only.json"), "w").write("{}")
    with pytest.raises(I2LError):
        output.plan_output(lora_dir, "card_only")
    assert output.plan_output(lora_dir, "taken", overwrite=True).overwrite


def test_commit_places_everything_and_never_clobbers(lora_dir):
    plan = output.plan_output(lora_dir, "x")
    open(plan.tmp_path, "wb").write(b"lora")
    output.write_card(plan, output.card_data("d", "act", 0.8, "qwen"))
    output.write_preview(plan, [Image.new("RGB", (50, 30), (9, 9, 9))] * 3)
    os.chmod(plan.tmp_path, 0o600)          # as some writers create it
    output.commit(plan)
    assert sorted(os.listdir(lora_dir)) == ["x.json", "x.preview.png", "x.safetensors"]
    mask = os.umask(0); os.umask(mask)
    assert os.stat(plan.path).st_mode & 0o777 == 0o666 & ~mask   # readable like any new file
    import json
    card = json.load(open(plan.sidecar))
    assert card["sd version"] == "qwen" and card["preferred weight"] == 0.8 and card["activation text"] == "act"
    # a file that appears after planning is left alone
    plan2 = output.plan_output(lora_dir, "y")
    open(plan2.tmp_path, "wb").write(b"new")
    open(plan2.path, "wb").write(b"users")
    with pytest.raises(I2LError):
        output.commit(plan2)
    assert open(plan2.path, "rb").read() == b"users"
    output.cleanup(plan2)
    assert not os.path.exists(plan2.tmp_path)


def test_cleanup_removes_partials(lora_dir):
    plan = output.plan_output(lora_dir, "z")
    for p in plan.tmp_paths:
        open(p, "wb").write(b"partial")
    output.cleanup(plan)
    assert os.listdir(lora_dir) == []


def test_contact_sheet_grid():
    sheet = output.contact_sheet([Image.new("RGB", (100, 50))] * 5)
    assert sheet.size == (768, 512)
    assert output.contact_sheet([Image.new("RGB", (10, 10))]).size == (768, 768)


def test_a_file_that_cannot_be_written_is_an_output_error_in_both_languages():
    from i2l_ext import messages
    err = output.write_failed("preview and card", "/x/Lora", OSError(28, "No space left on device"))
    assert err.code == I2LError.OUTPUT
    assert err.message == "The preview and card could not be written to /x/Lora: No space left on device"
    lora = output.write_failed("LoRA", "/x/Lora", OSError(13, "Permission denied"), "59.0 MB")
    assert "(the LoRA needs 59.0 MB)" in lora.fix
    assert messages._localize(err.message, "zh_CN") == "无法将预览图和卡片写入 /x/Lora：No space left on device"
    assert messages._localize(lora.fix, "zh_CN").startswith("请确认该文件夹存在、可写且有足够空间（此LoRA需要 59.0 MB）")
