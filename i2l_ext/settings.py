"""Every setting of Image to LoRA, resolved in one place with one rule:

    command-line flag  >  WebUI setting  >  environment  >  default

``SETTINGS`` lists them: each has at most one WebUI flag (``--i2l-...``, registered by preload.py and
read by install.py), one flag of ``python -m i2l_ext``, one WebUI setting (Settings -> Image to LoRA)
and one environment name. ``resolve`` applies the rule and returns a ``Settings``; install.py, the
WebUI tab, the command line, ``serve`` and the worker's spawn all get theirs from it, and nothing
else in the package reads an ``I2L_*`` variable. README's settings table is ``markdown_table()``.

Standard library only: the WebUI imports this at start.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from . import catalog as _catalog

EXT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")

VARIANT_KEYS = tuple(_catalog.VARIANTS)
VRAM_PROFILES = ("auto", "gpu", "cpu_offload", "disk")
KEY_FORMATS = ("diffusers", "kohya")


@dataclass(frozen=True)
class Setting:
    name: str                       # the field of ``Settings``
    kind: str                       # path | paths | text | bool | number | choice | devices
    default: Any                    # a value, or a function of the ``Context``
    help: str
    default_text: str = ""          # how README's table states the default
    flag: str | None = None         # the WebUI's command-line flag
    cli: str | None = None          # the flag of ``python -m i2l_ext``
    option: str | None = None       # the WebUI setting's key
    env: str | None = None          # the environment name
    choices: tuple = ()
    low: float | None = None        # a number's range
    high: float | None = None
    slider: tuple = ()              # (min, max, step) of the WebUI setting's slider
    unset: tuple = ()               # values that mean "not set" (the language's "auto")

    @property
    def flag_dest(self) -> str | None:
        return self.flag[2:].replace("-", "_") if self.flag else None


@dataclass
class Context:
    """What the place we run in says about defaults: a WebUI's folders and language, or nothing."""
    models_root: str | None = None  # the WebUI's models folder
    lora_dir: str | None = None     # the WebUI's Lora folder (its own --lora-dir)
    language: str | None = None     # the WebUI's interface language
    environ: Mapping[str, str] = field(default_factory=dict)   # set by ``resolve``


def _webui_root_around() -> str | None:
    """The WebUI folder when this extension sits in ``<webui>/extensions/<name>``."""
    parent = os.path.dirname(EXT_ROOT)
    if os.path.basename(parent) in ("extensions", "extensions-builtin"):
        root = os.path.dirname(parent)
        if os.path.isdir(os.path.join(root, "models")):
            return root
    return None


def _models_root(ctx: Context) -> str | None:
    if ctx.models_root:
        return ctx.models_root
    root = _webui_root_around()
    return os.path.join(root, "models") if root else None


def _default_models_dir(ctx: Context) -> str:
    root = _models_root(ctx)
    return os.path.join(root, "i2L") if root else os.path.join(os.path.expanduser("~"), ".i2l", "models")


def _default_lora_dir(ctx: Context) -> str:
    if ctx.lora_dir:
        return ctx.lora_dir
    root = _models_root(ctx)
    return os.path.join(root, "Lora") if root else os.path.join(os.path.expanduser("~"), ".i2l", "Lora")


def _default_language(ctx: Context) -> str | None:
    return ctx.language            # None: the system's locale (i18n)


