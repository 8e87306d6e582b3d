"""What each variant needs: model files, where they come from, where they go, how big they are.

Files live under the models folder in DiffSynth's own layout, ``<models_dir>/<repo id>/<path>``,
so an existing DiffSynth ``models`` folder can be used as it is. Files found elsewhere (another
DiffSynth ``models`` folder, the Hugging Face cache, the ModelScope cache) are used in place, never
copied, moved or deleted.

Resolution (``resolve_files``, ``locate``, ``missing_roles``) only looks at the file system: it
never contacts a hub, so a job with its files present makes no network call at all.
"""
from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
from dataclasses import dataclass

from .contract import T, Text
from .families import DECODERS, FAMILIES, IMAGE_ENCODERS, TEXT_ENCODER, Family

ENCODERS_REPO = "DiffSynth-Studio/General-Image-Encoders"
QWEN_I2L_REPO = "DiffSynth-Studio/Qwen-Image-i2L"
QWEN_IMAGE_REPO = "Qwen/Qwen-Image"
QWEN_EDIT_REPO = "Qwen/Qwen-Image-Edit"
Z_IMAGE_REPO = "DiffSynth-Studio/Z-Image-i2L"
Z_IMAGE_OMNI_REPO = "DiffSynth-Studio/Z-Image-Omni-Base-i2L"

GB = 1000 ** 3

TEXT_ENCODER_INDEX = "text_encoder/model.safetensors.index.json"
# What the Qwen2-VL processor cannot do without; the hub's listing of ``processor/`` may hold more,
# and a download fetches all of it.
PROCESSOR_ESSENTIAL = ("preprocessor_config.json", "tokenizer_config.json")
PROCESSOR_TOKENIZER = (("tokenizer.json",), ("vocab.json", "merges.txt"))
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.safetensors$")

MANIFEST_NAME = ".i2l-manifest.json"     # the hubs' published sizes and hashes, kept for offline checks


