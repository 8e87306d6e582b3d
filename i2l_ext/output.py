"""Where a LoRA goes and how it gets there: names, folders, the card sidecar, the preview.

Nothing here overwrites a user's file unless asked: every file is written under a temporary
name in the same folder and renamed into place when complete, the LoRA itself last.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass, asdict

from .errors import I2LError, bad_input

MAX_NAME = 120
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
_BAD_CHARS = re.compile(r'[<>:"/\\|?*\x00-\x1f]')
PARTIAL_SUFFIX = ".i2l-partial"


def name_problem(name: str) -> str | None:
    """A plain-language reason why ``name`` can't be a LoRA file name, or None if it can."""
    if not name or not name.strip():
        return "The LoRA needs a name."
    if name != name.strip():
        return "The name starts or ends with a space."
    if "/" in name or "\\" in name:
        return "The name can't contain / or \\ (use the subfolder field for folders)."
    if ".." in name:
        return "The name can't contain '..'."
    bad = sorted(set(_BAD_CHARS.findall(name)))
    if bad:
        shown = " ".join(repr(c) if ord(c) < 32 else c for c in bad)
        return f"The name contains characters that file names can't hold: {shown}"
    if name.endswith("."):
        return "The name can't end with a dot."
    if name.startswith("."):
        return "The name can't start with a dot (it would be a hidden file)."
    if name.split(".")[0].lower() in _RESERVED:
        return f"'{name}' is a reserved device name on Windows."
    if name.lower().endswith(".safetensors"):
        return "Leave out the .safetensors extension; it is added for you."
    if len(name) > MAX_NAME:
        return f"The name is {len(name)} characters long; keep it under {MAX_NAME}."
    return None


def suggest_name(name: str) -> str:
    """A usable name close to ``name`` (for messages and as-you-type hints)."""
    s = _BAD_CHARS.sub("_", name.replace("..", "_")).strip().strip(".")
    if s.lower().endswith(".safetensors"):
        s = s[: -len(".safetensors")]
    if s.split(".")[0].lower() in _RESERVED:
        s = "lora_" + s
    return (s or "my_lora")[:MAX_NAME]


def subfolder_problem(subfolder: str) -> str | None:
    if not subfolder:
        return None
    parts = [p for p in re.split(r"[\\/]", subfolder) if p not in ("", ".")]
    if subfolder.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", subfolder):
        return "The subfolder must be relative to the Lora folder."
    for p in parts:
        problem = name_problem(p)
        if problem:
            return f"Subfolder part '{p}': {problem}"
    return None


@dataclass
class OutputPlan:
    name: str
    folder: str
    path: str          # <folder>/<name>.safetensors
    sidecar: str       # <folder>/<name>.json
    preview: str       # <folder>/<name>.preview.png
    tmp_path: str
    tmp_sidecar: str
    tmp_preview: str
    overwrite: bool

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "OutputPlan":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    @property
    def final_paths(self) -> list[str]:
        return [self.path, self.sidecar, self.preview]

    @property
    def tmp_paths(self) -> list[str]:
        return [self.tmp_path, self.tmp_sidecar, self.tmp_preview]


def existing_outputs(lora_dir: str, name: str, subfolder: str = "") -> list[str]:
    folder = os.path.join(lora_dir, *[p for p in re.split(r"[\\/]", subfolder or "") if p])
    return [p for p in (os.path.join(folder, name + ext) for ext in (".safetensors", ".json", ".preview.png"))
            if os.path.exists(p)]


def plan_output(lora_dir: str, name: str, subfolder: str = "", overwrite: bool = False,
                job_id: str | None = None) -> OutputPlan:
    """Check the name and folder and decide every path; raises I2LError with the fix."""
    problem = name_problem(name)
    if problem:
        raise bad_input(f"Bad LoRA name {name!r}: {problem}", f"Try '{suggest_name(name)}'.")
    problem = subfolder_problem(subfolder)
    if problem:
        raise bad_input(f"Bad subfolder {subfolder!r}: {problem}", "Use a simple relative folder such as 'styles'.")
    if not lora_dir:
        raise I2LError(I2LError.OUTPUT, "No Lora folder is set.", "Pass --lora-dir or set it in the settings.")
    root = os.path.abspath(lora_dir)
    if not os.path.isdir(root):
        raise I2LError(I2LError.OUTPUT, f"The Lora folder {root} does not exist.",
                       "Create it, or point --lora-dir (or the setting) at your Lora folder.")
    parts = [p for p in re.split(r"[\\/]", subfolder or "") if p not in ("", ".")]
    folder = os.path.join(root, *parts)
    real_root = os.path.realpath(root)
    real_folder = os.path.realpath(folder)
    if os.path.commonpath([real_root, real_folder]) != real_root:
        raise bad_input(f"The subfolder {subfolder!r} leads outside the Lora folder.",
                        "Use a folder inside the Lora folder.")
    if parts:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise I2LError(I2LError.OUTPUT, f"Could not create the subfolder {folder}: {e.strerror}",
                           "Check the folder's permissions.") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise I2LError(I2LError.OUTPUT, f"The folder {folder} is not writable.",
                       "Fix its permissions, or choose another Lora folder.")
    taken = existing_outputs(root, name, subfolder)
    if taken and not overwrite:
        raise I2LError(I2LError.OUTPUT, f"A LoRA named '{name}' already exists: {taken[0]}",
                       "Choose another name, or allow overwriting (--overwrite).")
    job_id = job_id or uuid.uuid4().hex[:12]
    base = os.path.join(folder, name)
    tmp = os.path.join(folder, f".{name}.{job_id}")
    return OutputPlan(name=name, folder=folder, path=base + ".safetensors", sidecar=base + ".json",
                      preview=base + ".preview.png", tmp_path=tmp + ".safetensors" + PARTIAL_SUFFIX,
                      tmp_sidecar=tmp + ".json" + PARTIAL_SUFFIX, tmp_preview=tmp + ".png" + PARTIAL_SUFFIX,
                      overwrite=overwrite)


