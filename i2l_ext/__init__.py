"""Image to LoRA: one image, or a few, into a Qwen-Image or Z-Image LoRA in seconds.

This package is importable in any host process: it imports neither torch nor any WebUI module
at module level. The heavy work runs in ``i2l_ext.worker`` inside its own Python environment.
"""
__version__ = "0.1.0"