@dataclass(frozen=True)
class ModelFile:
    role: str            # siglip2, dinov3, text_encoder, processor, a decoder (families.DECODERS), bias
    repo: str            # same id on ModelScope and Hugging Face
    pattern: str         # a file, a glob of shards ("text_encoder/model*.safetensors") or a folder ("processor/")
    approx_bytes: int
    title: str
    # Paths inside the repo with approximate sizes, to name missing files when no hub listing is at
    # hand (offline). A hub's own listing, once fetched, is authoritative (see the manifest).
    known_files: tuple[tuple[str, int], ...] = ()

    @property
    def label(self) -> Text:
        """The file's name in the reader's language."""
        return T(f"m_file_{self.role}")

    @property
    def is_folder(self) -> bool:
        return self.pattern.endswith("/")

    @property
    def is_glob(self) -> bool:
        return "*" in self.pattern

    def local_path(self, models_dir: str) -> str:
        return os.path.join(models_dir, *self.repo.split("/"), *self.pattern.rstrip("/").split("/"))

    def repo_dir(self, models_dir: str) -> str:
        return os.path.join(models_dir, *self.repo.split("/"))

    def resolve(self, models_dir: str) -> list[str]:
        """The files on disk for this entry under ``models_dir`` (all shards for a glob, the folder
        for a folder); empty when missing or incomplete."""
        return self.check_in(self.repo_dir(models_dir))[0]

    def matches(self, path: str) -> bool:
        """Whether a path inside the repo (from a hub listing) belongs to this entry."""
        path = path.lstrip("/")
        if self.is_folder:
            return path.startswith(self.pattern) and not path.endswith("/")
        if self.is_glob:
            if self.role == "text_encoder" and path == TEXT_ENCODER_INDEX:
                return True
            return (os.path.dirname(path) == os.path.dirname(self.pattern)
                    and fnmatch.fnmatchcase(os.path.basename(path), os.path.basename(self.pattern)))
        return path == self.pattern

    def check_in(self, root: str) -> tuple[list[str], list[tuple[str, int]]]:
        """``(paths, missing)`` for this entry inside ``root``, a folder laid out like the repo.

        ``paths`` is what a job loads (empty unless complete); ``missing`` names the repo paths
        that are absent, with approximate sizes (0 when unknown)."""
        if self.is_folder:
            return self._check_folder(root)
        if self.is_glob:
            return self._check_shards(root)
        p = os.path.join(root, *self.pattern.split("/"))
        if os.path.isfile(p):
            return [p], []
        return [], [(self.pattern, self.approx_bytes)]

    def _check_folder(self, root: str) -> tuple[list[str], list[tuple[str, int]]]:
        folder = os.path.join(root, *self.pattern.rstrip("/").split("/"))
        try:
            present = {n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n))}
        except OSError:
            present = set()
        sizes = dict(self.known_files)
        names = [n for n in PROCESSOR_ESSENTIAL if n not in present]
        if not any(all(n in present for n in group) for group in PROCESSOR_TOKENIZER):
            names += [n for n in PROCESSOR_TOKENIZER[0] if n not in present]
        missing = [(self.pattern + n, sizes.get(self.pattern + n, 0)) for n in names]
        return ([folder] if not missing else []), missing

    def _check_shards(self, root: str) -> tuple[list[str], list[tuple[str, int]]]:
        subdir = os.path.dirname(self.pattern)
        folder = os.path.join(root, *subdir.split("/"))
        sizes = dict(self.known_files)
        wanted: list[str] | None = None
        index = os.path.join(root, *TEXT_ENCODER_INDEX.split("/"))
        if self.role == "text_encoder" and os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    wanted = sorted({str(v) for v in json.load(f)["weight_map"].values()})
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                wanted = None
        found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, os.path.basename(self.pattern)))
                       if os.path.isfile(p))
        if not wanted:
            shards = [m for m in map(_SHARD.match, found) if m]
            counts = {int(m["n"]) for m in shards}
            if len(counts) == 1:
                n, m = counts.pop(), shards[0]
                width = len(m["i"])
                wanted = [f"{m['stem']}-{i:0{width}d}-of-{n:0{width}d}.safetensors" for i in range(1, n + 1)]
            elif found:
                wanted = found                    # one unsharded file, or names we can't count
            else:
                wanted = [p.split("/")[-1] for p, _ in self.known_files if p != TEXT_ENCODER_INDEX]
        missing = [(f"{subdir}/{n}", sizes.get(f"{subdir}/{n}", 0)) for n in wanted
                   if not os.path.isfile(os.path.join(folder, n))]
        if missing:
            return [], missing
        return [os.path.join(folder, n) for n in wanted], []


# Approximate sizes (bf16); the hubs' listings give the exact ones.
_TE_SHARDS = (4_968_243_304, 4_991_495_816, 4_932_751_040, 1_691_924_384)
_TE_KNOWN = tuple((f"text_encoder/model-{i:05d}-of-00004.safetensors", n) for i, n in enumerate(_TE_SHARDS, 1)) + (
    (TEXT_ENCODER_INDEX, 57_000),)
_PROC_KNOWN = (("processor/preprocessor_config.json", 800), ("processor/tokenizer_config.json", 5_000),
               ("processor/tokenizer.json", 7_031_645), ("processor/vocab.json", 2_776_833),
               ("processor/merges.txt", 1_671_853))

