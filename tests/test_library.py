"""The list of LoRAs this extension made: header reading, rename and delete (pure Python)."""
from __future__ import annotations

import json
import os
import struct

import pytest

from i2l_ext import library
from i2l_ext.contract import I2LError


def write_safetensors(path, metadata: dict | None, tensors: int = 2) -> str:
    header: dict = {}
    offset = 0
    for i in range(tensors):
        header[f"t{i}.lora_A.weight"] = {"dtype": "F32", "shape": [2, 2], "data_offsets": [offset, offset + 16]}
        offset += 16
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    return str(path)


def ours(lora_dir, name, sub="", variant="style", with_card=True, with_preview=True, **extra):
    folder = os.path.join(lora_dir, sub) if sub else str(lora_dir)
    os.makedirs(folder, exist_ok=True)
    meta = {"i2l.version": "0.1.0", "i2l.variant": variant, "i2l.images": "2",
            "i2l.image_sha256": json.dumps(["a" * 64, "b" * 64]), "i2l.created": "2025-01-01T00:00:00Z", **extra}
    p = write_safetensors(os.path.join(folder, name + ".safetensors"), meta)
    if with_card:
        with open(os.path.join(folder, name + ".json"), "w") as f:
            json.dump({"preferred weight": 0.8, "activation text": "xyz"}, f)
    if with_preview:
        from PIL import Image
        Image.new("RGB", (8, 8)).save(os.path.join(folder, name + ".preview.png"))
    return p


def test_lists_only_ours(lora_dir):
    ours(lora_dir, "mine")
    ours(lora_dir, "deep", sub="styles/sub", variant="coarse-fine")
    write_safetensors(os.path.join(lora_dir, "other.safetensors"), {"ss_network_module": "networks.lora"})
    write_safetensors(os.path.join(lora_dir, "nometa.safetensors"), None)
    with open(os.path.join(lora_dir, "broken.safetensors"), "wb") as f:
        f.write(b"\xff" * 20)
    with open(os.path.join(lora_dir, "empty.safetensors"), "wb") as f:
        pass
    entries = library.list_loras(lora_dir)
    assert sorted(e.relpath for e in entries) == ["mine.safetensors", "styles/sub/deep.safetensors"]
    mine = next(e for e in entries if e.name == "mine")
    assert mine.variant == "style" and mine.images == 2 and mine.created.startswith("2025")
    assert mine.image_sha256 == ["a" * 64, "b" * 64]
    assert mine.preview and mine.preview.endswith("mine.preview.png")
    assert mine.prompt == "<lora:mine:0.8>"
    assert mine.card["activation text"] == "xyz"
    assert library.list_loras(os.path.join(lora_dir, "missing")) == []


def test_read_header_is_pure_python(lora_dir):
    from i2l_ext import safetensors_header
    p = ours(lora_dir, "x")
    meta = library.read_metadata(p)
    assert meta["i2l.variant"] == "style"
    h = safetensors_header.read(p)
    assert "t0.lora_A.weight" in h.tensors and "__metadata__" not in h.tensors and h.metadata == meta
    with open(p, "rb") as f:
        data = f.read()
    for bad, truncated in ((data[:-3], True), (b"\x80\x04\x95pickle" * 4, False), (data[:8] + b"[" + data[9:], False),
                           (b"", False)):
        with open(p, "wb") as f:
            f.write(bad)
        with pytest.raises(safetensors_header.NotSafetensors) as e:
            safetensors_header.read(p)
        assert e.value.truncated is truncated
    assert library.list_loras(lora_dir) == []                # a broken file is not listed


def test_rename_moves_all_three(lora_dir):
    ours(lora_dir, "old", sub="s")
    e = library.rename(lora_dir, "s/old.safetensors", "new")
    assert e.relpath == "s/new.safetensors" and e.name == "new"
    names = sorted(os.listdir(os.path.join(lora_dir, "s")))
    assert names == ["new.json", "new.preview.png", "new.safetensors"]
    # metadata travels with the file
    assert library.read_metadata(e.path)["i2l.variant"] == "style"
    # ".safetensors" typed by the user is accepted
    e = library.rename(lora_dir, "s/new.safetensors", "newer.safetensors")
    assert e.name == "newer"


def test_rename_refuses_to_overwrite(lora_dir):
    ours(lora_dir, "a")
    ours(lora_dir, "b", with_card=False, with_preview=False)
    with pytest.raises(I2LError) as ei:
        library.rename(lora_dir, "a.safetensors", "b")
    assert ei.value.code == I2LError.NAME_TAKEN
    assert sorted(os.listdir(lora_dir)) == ["a.json", "a.preview.png", "a.safetensors", "b.safetensors"]
    # a leftover card of another name also blocks, and nothing moves
    with open(os.path.join(lora_dir, "c.json"), "w") as f:
        f.write("{}")
    with pytest.raises(I2LError):
        library.rename(lora_dir, "a.safetensors", "c")
    assert os.path.exists(os.path.join(lora_dir, "a.safetensors"))
    assert os.path.exists(os.path.join(lora_dir, "a.preview.png"))


@pytest.mark.parametrize("bad", ["", "a/b", "..", "con", "x:y", "a.", ".hidden"])
def test_rename_checks_the_name(lora_dir, bad):
    ours(lora_dir, "a")
    with pytest.raises(I2LError) as ei:
        library.rename(lora_dir, "a.safetensors", bad)
    assert ei.value.code == I2LError.BAD_INPUT


def test_refuses_foreign_and_outside_files(lora_dir, tmp_path):
    write_safetensors(os.path.join(lora_dir, "other.safetensors"), {"x": "y"})
    with pytest.raises(I2LError):
        library.delete(lora_dir, "other.safetensors")
    with pytest.raises(I2LError):
        library.rename(lora_dir, "other.safetensors", "z")
    outside = ours(tmp_path, "outside")
    with pytest.raises(I2LError):
        library.delete(lora_dir, os.path.relpath(outside, lora_dir))
    assert os.path.exists(outside)
    assert os.path.exists(os.path.join(lora_dir, "other.safetensors"))


def test_delete_removes_companions(lora_dir):
    ours(lora_dir, "gone")
    ours(lora_dir, "stays")
    removed = library.delete(lora_dir, "gone.safetensors")
    assert len(removed) == 3
    assert sorted(os.listdir(lora_dir)) == ["stays.json", "stays.preview.png", "stays.safetensors"]
    with pytest.raises(I2LError):
        library.delete(lora_dir, "gone.safetensors")
