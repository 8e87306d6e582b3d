"""The LoRAs this extension made: list, rename, delete.

Ours are the ``.safetensors`` files whose header metadata carries ``i2l.version``. The header is
read by ``safetensors_header`` (standard library only), so listing a Lora folder never loads a
tensor and never imports torch. A LoRA travels with its card
``<stem>.json`` and its preview ``<stem>.preview.png``; rename and delete treat the three as one.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from . import output, safetensors_header
from .contract import I2LError, T, bad_input, raw

COMPANIONS = (".json", ".preview.png", ".png")     # moved and deleted with the LoRA


def read_metadata(path: str) -> dict:
    return safetensors_header.read(path).metadata


@dataclass
class LoraEntry:
    name: str                  # file stem: what goes into <lora:name:w>
    path: str
    relpath: str               # relative to the Lora folder, with '/'
    bytes: int
    mtime: float
    metadata: dict
    preview: str | None = None
    card: dict = field(default_factory=dict)

    @property
    def variant(self) -> str:
        return self.metadata.get("i2l.variant", "")

    @property
    def images(self) -> int:
        try:
            return int(self.metadata.get("i2l.images", "0"))
        except ValueError:
            return 0

    @property
    def created(self) -> str:
        return self.metadata.get("i2l.created", "")

    @property
    def image_sha256(self) -> list[str]:
        text = self.metadata.get("i2l.image_sha256", "")
        try:
            v = json.loads(text)
            return [str(x) for x in v] if isinstance(v, list) else [str(v)]
        except ValueError:
            return [s for s in text.replace(";", ",").split(",") if s]

    @property
    def weight(self) -> float:
        try:
            return float(self.card.get("preferred weight") or 1.0)
        except (TypeError, ValueError):
            return 1.0

    @property
    def prompt(self) -> str:
        return f"<lora:{self.name}:{self.weight:g}>"

    def companions(self) -> list[str]:
        base = self.path[: -len(".safetensors")]
        return [base + ext for ext in COMPANIONS if os.path.isfile(base + ext)]


def inside(real_root: str, path: str) -> bool:
    """Whether ``path``, links followed, lies in the folder whose real path is ``real_root``."""
    real = os.path.realpath(path)
    try:
        return os.path.commonpath([real_root, real]) == real_root
    except ValueError:                  # another drive
        return False


def is_ours(metadata: dict) -> bool:
    return "i2l.version" in metadata


def _entry(root: str, path: str) -> LoraEntry | None:
    try:
        meta = read_metadata(path)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not is_ours(meta):
        return None
    st = os.stat(path)
    base = path[: -len(".safetensors")]
    real_root = os.path.realpath(root)
    preview = next((base + ext for ext in (".preview.png", ".png") if os.path.isfile(base + ext)
                    and inside(real_root, base + ext)), None)     # never a link out of the Lora folder
    card = {}
    if os.path.isfile(base + ".json"):
        try:
            with open(base + ".json", encoding="utf-8") as f:
                card = json.load(f)
            if not isinstance(card, dict):
                card = {}
        except (OSError, ValueError):
            card = {}
    return LoraEntry(name=os.path.basename(base), path=path,
                     relpath=os.path.relpath(path, root).replace(os.sep, "/"), bytes=st.st_size,
                     mtime=st.st_mtime, metadata=meta, preview=preview, card=card)


def list_loras(lora_dir: str) -> list[LoraEntry]:
    """Our LoRAs under ``lora_dir`` (recursive), newest first. Other files are left out."""
    if not lora_dir or not os.path.isdir(lora_dir):
        return []
    root = os.path.abspath(lora_dir)
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            if fn.startswith(".") or not fn.endswith(".safetensors"):
                continue
            e = _entry(root, os.path.join(dirpath, fn))
            if e is not None:
                found.append(e)
    found.sort(key=lambda e: (-e.mtime, e.relpath))
    return found


def find(lora_dir: str, relpath: str) -> LoraEntry:
    """The entry for ``relpath``; refuses paths outside the folder and files that aren't ours."""
    root = os.path.realpath(lora_dir)
    path = os.path.realpath(os.path.join(root, relpath))
    if os.path.commonpath([root, path]) != root or not path.endswith(".safetensors"):
        raise bad_input(T("m_not_lora", relpath=relpath), T("m_pick_from_list"))
    if not os.path.isfile(path):
        raise I2LError(I2LError.OUTPUT, T("m_no_longer", relpath=relpath), T("m_refresh_list"))
    e = _entry(root, path)
    if e is None:
        raise bad_input(T("m_not_ours", relpath=relpath),
                        T("m_not_ours_fix"))
    return e


def rename(lora_dir: str, relpath: str, new_name: str) -> LoraEntry:
    """Rename a LoRA and its card and preview together, in the same folder; never overwrites."""
    from .output import claimed, name_bytes_problem, name_problem, suggest_name
    e = find(lora_dir, relpath)
    new_name = (new_name or "").strip()
    if new_name.lower().endswith(".safetensors"):
        new_name = new_name[: -len(".safetensors")]
    problem = name_problem(new_name) or name_bytes_problem(new_name, os.path.dirname(e.path))
    if problem:
        raise bad_input(T("m_bad_name", name=repr(new_name), problem=problem), T("name_try", name=suggest_name(new_name)))
    if new_name == e.name:
        return e
    folder = os.path.dirname(e.path)
    if claimed(folder, new_name) or claimed(folder, e.name):
        raise I2LError(I2LError.NAME_TAKEN, T("m_name_being_made", name=new_name if claimed(folder, new_name)
                                              else e.name), T("m_name_being_made_fix"))
    old_base, new_base = e.path[: -len(".safetensors")], os.path.join(folder, new_name)
    moves = [(e.path, new_base + ".safetensors")]
    moves += [(old_base + ext, new_base + ext) for ext in COMPANIONS if os.path.isfile(old_base + ext)]
    for _, dst in moves:
        if os.path.lexists(dst):
            raise I2LError(I2LError.NAME_TAKEN, T("m_rename_exists", name=os.path.basename(dst)),
                           T("m_rename_exists_fix"))
    done: list[tuple[str, str]] = []
    try:
        for src, dst in moves[1:] + moves[:1]:          # the LoRA itself last
            _move_no_replace(src, dst)
            done.append((src, dst))
    except BaseException as err:
        for src, dst in reversed(done):                 # put everything back
            try:
                os.rename(dst, src)
            except OSError:
                pass
        if isinstance(err, OSError):
            raise output.os_error(err, T("m_renaming", name=e.name), folder) from None
        raise
    return find(lora_dir, os.path.relpath(new_base + ".safetensors", os.path.realpath(lora_dir)))


def _move_no_replace(src: str, dst: str) -> None:
    try:
        if output._link_no_replace(src, dst):
            os.unlink(src)
    except FileExistsError:
        raise I2LError(I2LError.NAME_TAKEN, T("m_rename_exists", name=os.path.basename(dst)),
                       T("m_choose_other_name")) from None


def delete(lora_dir: str, relpath: str) -> list[str]:
    """Delete one of our LoRAs with its card and preview; returns the removed paths."""
    e = find(lora_dir, relpath)
    if output.claimed(os.path.dirname(e.path), e.name):
        raise I2LError(I2LError.NAME_TAKEN, T("m_name_being_made", name=e.name), T("m_name_being_made_fix"))
    removed = []
    for p in e.companions() + [e.path]:
        try:
            os.unlink(p)
            removed.append(p)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise output.os_error(err, T("m_deleting", name=e.name), os.path.dirname(e.path)) from None
    return removed
