"""A download running in a thread, for the tab: ``start()``, ``progress()``, ``cancel()``."""
from __future__ import annotations

import threading
import traceback

from ..contract import I2LError, T, raw
from .download import Downloader, Progress
from .sources import Source


class DownloadTask:
    """Downloads what ``variant`` lacks in a background thread.

    ``progress()`` returns a snapshot dict: ``state`` (idle, planning, listing, downloading,
    verifying, done, cancelled, error), ``file``, ``file_index``, ``file_count``, ``file_done``,
    ``file_total``, ``done``, ``total`` (bytes), ``speed`` (bytes/s), ``eta`` (s or None),
    ``message``, ``source``. ``result`` (dict) or ``error`` (``I2LError``) once finished."""

    def __init__(self, models_dir: str, variant: str, bias: bool | None = None, source: Source | None = None,
                 search_dirs=(), offline: bool | None = None, on_progress=None, **downloader_options):
        self.variant, self.bias = variant, bias
        self.cancel_event = threading.Event()
        self._progress = Progress(on_progress)
        self.downloader = Downloader(models_dir, source=source, search_dirs=search_dirs, offline=offline,
                                     progress=self._progress, cancel=self.cancel_event, **downloader_options)
        self.result: dict | None = None
        self.error: I2LError | None = None
        self._thread: threading.Thread | None = None
        self._done = threading.Event()

    def start(self) -> "DownloadTask":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name=f"i2l-download-{self.variant}")
            self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.result = self.downloader.download(self.variant, self.bias)
        except I2LError as e:
            self.error = e
            self._progress.set(state="cancelled" if e.code == I2LError.CANCELLED else "error", message=e.text)
        except Exception as e:  # noqa: BLE001 - reported to the user, never lost
            self.error = I2LError(I2LError.INTERNAL, T("m_dl_failed", error=raw(e)), T("m_report"),
                                  traceback.format_exc())
            self._progress.set(state="error", message=self.error.text)
        finally:
            self._done.set()

    def progress(self) -> dict:
        snap = self._progress.snapshot()
        snap["bytes"] = snap["done"]          # alias
        if self.error is not None:
            snap["error"] = self.error
        return snap

    def cancel(self) -> None:
        self.downloader.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def is_alive(self) -> bool:
        """Started and not finished yet."""
        return self._thread is not None and not self._done.is_set()