FILES: dict[str, ModelFile] = {f.role: f for f in [
    ModelFile("siglip2", ENCODERS_REPO, "SigLIP2-G384/model.safetensors", int(2.3 * GB), "SigLIP2-G384 image encoder"),
    ModelFile("dinov3", ENCODERS_REPO, "DINOv3-7B/model.safetensors", int(13.4 * GB), "DINOv3-7B image encoder"),
    ModelFile("text_encoder", QWEN_IMAGE_REPO, "text_encoder/model*.safetensors", int(16.6 * GB),
              "Qwen2.5-VL text encoder", _TE_KNOWN),
    ModelFile("processor", QWEN_EDIT_REPO, "processor/", 12_000_000, "Qwen2-VL processor", _PROC_KNOWN),
    ModelFile("style", QWEN_I2L_REPO, "Qwen-Image-i2L-Style.safetensors", int(4.8 * GB), "i2L Style decoder"),
    ModelFile("coarse", QWEN_I2L_REPO, "Qwen-Image-i2L-Coarse.safetensors", int(15.9 * GB), "i2L Coarse decoder"),
    ModelFile("fine", QWEN_I2L_REPO, "Qwen-Image-i2L-Fine.safetensors", int(15.1 * GB), "i2L Fine decoder"),
    ModelFile("bias", QWEN_I2L_REPO, "Qwen-Image-i2L-Bias.safetensors", 60_000_000, "i2L Bias LoRA"),
    ModelFile("z_image", Z_IMAGE_REPO, "model.safetensors", int(3.2 * GB), "Z-Image i2L decoder"),
    ModelFile("z_image_omni", Z_IMAGE_OMNI_REPO, "model.safetensors", int(3.2 * GB),
              "Z-Image-Omni-Base i2L decoder"),
]}


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    purpose: str
    decoders: tuple[str, ...]
    vram_gb: float          # peak VRAM (driver's figure) streaming from RAM, the default when RAM holds the weights
    low_vram_gb: float      # peak with the disk profile, used when RAM is short (DiffSynth's own streaming)
    bias_default: bool = False
    family_key: str = "qwen-image"
    base_model: str = ""    # the checkpoint it is made for, where the family has several

    @property
    def family(self) -> Family:
        return FAMILIES[self.family_key]

    @property
    def has_bias(self) -> bool:
        """Whether the variant's family has a Bias LoRA to merge (Qwen-Image's)."""
        return bool(self.family.bias_role)

    def needed_roles(self, bias: bool | None = None) -> list[str]:
        roles = list(IMAGE_ENCODERS)
        if any(DECODERS[d].residual for d in self.decoders):
            roles += list(TEXT_ENCODER)
        roles += list(self.decoders)
        if self.has_bias and (self.bias_default if bias is None else bias):
            roles.append(self.family.bias_role)
        return roles

    def download_bytes(self, bias: bool | None = None) -> int:
        return sum(FILES[r].approx_bytes for r in self.needed_roles(bias))


VARIANTS: dict[str, Variant] = {v.key: v for v in [
    Variant("style", "Style", "Captures the look (palette, brushwork, lighting) and leaves the content free.",
            ("style",), vram_gb=3, low_vram_gb=13),
    Variant("coarse-fine", "Coarse + Fine (+ Bias)", "Captures style and content: subjects, layout, details.",
            ("coarse", "fine"), vram_gb=15, low_vram_gb=24, bias_default=True),
    Variant("coarse", "Coarse", "Style and content at a coarse level; lighter than Coarse + Fine.",
            ("coarse",), vram_gb=10, low_vram_gb=20),
    Variant("fine", "Fine", "Adds 1024x1024 detail; meant to go with Coarse.",
            ("fine",), vram_gb=10, low_vram_gb=20),
    Variant("z-image", "Z-Image Style", "The look of the images, for Z-Image (Turbo or Base).",
            ("z_image",), vram_gb=3, low_vram_gb=13, family_key="z-image", base_model="Z-Image"),
    Variant("z-image-omni", "Z-Image-Omni-Base Style", "The look of the images, for Z-Image-Omni-Base.",
            ("z_image_omni",), vram_gb=3, low_vram_gb=13, family_key="z-image", base_model="Z-Image-Omni-Base"),
]}


