"""What differs between the WebUIs that load this extension: which one it is, where LoRAs go,
how to free and give back VRAM, the Interrupt button, the queue lock, refreshing Lora cards.

Every WebUI import happens inside a function, so importing this module costs nothing and works
outside a WebUI (the standalone app and the CLI use ``detect_host() == "standalone"``).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from typing import Callable

from . import settings as settings_mod
from .service import HostHooks

HOSTS = ("a1111", "forge", "neo", "reforge", "standalone")


def _has(module: str) -> bool:
    if module in sys.modules:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def in_webui() -> bool:
    """True inside a WebUI process (its ``modules.script_callbacks`` is loaded)."""
    return "modules.script_callbacks" in sys.modules or (
        "modules.shared" in sys.modules and hasattr(sys.modules["modules.shared"], "opts"))


def detect_host() -> str:
    if not in_webui():
        return "standalone"
    if _has("modules_forge"):
        try:
            version = str(getattr(importlib.import_module("modules_forge.forge_version"), "version", ""))
        except Exception:
            version = ""
        if version.lower().startswith("neo") or _has("modules_forge.presets"):
            return "neo"
        if _has("backend"):
            return "forge"
        return "reforge" if _has("ldm_patched") else "forge"
    if _has("ldm_patched"):
        return "reforge"
    return "a1111"


def host_label(host: str) -> str:
    return {"a1111": "AUTOMATIC1111 WebUI", "forge": "Forge", "neo": "Forge Neo", "reforge": "reForge",
            "standalone": "standalone app", "cli": "command line"}.get(host, host)


def can_use_lora(host: str, family) -> bool:
    """Whether the host itself can generate with a LoRA of ``family`` (Forge Neo runs Qwen-Image
    and Z-Image; the other WebUIs neither)."""
    return host == "neo"


# -- folders -------------------------------------------------------------------------------------
def lora_dirs() -> list[str]:
    """The host's Lora folders; the first is where new LoRAs go."""
    dirs: list[str] = []
    try:
        from modules import shared
        d = getattr(shared.cmd_opts, "lora_dir", None)
        if d:
            dirs.append(d)
        extra = getattr(shared.cmd_opts, "lora_dirs", None)       # Neo: --lora-dirs
        if isinstance(extra, str):
            extra = [extra]
        for e in extra or []:
            if e and e not in dirs:
                dirs.append(e)
    except Exception:
        pass
    if not dirs:
        try:
            from modules import paths
            dirs.append(os.path.join(paths.models_path, "Lora"))
        except Exception:
            pass
    return [os.path.abspath(d) for d in dirs]


def lora_dir() -> str | None:
    dirs = lora_dirs()
    return dirs[0] if dirs else None


def models_root() -> str | None:
    try:
        from modules import paths
        return paths.models_path
    except Exception:
        return None


# -- settings -------------------------------------------------------------------------------------
def saved_option(key: str):
    """A WebUI setting's value, or None while it is at its default (the WebUIs store every
    setting with its default): a setting left alone leaves the choice to the environment and the
    default (see ``i2l_ext.settings``)."""
    try:
        from modules import shared
        value = shared.opts.data.get(key)
        info = shared.opts.data_labels.get(key)
    except Exception:
        return None
    if info is not None and value == getattr(info, "default", None):
        return None
    return value


def settings(**runtime) -> settings_mod.Settings:
    """The settings in force in this WebUI: our flags on its command line, its settings, the
    environment, and defaults from its folders and language."""
    try:
        from modules import shared
        flags = settings_mod.flags_from_cmd_opts(shared.cmd_opts)
    except Exception:
        flags = {}
    ctx = settings_mod.Context(models_root=models_root(), lora_dir=lora_dir(), language=host_language())
    return settings_mod.resolve(flags, option=saved_option, context=ctx, host=detect_host(), remote=reachable_from_others(),
                                **runtime)


