"""One error type for everything a user can run into.

Every failure, wherever it happens (the host process, the worker, a download), ends up as an
``I2LError`` carrying a stable ``code``, a plain-language ``message`` naming the cause, and a
``fix`` saying what to do about it. The worker sends these over the protocol as dicts; the
supervisor rebuilds them, so the tab, the CLI and the API show the same words.
"""
from __future__ import annotations


class I2LError(Exception):
    # Stable codes; the UI and tests match on these, never on the wording.
    BAD_INPUT = "bad_input"            # no image, not an image, corrupt, too large, bad name
    OUTPUT = "output"                  # Lora folder missing or unwritable, name taken
    WEIGHTS_MISSING = "weights_missing"
    WEIGHTS_INVALID = "weights_invalid"  # not safetensors, wrong model, damaged
    OUT_OF_MEMORY = "out_of_memory"
    WORKER_CRASHED = "worker_crashed"
    WORKER_START = "worker_start"      # interpreter missing, environment broken
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    BUSY = "busy"
    DOWNLOAD = "download"
    ENVIRONMENT = "environment"
    INTERNAL = "internal"

    def __init__(self, code: str, message: str, fix: str = "", details: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message
        self.fix = fix
        self.details = details

    def __str__(self) -> str:
        return self.message + (f"\nFix: {self.fix}" if self.fix else "")

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "fix": self.fix, "details": self.details}

    @classmethod
    def from_dict(cls, d: dict) -> "I2LError":
        return cls(d.get("code", cls.INTERNAL), d.get("message", "Unknown error"),
                   d.get("fix", ""), d.get("details", ""))


def bad_input(message: str, fix: str = "") -> I2LError:
    return I2LError(I2LError.BAD_INPUT, message, fix)
