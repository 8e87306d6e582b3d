"""The hubs' HTTP APIs, with ``urllib`` only (so it runs in any host venv).

Proxies come from the usual variables (``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``), which
``urllib`` reads by itself.
"""
from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass

from .. import __version__
from ..contract import I2LError, T, raw
from .sources import MODELSCOPE, Source

USER_AGENT = f"i2l_ext/{__version__} (+urllib)"


@dataclass(frozen=True)
class RemoteFile:
    repo: str
    path: str                  # inside the repo
    size: int
    sha256: str | None         # published sha256 (LFS files on Hugging Face, every file on ModelScope)
    git_oid: str | None        # git blob sha1 (Hugging Face files that are not in LFS)
    url: str

    def to_manifest(self) -> dict:
        return {"size": self.size, "sha256": self.sha256, "oid": self.git_oid}


def open_url(url: str, headers: dict | None = None, timeout: float = 60.0):
    h = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    h.update(headers or {})
    return urllib.request.build_opener().open(urllib.request.Request(url, headers=h), timeout=timeout)


def _get_json(url: str, source: Source, timeout: float) -> tuple[object, dict]:
    try:
        with open_url(url, {"Accept": "application/json"}, timeout) as r:
            return json.loads(r.read().decode("utf-8")), dict(r.headers)
    except urllib.error.HTTPError as e:
        raise http_error(e, source, url) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise network_error(e, source, url) from None


def http_error(e: urllib.error.HTTPError, source: Source, url: str) -> I2LError:
    if e.code in (401, 403):
        message = T("m_refused", source=source.label, url=url)
    elif e.code == 404:
        message = T("m_not_have", source=source.label, url=url)
    else:
        message = T("m_http", source=source.label, code=e.code, url=url)
    return I2LError(I2LError.DOWNLOAD, message,
                    T("m_other_source"), f"HTTP {e.code} {e.reason}")


def network_error(e: BaseException, source: Source, url: str) -> I2LError:
    return I2LError(I2LError.DOWNLOAD, T("m_unreachable", source=source.label, error=raw(getattr(e, "reason", e))),
                    T("m_unreachable_fix"),
                    f"{type(e).__name__}: {e} ({url})")


def list_repo(source: Source, repo: str, timeout: float = 60.0) -> list[RemoteFile]:
    """Every file of ``repo`` with its size and published hash."""
    url = source.list_url(repo)
    out: list[RemoteFile] = []
    if source.api == MODELSCOPE:
        data, _ = _get_json(url, source, timeout)
        if isinstance(data, dict) and data.get("Code") not in (None, 200, "200") and not data.get("Success", False):
            raise I2LError(I2LError.DOWNLOAD, T("m_cannot_list", source=source.label, repo=repo, error=data.get('Message') or data.get('Code')),
                           T("m_cannot_list_fix"))
        body = data.get("Data", data) if isinstance(data, dict) else data
        files = body.get("Files") or body.get("files") or [] if isinstance(body, dict) else body or []
        for f in files:
            if (f.get("Type") or f.get("type") or "blob") == "tree":
                continue
            path = f.get("Path") or f.get("path") or f.get("Name")
            if not path:
                continue
            sha = f.get("Sha256") or f.get("sha256") or None
            out.append(RemoteFile(repo, path, int(f.get("Size", f.get("size")) or 0), sha.lower() if sha else None,
                                  None, source.file_url(repo, path)))
        return out
    while url:
        data, headers = _get_json(url, source, timeout)
        if not isinstance(data, list):
            raise I2LError(I2LError.DOWNLOAD, T("m_bad_listing", source=source.label, repo=repo),
                           T("m_bad_listing_fix"), str(data)[:500])
        for f in data:
            if f.get("type") != "file":
                continue
            lfs = f.get("lfs") or {}
            out.append(RemoteFile(repo, f["path"], int(f.get("size") or lfs.get("size") or 0),
                                  (lfs.get("oid") or "").lower() or None, None if lfs else f.get("oid"),
                                  source.file_url(repo, f["path"])))
        url = _next_link(headers)
    return out


def _next_link(headers: dict) -> str | None:
    link = next((v for k, v in headers.items() if k.lower() == "link"), "")
    m = re.search(r'<([^>]+)>\s*;\s*rel="?next"?', link or "")
    return m.group(1) if m else None