SETTINGS: tuple[Setting, ...] = (
    Setting("models_dir", "path", _default_models_dir, "folder of the i2L model files",
            "the WebUI's `models/i2L`, else `~/.i2l/models`",
            flag="--i2l-models-dir", cli="--models-dir", option="i2l_models_dir", env="I2L_MODELS_DIR"),
    Setting("lora_dir", "path", _default_lora_dir, "where new LoRAs go",
            "the WebUI's Lora folder, else `~/.i2l/Lora` (made on first use)",
            flag="--i2l-lora-dir", cli="--lora-dir", env="I2L_LORA_DIR"),
    Setting("worker_python", "path", None, "a worker interpreter you manage yourself (diffsynth 2.1.12, transformers 5)",
            "the one install.py builds in `worker_env`",
            flag="--i2l-python", cli="--python", option="i2l_worker_python", env="I2L_PYTHON"),
    Setting("worker_env", "path", os.path.join(EXT_ROOT, ".venv-worker"), "folder of the worker environment install.py builds",
            "`<extension>/.venv-worker`", flag="--i2l-worker-env", cli="--env", env="I2L_WORKER_ENV"),
    Setting("wheels", "path", None, "install the worker environment only from this folder of wheels (offline machines)",
            "none: from the package index", flag="--i2l-wheels", cli="--wheels", env="I2L_WHEELS"),
    Setting("offline", "bool", False, "never contact a model hub or package index", "off",
            flag="--i2l-offline", cli="--offline", option="i2l_offline", env="I2L_OFFLINE"),
    Setting("own_torch", "bool", False, "give the worker a torch of its own instead of reusing the WebUI's (2.6+)",
            "off", flag="--i2l-own-torch", cli="--own-torch", env="I2L_OWN_TORCH"),
    Setting("index_url", "text", lambda ctx: ctx.environ.get("INDEX_URL") or None,
            "package index for the worker environment", "the WebUI's `INDEX_URL`, else pip's own (`PIP_INDEX_URL`)",
            cli="--index-url", env="I2L_INDEX_URL"),
    Setting("torch_index_url", "text", lambda ctx: ctx.environ.get("TORCH_INDEX_URL") or None,
            "where the worker's own torch comes from", "the WebUI's `TORCH_INDEX_URL`, else PyPI (Windows: PyTorch's CUDA index)",
            cli="--torch-index-url", env="I2L_TORCH_INDEX_URL"),
    Setting("language", "text", _default_language, "interface language: en or zh_CN",
            "the WebUI's localization, else the system's locale",
            cli="--lang", option="i2l_language", env="I2L_LANG", unset=("auto",)),
    Setting("image_dirs", "paths", (), "folders the page's folder box may read images from when other computers "
            "can reach the page (a WebUI with --listen, serve --host); elsewhere any folder",
            "none: uploads only", flag="--i2l-image-dirs", cli="--image-dir", env="I2L_IMAGE_DIRS"),
    Setting("gpus", "devices", None, "GPUs for jobs, e.g. 0,1: one worker per GPU, each seeing only its own, and "
            "queued jobs go to the first free one (cpu: a worker on the CPU, slow)",
            "one worker, seeing the GPUs the WebUI sees",
            flag="--i2l-gpus", cli="--gpus", env="I2L_GPUS"),
    Setting("default_variant", "choice", "style", "the variant the tab starts with", "style",
            option="i2l_default_variant", choices=VARIANT_KEYS),
    Setting("vram_profile", "choice", "auto", "how weights reach the GPU: auto, gpu, cpu_offload, disk", "auto",
            cli="--vram-profile", option="i2l_vram_profile", choices=VRAM_PROFILES),
    Setting("key_format", "choice", "diffusers", "the LoRA's key names: diffusers or kohya", "diffusers",
            cli="--key-format", option="i2l_key_format", choices=KEY_FORMATS),
    Setting("vram_limit_gb", "number", 0.0, "never let the worker use more VRAM than this (GB; 0: no limit)", "0",
            cli="--vram-limit", option="i2l_vram_limit_gb", env="I2L_VRAM_LIMIT_GB", low=0, high=1024,
            slider=(0, 80, 0.5)),
    Setting("ram_limit_gb", "number", 0.0, "never let the worker keep more RAM than this for weights (GB; 0: what "
            "the system and its container leave free); past it, weights are read from the disk as they are used",
            "0", cli="--ram-limit", option="i2l_ram_limit_gb", env="I2L_RAM_LIMIT_GB", low=0, high=4096,
            slider=(0, 256, 1)),
    Setting("free_vram", "bool", True, "free the WebUI's VRAM before a job", "on", option="i2l_free_vram"),
    Setting("keep_warm_minutes", "number", 10.0, "minutes an idle worker keeps the weights in RAM (0: none)", "10",
            option="i2l_keep_warm_minutes", low=0, high=24 * 60, slider=(0, 120, 1)),
    Setting("prewarm", "bool", True, "start reading the weights when the tab opens", "on", option="i2l_prewarm"),
    Setting("standby", "bool", True, "a standby worker (code imported, no GPU, no weights) once the WebUI is up",
            "on", option="i2l_standby"),
    Setting("start_with_webui", "bool", False, "read the default variant's weights when the WebUI starts", "off",
            option="i2l_start_with_webui"),
    Setting("gpu_hold_seconds", "number", 10.0, "seconds a job's weights stay on the GPU for the next job", "10",
            option="i2l_gpu_hold_seconds", low=0, high=3600, slider=(0, 120, 1)),
    Setting("gpu_hold_gb", "number", 10.0, "at most this many GB of them", "10", option="i2l_gpu_hold_gb",
            low=0, high=1024, slider=(0, 80, 1)),
    Setting("app_env", "path", os.path.join(EXT_ROOT, ".venv-app"), "the standalone app's own environment (gradio)",
            "`<extension>/.venv-app`", env="I2L_APP_ENV"),
    Setting("install_tty", "bool", True, "show a long install live on the console while the WebUI starts", "on",
            env="I2L_INSTALL_TTY"),
    Setting("skip_install", "bool", False, "install.py checks nothing and builds nothing", "off",
            flag="--skip-install", env="I2L_SKIP_INSTALL"),
    Setting("trace", "path", None, "append the worker's start-up steps, with times, to this file", "none",
            env="I2L_TRACE"),
    Setting("debug", "bool", False, "print the details behind an error (tracebacks, the worker's log)", "off",
            env="I2L_DEBUG"),
)
BY_NAME = {s.name: s for s in SETTINGS}


