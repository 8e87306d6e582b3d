"""What crosses between the parts: the texts a user reads, errors, a job's request, spec and result.

- ``Text``: a message as a key of ``locales/<lang>.json`` and its fields, rendered in the reader's
  language where it is shown (tab, CLI, API). The worker and the host modules make Texts; nothing
  matches English back to templates. ``T(key, **fields)`` makes one.
- ``I2LError``: every failure a user can meet: a stable ``code``, a ``Text`` that says what
  happened and one that says what to do (``fix``), and ``details`` for the log.
- ``JobRequest``: what a user asks for (the tab, the CLI, the app); ``check`` validates it once,
  in the host, before anything runs (the way a diffusers pipeline's ``check_inputs`` does).
- ``JobSpec``: what the host hands the worker, versioned; ``JobSpec.from_dict`` validates it once
  where it enters the worker. ``JobResult``: what comes back.

Standard library only: the WebUI imports this.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields as dc_fields
from typing import Any

CONTRACT_VERSION = 2
MAX_WEIGHT = 10.0
MAX_TEXT = 10_000          # characters of a card's description or activation text
MAX_RANK = 3072            # the Qwen-Image DiT's width: no change to one of its modules has a higher rank


@dataclass(frozen=True)
class Text:
    """A message: ``key`` in the locale files and the values of its ``{fields}``. A field's value
    may itself be a Text (rendered in the same language) or a list of them (one per line)."""
    key: str
    fields: dict = field(default_factory=dict)

    def render(self, lang: str | None = None, surface: str | None = None) -> str:
        """The message in ``lang`` (default: the current language). ``surface="cli"`` takes the
        wording the locale file keeps for a command line (``<key>@cli``) where it has one."""
        from . import i18n
        values = {k: _render_value(v, lang, surface) for k, v in self.fields.items()}
        key = self.key
        if surface and i18n.has(f"{key}@{surface}"):
            key = f"{key}@{surface}"
        return i18n.t(key, lang, **values)

    def __str__(self) -> str:
        return self.render("en")

    def to_dict(self) -> dict:
        return {"key": self.key, "fields": {k: _dump_value(v) for k, v in self.fields.items()}}

    @classmethod
    def from_dict(cls, d) -> "Text":
        if isinstance(d, Text):
            return d
        if not isinstance(d, dict) or not isinstance(d.get("key"), str):
            raise ValueError(f"not a message: {d!r}")
        raw = d.get("fields") or {}
        if not isinstance(raw, dict):
            raise ValueError(f"a message's fields are not an object: {raw!r}")
        return cls(d["key"], {str(k): _load_value(v) for k, v in raw.items()})


def T(key: str, **fields) -> Text:
    return Text(key, fields)


def raw(text: str) -> Text:
    """Text that is the same in every language: a system's own error string, a library's line."""
    return Text("raw", {"text": str(text)})


def _render_value(v, lang, surface):
    if isinstance(v, Text):
        return v.render(lang, surface)
    if isinstance(v, (list, tuple)):
        return "\n".join(str(_render_value(x, lang, surface)) for x in v)
    return v


def _dump_value(v):
    if isinstance(v, Text):
        return v.to_dict()
    if isinstance(v, (list, tuple)):
        return [_dump_value(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def _load_value(v):
    if isinstance(v, dict) and isinstance(v.get("key"), str) and "fields" in v:
        return Text.from_dict(v)
    if isinstance(v, list):
        return [_load_value(x) for x in v]
    return v


# ------------------------------------------------------------------------------------------- errors
class I2LError(Exception):
    """One error type for everything a user can run into, with a stable code (the UI and the tests
    match on codes, never on wording)."""
    BAD_INPUT = "bad_input"            # no image, not an image, corrupt, too small, bad name, bad option
    NAME_TAKEN = "name_taken"          # a LoRA of that name exists or is being made
    OUTPUT = "output"                  # the Lora folder missing, unwritable, full, a name too long for it
    WEIGHTS_MISSING = "weights_missing"
    WEIGHTS_INVALID = "weights_invalid"  # not safetensors, wrong model, damaged
    OUT_OF_MEMORY = "out_of_memory"
    WORKER_CRASHED = "worker_crashed"
    WORKER_START = "worker_start"      # interpreter missing, environment broken
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    BUSY = "busy"                      # a download already running
    QUEUE_FULL = "queue_full"          # too many jobs waiting for a worker
    DOWNLOAD = "download"
    ENVIRONMENT = "environment"
    NOT_ALLOWED = "not_allowed"        # a remote client asked for what only the owner may do
    INTERNAL = "internal"
    CODES = (BAD_INPUT, NAME_TAKEN, OUTPUT, WEIGHTS_MISSING, WEIGHTS_INVALID, OUT_OF_MEMORY, WORKER_CRASHED,
             WORKER_START, TIMEOUT, CANCELLED, BUSY, QUEUE_FULL, DOWNLOAD, ENVIRONMENT, NOT_ALLOWED, INTERNAL)

    def __init__(self, code: str, text: Text, fix: Text | None = None, details: str = ""):
        if not isinstance(text, Text) or not (fix is None or isinstance(fix, Text)):
            raise TypeError("I2LError takes Text messages (contract.T)")
        super().__init__(text.key)
        self.code = code
        self.text = text
        self.fix_text = fix
        self.details = details

    @property
    def message(self) -> str:
        """The message in English (logs, tests)."""
        return self.text.render("en")

    @property
    def fix(self) -> str:
        return self.fix_text.render("en") if self.fix_text is not None else ""

    def render(self, lang: str | None = None, surface: str | None = None) -> tuple[str, str]:
        """(message, fix) in ``lang``."""
        fix = self.fix_text.render(lang, surface) if self.fix_text is not None else ""
        return self.text.render(lang, surface), fix

    def __str__(self) -> str:
        return self.message + (f"\nFix: {self.fix}" if self.fix else "")

    def to_dict(self) -> dict:
        return {"code": self.code, "text": self.text.to_dict(),
                "fix": self.fix_text.to_dict() if self.fix_text is not None else None, "details": self.details}

    @classmethod
    def from_dict(cls, d: dict) -> "I2LError":
        try:
            text = Text.from_dict(d.get("text"))
            fix = Text.from_dict(d["fix"]) if d.get("fix") else None
        except (ValueError, AttributeError):
            return cls(cls.INTERNAL, T("m_bad_error", error=repr(d)[:500]), T("m_report"))
        code = d.get("code") if d.get("code") in cls.CODES else cls.INTERNAL
        return cls(code, text, fix, str(d.get("details") or ""))


def bad_input(text: Text, fix: Text | None = None) -> I2LError:
    return I2LError(I2LError.BAD_INPUT, text, fix)


def spec_error(what: str) -> I2LError:
    return I2LError(I2LError.INTERNAL, T("m_bad_spec", what=what), T("m_restart_both"))


# --------------------------------------------------------------------------------------------- jobs
VRAM_PROFILES = ("auto", "gpu", "cpu_offload", "disk")
KEY_FORMATS = ("diffusers", "kohya")


@dataclass
class JobRequest:
    """What a user asks for. ``images`` are files or folders; ``bias`` None: the variant's default."""
    images: list[str]
    name: str
    variant: str = "style"
    bias: bool | None = None
    subfolder: str = ""
    overwrite: bool = False
    key_format: str = "diffusers"
    vram_profile: str = "auto"
    preferred_weight: float = 1.0
    activation_text: str = ""
    description: str = ""
    max_rank: int | None = None        # the LoRA's rank cap (truncated SVD per module); None: none

    def check(self) -> None:
        """Every field of the right type and in range; raises ``I2LError(BAD_INPUT)`` naming the
        field. Names and folders are the output step's to judge (they depend on the folder)."""
        from .settings import VARIANT_KEYS
        if not isinstance(self.images, (list, tuple)) or not all(isinstance(p, str) for p in self.images):
            raise bad_input(T("m_bad_field", field="images"), T("m_add_image"))
        for name in ("name", "subfolder", "activation_text", "description"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise bad_input(T("m_bad_field", field=name))
            if not valid_unicode(value):
                raise bad_input(T("m_text_not_unicode", field=T(f"field_{name}")), T("m_text_not_unicode_fix"))
            if len(value) > MAX_TEXT:
                raise bad_input(T("m_text_too_long", field=T(f"field_{name}"), n=len(value), max=MAX_TEXT))
        if self.variant not in VARIANT_KEYS:
            raise bad_input(T("m_unknown_variant", value=str(self.variant)),
                            T("m_choose_one_of", choices=", ".join(VARIANT_KEYS)))
        if self.bias is not None and not isinstance(self.bias, bool):
            raise bad_input(T("m_bad_field", field="bias"))
        if self.key_format not in KEY_FORMATS:
            raise bad_input(T("m_unknown_key_format", value=str(self.key_format)), T("m_use_key_formats"))
        if self.vram_profile not in VRAM_PROFILES:
            raise bad_input(T("m_unknown_profile", value=str(self.vram_profile)), T("m_use_profiles"))
        w = self.preferred_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or abs(w) > MAX_WEIGHT:
            raise bad_input(T("m_bad_weight", value=str(w), max=f"{MAX_WEIGHT:g}"),
                            T("m_bad_weight_fix", max=f"{MAX_WEIGHT:g}"))
        if not valid_max_rank(self.max_rank):
            raise bad_input(T("m_bad_max_rank", value=str(self.max_rank), max=MAX_RANK),
                            T("m_bad_max_rank_fix", max=MAX_RANK))


def valid_max_rank(r) -> bool:
    """None (no cap) or a whole number from 1 to ``MAX_RANK``."""
    return r is None or (isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= MAX_RANK)


def valid_unicode(s: str) -> bool:
    """Whether ``s`` can be written as UTF-8 (no lone surrogates)."""
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@dataclass
class JobSpec:
    """A job as the worker runs it: resolved files, checked images, the output's temporary paths."""
    variant: str = "style"
    bias: bool = False
    images: list[str] = field(default_factory=list)
    image_sha256: list[str] = field(default_factory=list)
    files: dict[str, list[str]] = field(default_factory=dict)
    models_dir: str | None = None
    output: dict[str, Any] = field(default_factory=dict)     # output.OutputPlan's fields
    key_format: str = "diffusers"
    vram_profile: str = "auto"
    gpu_hold_s: float = 0.0
    gpu_hold_gb: float = 0.0
    metadata: dict[str, str] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)
    device: str | None = None          # "cpu": keep the job off the GPU
    dtype: str | None = None           # "bfloat16" | "float32": the models' dtype (default: by device)
    max_rank: int | None = None        # JobRequest.max_rank
    version: int = CONTRACT_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "JobSpec":
        """The spec in ``d``, checked field by field; raises ``I2LError(INTERNAL)`` naming what
        is wrong (a host and a worker of different versions, or a bug)."""
        if not isinstance(d, dict):
            raise spec_error("spec")
        version = d.get("version", CONTRACT_VERSION)
        if version != CONTRACT_VERSION:
            raise spec_error(f"version {version}")
        known = {f.name for f in dc_fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise spec_error(", ".join(sorted(unknown)))
        spec = cls(**d)
        _check(isinstance(spec.variant, str), "variant")
        _check(isinstance(spec.bias, bool), "bias")
        _check(_str_list(spec.images), "images")
        _check(_str_list(spec.image_sha256), "image_sha256")
        _check(isinstance(spec.files, dict) and all(isinstance(k, str) and (_str_list(v) or isinstance(v, str))
                                                    for k, v in spec.files.items()), "files")
        spec.files = {k: [v] if isinstance(v, str) else list(v) for k, v in spec.files.items()}
        _check(spec.models_dir is None or isinstance(spec.models_dir, str), "models_dir")
        _check(isinstance(spec.output, dict), "output")
        _check(spec.key_format in KEY_FORMATS, "key_format")
        _check(spec.vram_profile in VRAM_PROFILES, "vram_profile")
        for name in ("gpu_hold_s", "gpu_hold_gb"):
            v = getattr(spec, name)
            _check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0, name)
        _check(isinstance(spec.metadata, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in spec.metadata.items()), "metadata")
        _check(isinstance(spec.card, dict), "card")
        _check(spec.device in (None, "cpu", "cuda"), "device")
        _check(spec.dtype in (None, "bfloat16", "float32"), "dtype")
        _check(valid_max_rank(spec.max_rank), "max_rank")
        return spec


