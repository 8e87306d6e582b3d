"""A stand-in model hub on 127.0.0.1 speaking enough of the Hugging Face and ModelScope HTTP APIs
for their own client libraries (``huggingface_hub`` with ``HF_ENDPOINT``, ``modelscope`` with
``MODELSCOPE_ENDPOINT``) and for ``i2l_ext.hub`` to download small files.

Hugging Face: ``HEAD/GET /{repo}/resolve/{rev}/{path}`` (``X-Repo-Commit``, ``ETag``,
``X-Linked-Etag``/``X-Linked-Size`` for LFS files), ``GET /api/models/{repo}/tree/{rev}[/{dir}]``,
``GET /api/models/{repo}[/revision/{rev}]``. ModelScope: ``GET /api/v1/models/{repo}/repo/files``,
``GET /api/v1/models/{repo}/repo?Revision=&FilePath=``, ``GET /api/v1/models/{repo}/revisions``,
``GET /api/v1/models/{repo}``. Every request is recorded; faults can be injected per file, and a
file can stall part way (``stall_at``) until the test releases it, as a hung connection does.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import threading
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_THRESHOLD = 64          # files at least this big are "LFS" files (sha256 published)


class HubStub:
    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos
        self.requests: list[dict] = []
        self.drop_after: dict[str, list[int]] = {}   # path -> byte counts: drop the connection after that many, once each
        self.corrupt: dict[str, int] = {}            # path -> how many times to serve wrong bytes
        self.stall_at: dict[str, int] = {}           # path -> byte: stop sending there (once) until ``release``
        self.stalled = threading.Event()             # set when a stall begins
        self.release = threading.Event()             # set to let stalled transfers go on (and on exit)
        self.lock = threading.Lock()
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_HEAD(self):
                stub._handle(self, head=True)

            def do_GET(self):
                stub._handle(self, head=False)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass                     # clients dropping connections mid-file are expected here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    # -- helpers ----------------------------------------------------------------------------------
    @staticmethod
    def sha256(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    @staticmethod
    def git_oid(data: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def count(self, prefix: str = "") -> int:
        with self.lock:
            return sum(1 for r in self.requests if r["path"].startswith(prefix))

    def ranges(self, path_part: str) -> list[str | None]:
        with self.lock:
            return [r["range"] for r in self.requests if r["method"] == "GET" and (
                path_part in unquote(r["path"]) or path_part == r["query"].get("FilePath"))]

    def _repo(self, org: str, name: str):
        return self.repos.get(f"{org}/{name}")

    # -- dispatch ---------------------------------------------------------------------------------
    def _handle(self, h, head: bool) -> None:
        u = urlsplit(h.path)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        with self.lock:
            self.requests.append({"method": h.command, "path": u.path, "query": q, "range": h.headers.get("Range")})
        path = unquote(u.path)
        try:
            m = re.fullmatch(r"/api/v1/models/([^/]+)/([^/]+)/repo/files", path)
            if m:
                return self._ms_files(h, m[1], m[2], q)
            m = re.fullmatch(r"/api/v1/models/([^/]+)/([^/]+)/repo", path)
            if m:
                return self._serve_file(h, head, self._repo(m[1], m[2]), q.get("FilePath", ""), hf=False)
            m = re.fullmatch(r"/api/v1/models/([^/]+)/([^/]+)/revisions", path)
            if m:
                return self._json(h, {"Code": 200, "Success": True, "Data": {"RevisionMap": {
                    "Branches": [{"Revision": "master", "CreatedAt": 1700000000}], "Tags": []}}}, head)
            m = re.fullmatch(r"/api/v1/models/([^/]+)/([^/]+)", path)
            if m and self._repo(m[1], m[2]) is not None:
                return self._json(h, {"Code": 200, "Success": True, "Data": {"Path": m[1], "Name": m[2]}}, head)
            m = re.fullmatch(r"/api/models/([^/]+)/([^/]+)/tree/([^/]+)(?:/(.*))?", path)
            if m:
                return self._hf_tree(h, m[1], m[2], m[4] or "", head)
            m = re.fullmatch(r"/api/models/([^/]+)/([^/]+)(?:/revision/([^/]+))?", path)
            if m and self._repo(m[1], m[2]) is not None:
                files = self._repo(m[1], m[2])
                return self._json(h, {"id": f"{m[1]}/{m[2]}", "sha": COMMIT,
                                      "siblings": [{"rfilename": p} for p in sorted(files)]}, head,
                                  {"X-Repo-Commit": COMMIT})
            m = re.fullmatch(r"/api/cursor/(\w+)", path)
            if m and m[1] in self.__dict__.get("_cursors", {}):
                return self._json(h, self._cursors[m[1]], head)
            m = re.fullmatch(r"/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)", path)
            if m:
                return self._serve_file(h, head, self._repo(m[1], m[2]), m[4], hf=True)
        except (BrokenPipeError, ConnectionResetError):
            return
        self._send(h, 404, b'{"error":"not found"}', head, {"Content-Type": "application/json"})

    def _send(self, h, code: int, body: bytes, head: bool, headers: dict | None = None) -> None:
        h.send_response(code)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _json(self, h, obj, head: bool, headers: dict | None = None) -> None:
        self._send(h, 200, json.dumps(obj).encode(), head, dict({"Content-Type": "application/json"}, **(headers or {})))

    def _ms_files(self, h, org, name, q) -> None:
        files = self._repo(org, name)
        if files is None:
            return self._json(h, {"Code": 10010205001, "Success": False, "Message": "model not found"}, False)
        entries, dirs = [], set()
        for p, data in sorted(files.items()):
            parts = p.split("/")
            for i in range(1, len(parts)):
                dirs.add("/".join(parts[:i]))
            entries.append({"Name": parts[-1], "Path": p, "Size": len(data), "Sha256": self.sha256(data),
                            "Type": "blob", "Revision": COMMIT, "IsLFS": len(data) >= LFS_THRESHOLD})
        entries += [{"Name": d.split("/")[-1], "Path": d, "Size": 0, "Type": "tree"} for d in sorted(dirs)]
        self._json(h, {"Code": 200, "Success": True, "Message": "success", "Data": {"Files": entries}}, False)

    def _hf_tree(self, h, org, name, prefix, head) -> None:
        files = self._repo(org, name)
        if files is None:
            return self._send(h, 404, b'{"error":"Repository not found"}', head, {"Content-Type": "application/json"})
        prefix = prefix.strip("/")
        out, dirs = [], set()
        for p, data in sorted(files.items()):
            if prefix and not p.startswith(prefix + "/"):
                continue
            parts = p.split("/")
            for i in range(1, len(parts)):
                dirs.add("/".join(parts[:i]))
            e = {"type": "file", "oid": self.git_oid(data), "size": len(data), "path": p}
            if len(data) >= LFS_THRESHOLD:
                e["lfs"] = {"oid": self.sha256(data), "size": len(data), "pointerSize": 134}
            out.append(e)
        out = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)
               if not prefix or d.startswith(prefix + "/")] + out
        # Two pages, as the real API paginates with a Link header.
        split = len(out) // 2
        self._json(h, out, head) if split == 0 else self._paged(h, out, split, head)

    def _paged(self, h, out, split, head) -> None:
        # The stand-in serves the first page with a Link to a cursor it keeps; the cursor page is the rest.
        key = f"c{len(self.requests)}"
        self.__dict__.setdefault("_cursors", {})[key] = out[split:]
        h_url = f"{self.url}/api/cursor/{key}"
        self._json(h, out[:split], head, {"Link": f'<{h_url}>; rel="next"'})

    def _serve_file(self, h, head: bool, files, path: str, hf: bool) -> None:
        if files is None or path not in files:
            hdr = {"Content-Type": "application/json", "X-Error-Code": "EntryNotFound"}
            if hf:
                hdr["X-Repo-Commit"] = COMMIT
            return self._send(h, 404, b'{"error":"Entry not found"}', head, hdr)
        data = files[path]
        with self.lock:
            if not head and self.corrupt.get(path, 0) > 0:
                self.corrupt[path] -= 1
                data = bytes(b ^ 0x55 for b in data)
        size = len(data)
        start = 0
        rng = h.headers.get("Range")
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if hf:
            headers["X-Repo-Commit"] = COMMIT
            if len(data) >= LFS_THRESHOLD:
                headers["X-Linked-Etag"] = f'"{self.sha256(files[path])}"'
                headers["X-Linked-Size"] = str(size)
                headers["ETag"] = f'"{self.sha256(files[path])}"'
            else:
                headers["ETag"] = f'"{self.git_oid(files[path])}"'
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        code = 200
        if m:
            start = int(m[1])
            end = int(m[2]) if m[2] else size - 1
            if start >= size:
                return self._send(h, 416, b"", head, {"Content-Range": f"bytes */{size}"})
            code = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            data = data[start:end + 1]
        h.send_response(code)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if head:
            return
        drop = stall = None
        with self.lock:
            cuts = self.drop_after.get(path) or []
            if cuts and start < cuts[0] < start + len(data):
                drop = cuts.pop(0) - start
            at = self.stall_at.get(path)
            if at is not None and start <= at < start + len(data):
                stall = at - start
                del self.stall_at[path]
        if stall is not None:
            h.wfile.write(data[:stall])
            h.wfile.flush()
            self.stalled.set()
            self.release.wait(300)
            try:
                h.wfile.write(data[stall:])
            except OSError:
                pass                     # the client gave up on this connection meanwhile
            return
        if drop is None:
            h.wfile.write(data)
            return
        h.wfile.write(data[:drop])
        h.wfile.flush()
        h.close_connection = True
        try:
            import socket
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def repos_from_folder(root: str, repos) -> dict[str, dict[str, bytes]]:
    """The files of each repository in ``repos`` found under ``root`` in the models-folder layout
    (``<root>/<org>/<name>/<path>``), to serve a real model set (the tiny one) from the stub."""
    out: dict[str, dict[str, bytes]] = {}
    for repo in sorted(set(repos)):
        base = os.path.join(root, *repo.split("/"))
        files: dict[str, bytes] = {}
        for dirpath, _, names in os.walk(base):
            for n in names:
                full = os.path.join(dirpath, n)
                with open(full, "rb") as f:
                    files[os.path.relpath(full, base).replace(os.sep, "/")] = f.read()
        if files:
            out[repo] = files
    return out