@dataclass
class Settings:
    """The settings in force, plus what a caller running jobs adds (``host``, time limits)."""
    models_dir: str = ""
    lora_dir: str = ""
    worker_python: str | None = None
    worker_env: str = os.path.join(EXT_ROOT, ".venv-worker")
    wheels: str | None = None
    offline: bool = False
    own_torch: bool = False
    index_url: str | None = None
    torch_index_url: str | None = None
    language: str | None = None
    image_dirs: tuple = ()
    gpus: str | None = None
    default_variant: str = "style"
    vram_profile: str = "auto"
    key_format: str = "diffusers"
    vram_limit_gb: float = 0.0
    ram_limit_gb: float = 0.0
    free_vram: bool = True
    keep_warm_minutes: float = 10.0
    prewarm: bool = True
    standby: bool = True
    start_with_webui: bool = False
    gpu_hold_seconds: float = 10.0
    gpu_hold_gb: float = 10.0
    app_env: str = os.path.join(EXT_ROOT, ".venv-app")
    install_tty: bool = True
    skip_install: bool = False
    trace: str | None = None
    debug: bool = False
    # -- not settings: what the caller decides
    host: str = "standalone"            # a1111 | forge | neo | reforge | standalone | cli
    remote: bool = False                # other computers can reach the page (the owner's rules apply to them)
    job_timeout: float = 3600.0
    start_timeout: float = 600.0
    search_dirs: list[str] = field(default_factory=list)
    worker_env_vars: dict = field(default_factory=dict)     # extra environment for the worker process
    sources: dict = field(default_factory=dict)             # setting -> flag | setting | env | default
    problems: list = field(default_factory=list)            # values that were ignored, as (setting, where, value)

    @property
    def idle_timeout(self) -> float:
        """Seconds an idle worker waits before it gives its weights back (0: after each job)."""
        return max(0.0, float(self.keep_warm_minutes or 0)) * 60.0

    @property
    def keep_warm(self) -> bool:
        return self.idle_timeout > 0

    def given(self, name: str) -> bool:
        """Whether the user chose ``name`` (by flag, setting or environment) rather than the default."""
        return self.sources.get(name, "default") != "default"

    def cli_flags(self, *names: str) -> str:
        """The flags that repeat the user's own choice of ``names`` in a suggested command (those whose
        value differs from what a plain ``python -m i2l_ext`` here would use)."""
        plain = resolve({}, environ=os.environ)
        out = []
        for name in names:
            value = getattr(self, name)
            if value and value != getattr(plain, name):
                out += [BY_NAME[name].cli, str(value)]
        if not out:
            return ""
        if os.name == "nt":
            import subprocess
            return " " + subprocess.list2cmdline(out)
        import shlex
        return " " + " ".join(shlex.quote(x) for x in out)

    @property
    def worker_devices(self) -> list[str | None]:
        """One entry per worker: the GPU it sees ("cpu": none), or None (one worker seeing what the host sees)."""
        return self.gpus.split(",") if self.gpus else [None]

    def worker_args(self) -> list[str]:
        """What the worker is started with besides its module (settings a worker keeps for its life)."""
        args = []
        if self.vram_limit_gb and self.vram_limit_gb > 0:
            args += ["--vram-limit-gb", f"{self.vram_limit_gb:g}"]
        if self.ram_limit_gb and self.ram_limit_gb > 0:
            args += ["--ram-limit-gb", f"{self.ram_limit_gb:g}"]
        if self.trace:
            args += ["--trace", self.trace]
        return args