def variants_by_family() -> list[tuple[Family, list[Variant]]]:
    """The variants grouped by the base model family they serve, in catalog order."""
    groups: dict[str, list[Variant]] = {}
    for v in VARIANTS.values():
        groups.setdefault(v.family_key, []).append(v)
    return [(FAMILIES[k], vs) for k, vs in groups.items()]


def get_variant(key: str) -> Variant:
    key = key.strip().lower().replace("_", "-").replace("+", "-")
    if key in ("coarsefine", "coarse-fine-bias"):
        key = "coarse-fine"
    try:
        return VARIANTS[key]
    except KeyError:
        from .contract import bad_input
        raise bad_input(T("m_unknown_variant", value=key), T("m_choose_one_of", choices=", ".join(VARIANTS))) from None


def check_key_format(variant: Variant, key_format: str) -> None:
    """Refuse a key format that the generators of the variant's family do not read."""
    from . import lora_format
    from .contract import bad_input
    if key_format not in lora_format.FORMATS:
        raise bad_input(T("m_unknown_key_format", value=key_format), T("m_key_format_fix"))
    if key_format not in variant.family.key_formats:
        raise bad_input(T("m_key_format_family", family=variant.family.label, value=key_format),
                        T("m_key_format_family_fix", formats=", ".join(variant.family.key_formats)))


# -- where files may already be ------------------------------------------------------------------
def default_search_dirs() -> list[str]:
    """The Hugging Face and ModelScope caches of this user, where they exist."""
    home = os.path.expanduser("~")
    hf = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache"),
                                                  "huggingface"), "hub")
    ms = os.environ.get("MODELSCOPE_CACHE") or os.path.join(home, ".cache", "modelscope")
    return [d for d in (hf, ms) if os.path.isdir(d)]


def _snapshots(repo_cache: str) -> list[str]:
    """Snapshot folders of a hub cache entry (``models--Org--Name``): the one ``refs/main`` names
    first, then the others, newest first."""
    snaps = os.path.join(repo_cache, "snapshots")
    try:
        names = os.listdir(snaps)
    except OSError:
        return []
    first = []
    for ref in ("main", "master"):
        try:
            with open(os.path.join(repo_cache, "refs", ref), encoding="utf-8") as f:
                first.append(f.read().strip())
        except OSError:
            pass
    dirs = [os.path.join(snaps, n) for n in names]
    dirs.sort(key=lambda d: (os.path.basename(d) not in first, -_mtime(d)))
    return dirs


def _mtime(p: str) -> float:
    try:
        return os.path.getmtime(p)
    except OSError:
        return 0.0


def repo_roots(repo: str, models_dir: str, search_dirs=()) -> list[tuple[str, str]]:
    """``(root, where)`` for every folder that may hold ``repo`` laid out as in the repo: the models
    folder first, then each search folder in the layouts of DiffSynth (``<dir>/Org/Name``), the
    Hugging Face cache (``<dir>/models--Org--Name/snapshots/<rev>``, also under ``<dir>/hub``) and
    the ModelScope cache (``<dir>/models/Org--Name/snapshots/<rev>``, older ``[hub/]models/Org/Name``).
    ``where`` is the folder the root was found through."""
    org, name = repo.split("/", 1)
    legacy = name.replace(".", "___")
    out = [(os.path.join(models_dir, org, name), models_dir)]
    seen = {os.path.normcase(os.path.abspath(out[0][0]))}
    for d in search_dirs or ():
        if not d:
            continue
        d = os.path.abspath(os.path.expanduser(str(d)))
        cands = [os.path.join(d, org, name), os.path.join(d, org, legacy),
                 os.path.join(d, "models", org, name), os.path.join(d, "models", org, legacy),
                 os.path.join(d, "hub", org, name), os.path.join(d, "hub", org, legacy),
                 os.path.join(d, "hub", "models", org, name), os.path.join(d, "hub", "models", org, legacy)]
        for base in (d, os.path.join(d, "hub")):
            cands += _snapshots(os.path.join(base, f"models--{org}--{name}"))
            cands += _snapshots(os.path.join(base, "models", f"{org}--{name}"))
        for c in cands:
            key = os.path.normcase(c)
            if key not in seen and os.path.isdir(c):
                seen.add(key)
                out.append((c, d))
    return out


