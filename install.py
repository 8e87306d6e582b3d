"""Run by the WebUI (in its own venv) at every launch: prepares Image to LoRA's WORKER environment.

Installs nothing into the WebUI's venv. The worker gets a venv of its own (``.venv-worker`` in this
folder) because diffsynth needs transformers 5; the WebUI's torch is reused when it is recent
enough. When nothing changed this takes a few milliseconds and calls no pip.
Its settings (flags here or in COMMANDLINE_ARGS, the WebUI's settings, the environment) are
the ones README's settings table lists; ``--repair`` rebuilds the environment from scratch.
"""
import os
import sys

_FILE = globals().get("__file__") or os.path.join(os.getcwd(), "install.py")
_ROOT = os.path.dirname(os.path.abspath(_FILE))


def main(argv=None) -> int:
    try:
        if _ROOT not in sys.path:
            sys.path.insert(0, _ROOT)
        from i2l_ext.envsetup.hostinstall import run_install
        return run_install(argv)
    except KeyboardInterrupt:
        print("Image to LoRA: install interrupted; the worker environment is not used until it is repaired.")
        return 130
    except BaseException as e:  # never let an error escape into the WebUI's launcher
        import traceback
        print("Image to LoRA: install.py failed unexpectedly: %s: %s" % (type(e).__name__, e))
        print("  To repair: cd \"%s\" && \"%s\" -m i2l_ext env repair" % (_ROOT, sys.executable))
        traceback.print_exc()
        return 1


if __name__ == "__main__" and os.path.abspath(sys.argv[0] or "") == os.path.abspath(_FILE):
    sys.exit(main())
elif __name__ != "__main__":
    pass  # imported: do nothing until main() is called
else:
    main([])  # executed inside another program: run, but never exit it