def parse(setting: Setting, raw) -> Any:
    """``raw`` (a string from the environment or a file, or a value) as the setting's type; raises
    ValueError with the reason when it is not one."""
    if raw is None:
        return None
    if setting.kind == "paths":
        return _parse_paths(raw) or None
    if setting.kind == "bool":
        if isinstance(raw, bool):
            return raw
        s = str(raw).strip().lower()
        if s in TRUE:
            return True
        if s in FALSE:
            return False
        raise ValueError("not one of 1/0, true/false, yes/no, on/off")
    if setting.kind == "number":
        try:
            v = float(raw)
        except (TypeError, ValueError):
            raise ValueError("not a number") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError("not a finite number")
        if (setting.low is not None and v < setting.low) or (setting.high is not None and v > setting.high):
            raise ValueError(f"outside {setting.low:g}..{setting.high:g}")
        return v
    s = str(raw).strip()
    if not s or s in setting.unset:
        return None
    if setting.kind == "devices":
        ids = [d.strip().lower() for d in s.split(",") if d.strip()]
        if not all(d.isdigit() or d == "cpu" for d in ids) or len(set(ids)) != len(ids) or not 1 <= len(ids) <= 16:
            raise ValueError("not a list of GPU numbers such as 0,1 (or cpu)")
        return ",".join(d if d == "cpu" else str(int(d)) for d in ids)
    if setting.kind == "choice":
        if s not in setting.choices:
            raise ValueError("not one of " + ", ".join(setting.choices))
        return s
    if setting.kind == "path":
        return os.path.abspath(os.path.expanduser(s))
    return s


def _parse_paths(raw) -> tuple:
    items = raw if isinstance(raw, (list, tuple)) else str(raw).split(os.pathsep)
    return tuple(os.path.abspath(os.path.expanduser(str(p).strip())) for p in items if str(p).strip())


def resolve(flags: Mapping[str, Any] | None = None, option: Callable[[str], Any] | None = None,
            environ: Mapping[str, str] | None = None, context: Context | None = None, **runtime) -> Settings:
    """The settings in force. ``flags``: setting name -> value given on a command line (None: not
    given); ``option``: a WebUI setting's value by key (None or "": not set); ``environ``: the
    environment (default ``os.environ``); ``context``: the WebUI's folders and language.
    ``runtime``: fields that are not settings (``host``, ``search_dirs``, ...), or fixed values."""
    flags = flags or {}
    environ = os.environ if environ is None else environ
    ctx = dataclasses.replace(context or Context(), environ=environ)
    values, sources, problems = {}, {}, []
    for s in SETTINGS:
        chosen, where = None, "default"
        candidates = [("flag", flags.get(s.name))]
        if s.option and option is not None:
            candidates.append(("setting", option(s.option)))
        if s.env:
            candidates.append(("env", environ.get(s.env)))
        for src, raw in candidates:
            if raw is None or (isinstance(raw, str) and not raw.strip()):
                continue
            try:
                v = parse(s, raw)
            except ValueError as e:
                problems.append((s, src, raw, str(e)))
                continue
            if v is not None:
                chosen, where = v, src
                break
        if where == "default":
            d = s.default(ctx) if callable(s.default) else s.default
            chosen = parse(s, d) if isinstance(d, str) and s.kind == "path" else d
        values[s.name], sources[s.name] = chosen, where
    fixed = {k: v for k, v in runtime.items() if k in BY_NAME}
    for k, v in fixed.items():
        values[k], sources[k] = v, "caller"
    other = {k: v for k, v in runtime.items() if k not in BY_NAME}
    return Settings(**values, **other, sources=sources, problems=problems)