def reachable_from_others() -> bool:
    """Whether the WebUI serves other computers: ``--listen``, a non-loopback ``--server-name``,
    ``--share`` or a tunnel. Then the page follows the owner's rules for remote users (the WebUI's own
    ``--gradio-auth`` guards it; we open nothing more)."""
    try:
        from modules import shared
        o = shared.cmd_opts
    except Exception:
        return False
    name = getattr(o, "server_name", None)
    return bool(getattr(o, "listen", False) or getattr(o, "share", False) or getattr(o, "ngrok", None)
                or (name and not settings_mod.is_loopback(name)))


def opt(key: str, default=None):
    try:
        from modules import shared
        v = getattr(shared.opts, key, None)
        if v is None:
            v = shared.opts.data.get(key, default)
        return default if v in (None, "") else v
    except Exception:
        return default


def host_language() -> str | None:
    """The host's UI language, from its localization setting (e.g. 'zh_CN', 'zh-Hans (Stable)')."""
    loc = opt("localization", "None")
    if loc and str(loc).lower() != "none":
        s = str(loc).lower()
        if s.startswith("zh"):
            return "zh_CN"
        return str(loc)
    return None


# -- the one controller of a WebUI process --------------------------------------------------------
_controller = None
_controller_lock = threading.Lock()


def webui_controller(make):
    """The tab's controller for this WebUI process, made by ``make()`` the first time.

    The WebUI's Reload UI executes ``scripts/`` again as new modules, but this package stays imported:
    keeping the controller here means a reload reuses it and the worker it owns (with the weights that
    worker holds in RAM) instead of starting a second one beside it.
    """
    global _controller
    with _controller_lock:
        if _controller is None:
            _controller = make()
        return _controller


def park_worker() -> dict | None:
    """Before the host generates: the worker (if there is one) frees the VRAM it kept after its
    last job. Never starts anything; the worker's answer, or None when there is no idle worker."""
    service = getattr(_controller, "service", None)
    if service is None:
        return None
    return service.park(timeout=5.0)


# -- the queue lock -------------------------------------------------------------------------------
def queue_lock():
    """The host's lock that serialises GPU work (txt2img, img2img...), or None outside a WebUI."""
    try:
        from modules import call_queue
        return call_queue.queue_lock
    except Exception:
        return None


class LockWaiter:
    """Takes ``lock`` from a thread of its own with a plain blocking ``acquire()``.

    The WebUIs' queue lock is a ``FIFOLock`` (``modules/fifo_lock.py``) whose ``acquire`` takes no
    ``timeout``; a blocking call from a thread keeps its first-come order and lets the page be told
    "waiting" meanwhile. ``wait(t)`` is True once the lock is held (by this waiter, for the caller);
    ``abandon()`` gives it back, now or as soon as the thread gets it, if the caller stops waiting.
    """

    def __init__(self, lock):
        self.lock = lock
        self._got = threading.Event()
        self._mutex = threading.Lock()
        self._abandoned = False
        self._error: BaseException | None = None
        threading.Thread(target=self._take, daemon=True, name="i2l-queue-wait").start()

    def _take(self) -> None:
        try:
            self.lock.acquire()
        except BaseException as e:      # never hold anything on failure
            self._error = e
            self._got.set()
            return
        with self._mutex:
            if self._abandoned:
                _release(self.lock)
                return
            self._got.set()

    def wait(self, timeout: float) -> bool:
        if not self._got.wait(timeout):
            return False
        if self._error is not None:
            raise self._error
        return True

    def abandon(self) -> None:
        with self._mutex:
            if self._abandoned:
                return
            self._abandoned = True
            held = self._got.is_set() and self._error is None
        if held:
            _release(self.lock)


def _release(lock) -> None:
    try:
        lock.release()
    except RuntimeError:
        pass