def card_data(description: str = "", activation_text: str = "", preferred_weight: float = 1.0,
              sd_version: str = "Unknown", notes: str = "") -> dict:
    """The WebUI's Lora card sidecar (`<stem>.json`)."""
    return {"description": description, "sd version": sd_version, "activation text": activation_text,
            "preferred weight": float(preferred_weight), "negative text": "", "notes": notes}


def write_card(plan: OutputPlan, card: dict) -> None:
    with open(plan.tmp_sidecar, "w", encoding="utf-8") as f:
        json.dump(card, f, ensure_ascii=False, indent=2)
        f.flush()
        os.fsync(f.fileno())


def contact_sheet(images: list, size: int = 768):
    """A square grid of the input images (centre-cropped) for the Lora card preview."""
    from PIL import Image
    n = max(1, min(len(images), 16))
    cols = 1 if n == 1 else 2 if n <= 4 else 3 if n <= 9 else 4
    rows = -(-n // cols)
    cell = size // cols
    sheet = Image.new("RGB", (cell * cols, cell * rows), (24, 24, 24))
    for i, im in enumerate(images[:n]):
        w, h = im.size
        s = min(w, h)
        tile = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize(
            (cell, cell), Image.Resampling.LANCZOS)
        sheet.paste(tile, ((i % cols) * cell, (i // cols) * cell))
    return sheet


def write_preview(plan: OutputPlan, images: list) -> None:
    with open(plan.tmp_preview, "wb") as f:
        contact_sheet(images).save(f, format="PNG")
        f.flush()
        os.fsync(f.fileno())


def write_failed(what: str, folder: str, err: OSError, need: str | None = None) -> I2LError:
    """The error for a file of a job's output that could not be written: ``what`` ("LoRA",
    "preview and card") into ``folder``, the system's reason, what to check (and the room the
    file needs, when known)."""
    fix = (f"Make sure the folder exists, can be written to and has room (the {what} needs {need}), "
           "or choose another Lora folder." if need else
           "Make sure the folder exists, can be written to and has room, or choose another Lora folder.")
    return I2LError(I2LError.OUTPUT, f"The {what} could not be written to {folder}: {err.strerror or err}", fix,
                    details=repr(err))


def move_no_replace(src: str, dst: str, taken: I2LError) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (then raise ``taken``); atomic where hard
    links work, so no race can make it overwrite."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise taken from None
    except OSError:                # file systems without hard links
        if os.path.lexists(dst):
            raise taken from None
        os.rename(src, dst)
        return
    os.unlink(src)


def _place(src: str, dst: str, overwrite: bool) -> None:
    if overwrite:
        os.replace(src, dst)
        return
    move_no_replace(src, dst, I2LError(I2LError.OUTPUT, f"{dst} appeared while the LoRA was being made; "
                                       "it was left alone.", "Choose another name, or allow overwriting."))


def _usual_mode(path: str) -> None:
    """Give a file the permissions a new file normally gets (some writers create 0600 files)."""
    mask = os.umask(0)
    os.umask(mask)
    try:
        os.chmod(path, 0o666 & ~mask)
    except OSError:
        pass


def commit(plan: OutputPlan) -> None:
    """Rename the finished temporary files into place: sidecars first, the LoRA last."""
    for tmp in plan.tmp_paths:
        if os.path.exists(tmp):
            _usual_mode(tmp)
    placed = []
    try:
        for tmp, final in ((plan.tmp_preview, plan.preview), (plan.tmp_sidecar, plan.sidecar),
                           (plan.tmp_path, plan.path)):
            if os.path.exists(tmp):
                _place(tmp, final, plan.overwrite)
                placed.append(final)
    except BaseException:
        if not plan.overwrite:
            for p in placed:
                _unlink(p)
        raise


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def cleanup(plan: OutputPlan, remove_final: bool = False) -> None:
    """Remove what an unfinished job left. ``remove_final`` also removes final files this job created."""
    for p in plan.tmp_paths:
        _unlink(p)
    if remove_final and not plan.overwrite:
        for p in plan.final_paths:
            _unlink(p)