@dataclass
class Located:
    role: str
    paths: list[str]                 # what a job loads; empty when not found complete anywhere
    root: str | None                 # the repo root it was found in
    where: str | None                # the models folder or the search folder it came through
    missing: list[tuple[str, int]]   # repo paths absent from the models folder (when not found)

    @property
    def present(self) -> bool:
        return bool(self.paths)

    @property
    def in_place(self) -> bool:
        """Found through a search folder, not in the models folder (used where it is)."""
        return self.present and self.where is not None and self.where != self.models_dir

    models_dir: str = ""


def locate(role: str, models_dir: str, search_dirs=()) -> Located:
    """Find one role's files: in the models folder, then in each search folder. File system only."""
    mf = FILES[role]
    first_missing: list[tuple[str, int]] | None = None
    for root, where in repo_roots(mf.repo, models_dir, search_dirs):
        paths, missing = mf.check_in(root)
        if paths:
            return Located(role, paths, root, where, [], models_dir)
        if first_missing is None:
            first_missing = missing
    return Located(role, [], None, None, first_missing or [], models_dir)


# -- the hubs' published sizes and hashes, remembered beside the files -----------------------------
def load_manifest(models_dir: str) -> dict:
    """``{repo: {path: {"size": int, "sha256": str|None, "oid": str|None}}}`` from the last listing."""
    try:
        with open(os.path.join(models_dir, MANIFEST_NAME), encoding="utf-8") as f:
            data = json.load(f)
        return data.get("repos", {}) if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def save_manifest(models_dir: str, repos: dict) -> None:
    os.makedirs(models_dir, exist_ok=True)
    path = os.path.join(models_dir, MANIFEST_NAME)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"version": 1, "repos": repos}, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _rel_in_repo(mf: ModelFile, root: str, path: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def expected_files(role: str, models_dir: str, manifest: dict | None = None) -> list[tuple[str, int, bool]]:
    """``(repo path, bytes, exact)`` for everything a role's download fetches: from the hub listing
    remembered in the manifest when there is one, else from the catalog's approximate list."""
    mf = FILES[role]
    manifest = load_manifest(models_dir) if manifest is None else manifest
    listed = manifest.get(mf.repo, {})
    rows = [(p, int(e.get("size") or 0), True) for p, e in sorted(listed.items()) if mf.matches(p)]
    if rows:
        return rows
    if mf.known_files:
        return [(p, n, False) for p, n in mf.known_files]
    return [(mf.pattern, mf.approx_bytes, False)]


# -- what a job needs ------------------------------------------------------------------------------
def _variant(variant) -> "Variant":
    return variant if isinstance(variant, Variant) else get_variant(str(variant))


def effective_search_dirs(models_dir: str, search_dirs=()) -> list[str]:
    """``search_dirs`` plus the folders remembered for this models folder (``models search-dirs``)."""
    from .hub.sources import search_dirs_for
    return search_dirs_for(models_dir, search_dirs)


def resolve_files(variant, models_dir: str, bias: bool | None = None, search_dirs=(),
                  remembered: bool = True, command_flags: str = "") -> dict[str, list[str]]:
    """Role → the files a job loads, found in ``models_dir`` or a search folder, used in place.
    ``remembered`` adds the search folders remembered for ``models_dir``; ``command_flags`` go
    into the download command the error suggests (the user's own ``--models-dir``).

    Looks only at the file system. Raises ``I2LError(WEIGHTS_MISSING)`` naming every missing file,
    where it looked, how big the download is and how to get it; ``I2LError(WEIGHTS_INVALID)`` when
    a present file's size differs from what the hub published (known from an earlier listing)."""
    from .contract import I2LError
    v = _variant(variant)
    if remembered:
        search_dirs = effective_search_dirs(models_dir, search_dirs)
    manifest = load_manifest(models_dir)
    files: dict[str, list[str]] = {}
    missing: list[dict] = []
    for role in v.needed_roles(bias):
        loc = locate(role, models_dir, search_dirs)
        mf = FILES[role]
        if loc.present:
            _check_sizes(mf, loc, manifest)
            files[role] = loc.paths
            continue
        published = manifest.get(mf.repo, {})
        for path, approx in loc.missing:
            exact = published.get(path, {}).get("size")
            missing.append({"role": role, "title": mf.title, "repo": mf.repo, "path": path,
                            "bytes": int(exact if exact is not None else approx), "exact": exact is not None,
                            "dest": os.path.join(models_dir, *mf.repo.split("/"), *path.split("/"))})
    if missing:
        total = sum(m["bytes"] for m in missing)
        lines = []
        for m in missing:
            size = (human_size(m["bytes"]) if m["exact"] else T("m_about", size=human_size(m["bytes"])) if m["bytes"]
                    else T("m_size_unknown"))
            lines.append(T("m_missing_line", title=FILES[m["role"]].label, repo=m["repo"], path=m["path"], size=size))
        looked = [models_dir] + [os.path.abspath(os.path.expanduser(str(d))) for d in search_dirs or () if d]
        message = T("m_weights_missing", head=T("m_variant_needs", variant=v.label, n=len(missing)), lines=lines,
                    looked=T("m_looked_in", dirs="; ".join(looked)))
        flag = "" if bias is None or bool(bias) == v.bias_default else (" --bias" if bias else " --no-bias")
        fix = T("m_download_them", size=human_size(total), variant=v.key, flag=flag + command_flags,
                models_flag=command_flags)
        details = json.dumps({"variant": v.key, "bias": bias, "models_dir": models_dir, "missing": missing})
        raise I2LError(I2LError.WEIGHTS_MISSING, message, fix, details)
    return files


def weight_paths(files: dict[str, list[str]]) -> list[str]:
    """The weight files of ``resolve_files``'s answer in the order a job reads them (the encoders,
    then the decoders, then a Bias LoRA), folders left out."""
    return [p for role, paths in files.items() if not FILES[role].is_folder for p in paths]


def _check_sizes(mf: ModelFile, loc: Located, manifest: dict) -> None:
    published = manifest.get(mf.repo, {})
    if not published or loc.root is None:
        return
    paths = loc.paths if not mf.is_folder else [os.path.join(loc.paths[0], n) for n in os.listdir(loc.paths[0])]
    for p in paths:
        rel = _rel_in_repo(mf, loc.root, p)
        size = published.get(rel, {}).get("size")
        try:
            actual = os.path.getsize(p)
        except OSError:
            continue
        if size is not None and actual != int(size):
            from .contract import I2LError
            raise I2LError(I2LError.WEIGHTS_INVALID,
                           T("m_size_mismatch", title=mf.label, path=p, size=human_size(actual), actual=actual, published=int(size), repo=mf.repo, rel=rel),
                           T("m_verify_fix"))


def missing_roles(variant: Variant, models_dir: str, bias: bool | None = None, search_dirs=()) -> list[str]:
    return [r for r in _variant(variant).needed_roles(bias) if not locate(r, models_dir, search_dirs).present]


TINY_MARKER = "i2l-tiny.json"        # written by ``python -m i2l_ext tiny-models`` beside the tiny random set


def holds_tiny_set(models_dir: str) -> bool:
    """Whether ``models_dir`` holds the tiny random-weight test set (its LoRAs are meaningless)."""
    return os.path.isfile(os.path.join(models_dir, TINY_MARKER))


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