def _str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise spec_error(what)


@dataclass
class JobResult:
    """What a finished job made. The host adds ``name`` and ``prompt``."""
    path: str
    sidecar: str
    preview: str
    bytes: int
    keys: int
    rank: int
    variant: str
    images: int
    bias: bool
    seconds: float
    device: str = "cpu"
    dtype: str = ""
    profile: str = ""
    warnings: list[Text] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    held_on_gpu: int = 0
    peak_vram: int | None = None
    extra: dict = field(default_factory=dict)          # what the engine measured besides (bench, stats)
    name: str = ""
    prompt: str = ""
    version: int = CONTRACT_VERSION

    def to_dict(self) -> dict:
        d = asdict(self)
        d["warnings"] = [w.to_dict() for w in self.warnings]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "JobResult":
        if not isinstance(d, dict) or d.get("version", CONTRACT_VERSION) != CONTRACT_VERSION:
            raise spec_error("result")
        known = {f.name for f in dc_fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values["extra"] = dict(d.get("extra") or {}, **{k: v for k, v in d.items() if k not in known})
        try:
            values["warnings"] = [Text.from_dict(w) for w in d.get("warnings") or []]
            return cls(**values)
        except (TypeError, ValueError):
            raise spec_error("result") from None

    def get(self, key: str, default=None):
        """A field or one of the engine's extra measurements (for the bench and the tab)."""
        if key in self.__dataclass_fields__:
            return getattr(self, key)
        return self.extra.get(key, default)
