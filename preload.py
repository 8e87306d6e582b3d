"""Image to LoRA's command-line flags, added to the WebUI's parser (read as ``shared.cmd_opts.i2l_*``).

Every flag starts with ``--i2l-`` and every ``dest`` with ``i2l_``, so they cannot clash with the
WebUI's or other extensions' flags; a flag someone else already defined is left alone.
"""


def _add(parser, flag, **kwargs):
    try:
        if flag in getattr(parser, "_option_string_actions", {}):
            return
        parser.add_argument(flag, **kwargs)
    except Exception:  # argparse.ArgumentError on a conflict, or an unusual parser: never break the host
        pass


def preload(parser):
    _add(parser, "--i2l-models-dir", dest="i2l_models_dir", type=str, default=None,
         help="Image to LoRA: folder with the i2L model files (default: models/i2L)")
    _add(parser, "--i2l-lora-dir", dest="i2l_lora_dir", type=str, default=None,
         help="Image to LoRA: where new LoRAs go (default: the WebUI's Lora folder)")
    _add(parser, "--i2l-python", dest="i2l_python", type=str, default=None,
         help="Image to LoRA: Python interpreter of a worker environment you manage yourself "
              "(default: the one install.py builds in the extension's .venv-worker)")
    _add(parser, "--i2l-worker-env", dest="i2l_worker_env", type=str, default=None,
         help="Image to LoRA: folder of the worker environment install.py builds (default: <extension>/.venv-worker)")
    _add(parser, "--i2l-wheels", dest="i2l_wheels", type=str, default=None,
         help="Image to LoRA: install the worker environment only from this folder of wheels (offline machines)")
    _add(parser, "--i2l-offline", dest="i2l_offline", action="store_true", default=False,
         help="Image to LoRA: never contact a model hub or package index")
    _add(parser, "--i2l-own-torch", dest="i2l_own_torch", action="store_true", default=False,
         help="Image to LoRA: give the worker a torch of its own instead of reusing the WebUI's")
