"""Image to LoRA's command-line flags on the WebUI's parser (``shared.cmd_opts.i2l_*``).

The flags are listed in ``i2l_ext.settings`` (one place for every setting); each starts with
``--i2l-`` and each ``dest`` with ``i2l_``, so they cannot clash with the WebUI's or other
extensions' flags, and a flag someone else already defined is left alone.
"""
import os
import sys

_ROOT = os.path.dirname(os.path.abspath(globals().get("__file__") or os.path.join(os.getcwd(), "preload.py")))


def preload(parser):
    try:
        if _ROOT not in sys.path:
            sys.path.insert(0, _ROOT)
            try:
                from i2l_ext import settings
            finally:
                sys.path.remove(_ROOT)
        else:
            from i2l_ext import settings
        settings.add_webui_flags(parser)
    except Exception as e:       # never break the WebUI's start
        print(f"Image to LoRA: could not add its command-line flags: {e}")
