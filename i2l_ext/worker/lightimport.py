"""Import only the parts of diffsynth the engine uses.

``import diffsynth.models.x`` first runs ``diffsynth/__init__.py``, which imports the whole
package: every pipeline, the training code, the attention backends (and with them
``torch._dynamo`` and the inductor) and the hub clients. That costs seconds at every cold
start, while the engine needs a handful of modules. ``install()`` puts *lazy* stand-ins for the
heavy package ``__init__`` files into ``sys.modules``: a submodule imports as usual (its own file
runs, nothing else), and the first time anyone asks a stand-in for a name that only the real
``__init__`` defines, that ``__init__`` runs then, in the stand-in's namespace. So code that
wants the full package still gets it; the engine just never asks.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
import threading
import types

# Packages whose __init__ imports far more than the engine needs.
HEAVY = ("diffsynth", "diffsynth.core", "diffsynth.core.loader", "diffsynth.core.data",
         "diffsynth.core.vram")

_lock = threading.RLock()


def _lazy_package(name: str) -> types.ModuleType | None:
    if name in sys.modules:
        return None
    parent, _, leaf = name.rpartition(".")
    if parent and parent not in sys.modules:
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations or not spec.origin:
        return None
    where = list(spec.submodule_search_locations)
    mod = types.ModuleType(name)
    lazy_spec = importlib.machinery.ModuleSpec(name, None, origin=spec.origin, is_package=True)
    lazy_spec.submodule_search_locations = where
    lazy_spec.has_location = True
    mod.__spec__, mod.__path__, mod.__package__, mod.__file__ = lazy_spec, where, name, spec.origin
    state = {"ran": False}

    def run_real_init() -> None:
        with _lock:
            if state["ran"]:
                return
            state["ran"] = True
            with open(spec.origin, "rb") as f:
                code = compile(f.read(), spec.origin, "exec")
            exec(code, mod.__dict__)

    def __getattr__(attr: str):
        if attr == "__all__":            # ``from package import *``: the real names, all of them
            run_real_init()
            if "__all__" in mod.__dict__:
                return mod.__dict__["__all__"]
            raise AttributeError(attr)
        if attr.startswith("__"):
            raise AttributeError(attr)
        base = os.path.join(where[0], attr)
        if os.path.isdir(base) or os.path.isfile(base + ".py"):
            return importlib.import_module(f"{name}.{attr}")
        run_real_init()
        try:
            return mod.__dict__[attr]
        except KeyError:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}") from None

    mod.__getattr__ = __getattr__
    mod._i2l_lazy_init = run_real_init
    sys.modules[name] = mod
    if parent:
        setattr(sys.modules[parent], leaf, mod)
    return mod


def install() -> None:
    """Lazy stand-ins for diffsynth's heavy package files (no-op once diffsynth is imported), and
    transformers' map of its model modules from the saved copy (``importcache``)."""
    from . import importcache
    importcache.install()
    with _lock:
        for name in HEAVY:
            _lazy_package(name)


def import_model_code(with_text_encoder: bool = False) -> None:
    """The modules the engine uses, imported ahead of the first job."""
    install()
    import diffsynth.configs.model_configs  # noqa: F401
    import diffsynth.core.vram.initialization  # noqa: F401
    import diffsynth.core.loader.file  # noqa: F401
    import diffsynth.models.siglip2_image_encoder  # noqa: F401
    import diffsynth.models.dinov3_image_encoder  # noqa: F401
    import diffsynth.utils.state_dict_converters.dino_v3  # noqa: F401
    from .. import families
    from .models import real_model_config
    for role in families.DECODERS:          # each family's decoder code (a few small modules)
        importlib.import_module(real_model_config(role)["model_class"].rpartition(".")[0])
    if with_text_encoder:
        import diffsynth.models.qwen_image_text_encoder  # noqa: F401