def from_args(args, **runtime) -> Settings:
    """The settings for a ``python -m i2l_ext`` command: its parsed flags (dest = setting name)."""
    flags = {s.name: getattr(args, s.name, None) for s in SETTINGS}
    return resolve(flags, **runtime)


def flags_from_cmd_opts(cmd_opts) -> dict:
    """The values of our WebUI flags in the WebUI's parsed command line (``shared.cmd_opts``)."""
    out = {}
    for s in SETTINGS:
        if s.flag and s.name != "skip_install":
            v = getattr(cmd_opts, s.flag_dest, None)
            out[s.name] = v if v not in (False, "") else None
    return out


def add_webui_flags(parser) -> None:
    """preload.py: our flags on the WebUI's parser; one someone else already defined is left alone."""
    for s in SETTINGS:
        if not s.flag or s.name == "skip_install":          # --skip-install is the WebUI's own
            continue
        if s.flag in getattr(parser, "_option_string_actions", {}):
            continue
        kwargs = {"dest": s.flag_dest, "help": f"Image to LoRA: {s.help} (default: {_plain(s.default_text)})"}
        if s.kind == "bool":
            kwargs.update(action="store_true", default=False)
        else:
            kwargs.update(type=str, default=None)
        try:
            parser.add_argument(s.flag, **kwargs)
        except Exception:       # argparse.ArgumentError on a conflict, or an unusual parser: never break the host
            pass


def add_cli_flag(parser, name: str, **extra) -> None:
    """A setting's flag on a ``python -m i2l_ext`` parser, with dest = the setting's name."""
    s = BY_NAME[name]
    kwargs = {"dest": s.name, "help": f"{s.help} (default: {_plain(s.default_text)}"
                                      + (f"; or {s.env}" if s.env else "") + ")"}
    if s.kind == "bool":
        kwargs.update(action="store_true", default=None)
    elif s.kind == "paths":
        kwargs.update(action="append", default=None, metavar="DIR")
    elif s.kind == "choice":
        kwargs.update(choices=list(s.choices), default=None)
    elif s.kind in ("number", "devices"):
        kwargs.update(type=lambda raw: _cli_value(s, raw), default=None)
    kwargs.update(extra)
    parser.add_argument(s.cli, **kwargs)


def _cli_value(setting: Setting, raw: str):
    """A flag's value checked as the setting's own: a bad one is refused by the command line at once
    (an environment value is ignored and said, a command is not run on a value it did not get)."""
    import argparse
    try:
        return parse(setting, raw)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{raw!r}: {e}") from None


def _plain(text: str) -> str:
    return text.replace("`", "")


def describe(settings: Settings) -> list[tuple[str, str, str]]:
    """(setting, value, where it came from) for ``python -m i2l_ext settings``."""
    out = []
    for s in SETTINGS:
        v = getattr(settings, s.name)
        out.append((s.name, "" if v is None else str(v), settings.sources.get(s.name, "default")))
    return out


def markdown_table() -> str:
    """README's settings table."""
    rows = ["| setting | flag | WebUI setting | environment | default |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        flags = [f"`{s.flag}` (WebUI)" if s.flag else "", f"`{s.cli}` (command line)" if s.cli else ""]
        rows.append(f"| {s.name}: {s.help} | {', '.join(f for f in flags if f) or '-'} | "
                    f"{f'`{s.option}`' if s.option else '-'} | {f'`{s.env}`' if s.env else '-'} | {s.default_text} |")
    return "\n".join(rows)


def replace(settings: Settings, **changes) -> Settings:
    return dataclasses.replace(settings, **changes)


LOOPBACK_NAMES = ("localhost", "ip6-localhost", "::1")


def is_loopback(host: str | None) -> bool:
    """Whether a server bound to ``host`` can be reached from this computer only."""
    h = (host or "").strip().strip("[]").lower()
    if not h:
        return False
    if h in LOOPBACK_NAMES:
        return True
    import ipaddress
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False
