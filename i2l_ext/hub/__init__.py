"""Model downloads from ModelScope, ModelScope international, Hugging Face or a mirror.

Standard library only (``urllib``), so it runs inside any WebUI venv. The worker never downloads:
it gets the paths ``i2l_ext.catalog.resolve_files`` found.

For the tab::

    from i2l_ext import hub
    hub.models_status(models_dir, search_dirs)          # what is present / missing, how big
    task = hub.DownloadTask(models_dir, "style").start()  # .progress(), .cancel(), .result / .error
    hub.get_source(...) / hub.load_settings(models_dir) / hub.save_settings(models_dir, source=...)
"""
from .download import Downloader, Plan, Progress, offline_error
from .remote import RemoteFile, list_repo
from .sources import (CUSTOM, HUGGINGFACE, LABELS, MODELSCOPE, MODELSCOPE_INTL, SOURCE_NAMES, Source, get_source,
                      load_settings, save_settings, search_dirs_for)
from .status import models_status, role_status, status_rows, verify
from .task import DownloadTask

__all__ = ["Downloader", "Plan", "Progress", "offline_error", "RemoteFile", "list_repo", "CUSTOM", "HUGGINGFACE",
           "LABELS", "MODELSCOPE", "MODELSCOPE_INTL", "SOURCE_NAMES", "Source", "get_source", "load_settings",
           "save_settings", "search_dirs_for", "models_status", "role_status", "status_rows",
           "verify", "DownloadTask"]