class HostGate:
    """The WebUI's queue lock, held while any job of ours runs, so a txt2img click waits for the job
    instead of fighting it for the GPU. Jobs running side by side (one per GPU) share one hold: the
    first to start takes the lock (waiting for a generation in progress), the last to end gives it
    back, and ``first`` / ``last`` run then (the WebUI's VRAM freed, and given back)."""

    def __init__(self, lock, first: Callable[[], None] = lambda: None, last: Callable[[], None] = lambda: None):
        self.lock, self.first, self.last = lock, first, last
        self._mutex = threading.Lock()
        self._users = 0
        self._held = False
        self._waiter: LockWaiter | None = None

    def enter(self, cancelled: Callable[[], bool], waiting: Callable[[], None]) -> bool:
        """Wait for the hold; False when ``cancelled()`` turns true first. Every ``enter`` is
        followed by one ``leave``, whatever it returned."""
        with self._mutex:
            self._users += 1
            if not self._held and self._waiter is None:
                self._waiter = LockWaiter(self.lock) if self.lock is not None else None
                if self._waiter is None:
                    self._held = True
                    self._run(self.first)
        told = False
        while True:
            with self._mutex:
                if self._held:
                    return True
                waiter = self._waiter
            if waiter.wait(0.25):
                with self._mutex:
                    if not self._held and self._waiter is waiter:
                        self._held, self._waiter = True, None
                        self._run(self.first)
                continue
            if cancelled():
                return False            # the caller's ``leave`` (after_job) still follows
            if not told:
                waiting()
                told = True

    def leave(self) -> None:
        with self._mutex:
            self._users -= 1
            if self._users > 0:
                return
            if self._held:
                self._held = False
                self._run(self.last)
                if self.lock is not None:
                    _release(self.lock)
            elif self._waiter is not None:
                self._waiter.abandon()
                self._waiter = None

    @staticmethod
    def _run(fn) -> None:
        try:
            fn()
        except Exception as e:      # never leaves the WebUI locked or the job hanging
            print(f"[Image to LoRA] {e!r}")


# -- a weight sweep with the host's X/Y/Z plot -----------------------------------------------------
SCRIPT_LIST, XYZ_TYPE, XYZ_VALUES = "script_list", "script_txt2img_xyz_plot_x_type", "script_txt2img_xyz_plot_x_values"
XYZ_TITLE, PROMPT_SR = "X/Y/Z plot", "Prompt S/R"
SWEEP_WEIGHTS = (1, 0.25, 0.5, 0.75, 1.25)      # Prompt S/R replaces the first, which is what the prompt holds
_seen: dict = {}
_sweep: dict = {}


def remember_component(component, elem_id: str | None) -> None:
    """Called for every component the host makes (``script_callbacks.on_after_component``): keeps
    txt2img's script menu and its X/Y/Z plot's X axis fields, which the weight sweep fills. A new UI
    (Reload UI) replaces them."""
    if elem_id == SCRIPT_LIST:
        _seen.setdefault("script_list", component)       # txt2img's comes first in each UI build
    elif elem_id == XYZ_TYPE and "script_list" in _seen:
        _sweep.clear()
        _sweep.update(script_list=_seen.pop("script_list"), x_type=component)
    elif elem_id == XYZ_VALUES and "x_type" in _sweep:
        _sweep["x_values"] = component
        _seen.clear()


def sweep_components() -> list | None:
    """[script menu, X type, X values] of txt2img, or None when this host has no X/Y/Z plot."""
    if all(k in _sweep for k in ("script_list", "x_type", "x_values")):
        return [_sweep["script_list"], _sweep["x_type"], _sweep["x_values"]]
    return None


def sweep_ready() -> bool:
    return sweep_components() is not None


def sweep_choice(component, wanted: str) -> str:
    """The value among ``component``'s own choices that is ``wanted`` compared without case:
    Forge Classic titles its script "X/Y/Z Plot" where AUTOMATIC1111 and reForge say "X/Y/Z plot",
    and a type="index" menu given a value not among its choices hands the host's handlers None."""
    for c in getattr(component, "choices", None) or ():
        label, value = (c[0], c[1]) if isinstance(c, (list, tuple)) else (c, c)
        if str(label).casefold() == wanted.casefold():
            return value
    return wanted


def sweep_values(name: str) -> tuple[str, str]:
    """(the prompt text, the X values) that make one Generate draw ``name`` at each sweep weight."""
    tags = [f"<lora:{name}:{w:g}>" for w in SWEEP_WEIGHTS]
    return tags[0], ", ".join(tags)


# -- refreshing the Lora list ---------------------------------------------------------------------
def refresh_loras() -> bool:
    """Make the host's Lora list see new or renamed files (the page then clicks its refresh button)."""
    try:
        import networks          # the built-in Lora extension's module
        networks.list_available_networks()
        return True
    except Exception:
        return False


def lora_cards_refreshable(host: str | None = None) -> bool:
    """Whether the host's Lora cards can be refreshed now (the page clicks the hidden refresh button).

    AUTOMATIC1111 and reForge refresh every extra-networks page together, and their Textual
    Inversion page needs a loaded checkpoint: without one the refresh raises and the Lora cards show
    "Error" until the next manual Refresh (the host's own Refresh button does the same). Then the
    page leaves the cards alone; a new LoRA still works in prompts (``refresh_loras``).
    """
    host = host or detect_host()
    if host == "standalone":
        return False
    if host not in ("a1111", "reforge"):
        return True
    try:
        from modules import sd_models
        return getattr(sd_models.model_data, "sd_model", None) is not None     # never triggers a load
    except Exception:
        return True


# -- hooks ----------------------------------------------------------------------------------------
class WebUIHooks(HostHooks):
    """Holds the WebUI's queue lock while jobs run (``HostGate``): frees the host's VRAM before,
    gives it back after (A1111), shows the WebUI busy, watches Interrupt."""

    def __init__(self, host: str | None = None, restore: bool = True):
        self.host = host or detect_host()
        self.restore = restore
        self._moved_model = None
        self._began = False
        self._free_vram = True
        self.gate = HostGate(queue_lock(), first=self._begin, last=self._end)

    def before_job(self, settings, job) -> bool:
        from .contract import T
        self._free_vram = bool(settings.free_vram)
        return self.gate.enter(lambda: job._cancel.is_set(),
                               lambda: job._progress("start", 0, 1, T("waiting_for_host")))

    def after_job(self) -> None:
        self.gate.leave()

    def _begin(self) -> None:
        try:
            from modules import shared
            shared.state.begin(job="i2l")        # clears a stale Interrupt and shows the job as busy
            self._began = True
        except Exception:
            self._began = False
        if self._free_vram:
            self._free()

    def _end(self) -> None:
        try:
            if self.restore:
                self._give_back()
        finally:
            if self._began:
                try:
                    from modules import shared
                    shared.state.end()
                except Exception:
                    pass
                self._began = False

    def interrupted(self) -> bool:
        try:
            from modules import shared
            return bool(getattr(shared.state, "interrupted", False))
        except Exception:
            return False

    def sd_version(self, family) -> str:
        return family.sd_version if self.host == "neo" else "Unknown"

    def needs_gpu_after_job(self) -> bool:
        return self.restore and self._moved_model is not None

    # -- per host ---------------------------------------------------------------------------
    def _free(self) -> None:
        if self.host in ("forge", "neo"):
            mm = importlib.import_module("backend.memory_management")
            mm.unload_all_models()
            mm.soft_empty_cache(force=True)
        elif self.host == "reforge":
            mm = importlib.import_module("ldm_patched.modules.model_management")
            mm.unload_all_models()
            mm.soft_empty_cache(force=True)
        elif self.host == "a1111":
            from modules import devices, sd_models
            model = getattr(sd_models.model_data, "sd_model", None)     # never triggers a load
            if model is not None and getattr(model, "device", None) is not None and \
                    str(getattr(model, "device", "cpu")) != "cpu":
                sd_models.unload_model_weights(model)
                self._moved_model = model
            devices.torch_gc()

    def _give_back(self) -> None:
        if self.host == "a1111" and self._moved_model is not None:
            model, self._moved_model = self._moved_model, None
            from modules import sd_models
            if getattr(sd_models.model_data, "sd_model", None) is model:
                sd_models.send_model_to_device(model)
        # Forge, Neo and reForge load models again lazily on the next generation.


def make_hooks(host: str | None = None) -> HostHooks:
    host = host or detect_host()
    if host == "standalone":
        return HostHooks()
    return WebUIHooks(host)
