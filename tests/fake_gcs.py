"""A local stand-in for Google Cloud Storage, for tests without network.

`FakeGCS(root)` serves the GCS JSON API subset that tensorstore's `gcs`
kvstore driver uses (media download with byte ranges and generation
preconditions, media upload, delete, list) on 127.0.0.1, over the directory
`root` (bucket b, object o = file root/b/o). `install(root, url)` points
both readers of gs:// at it: tensorstore (TENSORSTORE_GCS_HTTP_URL, a fixed
test token) and etils.epath's fsspec backend (a `gcs` fsspec filesystem on
the same directory). Orbax thus writes arrays through its real gs:// code
path (tensorstore's gcs driver, OCDBT) and everything else through epath.

What it does not model: GCS has no directories (this one has, like a local
file system), no eventual consistency, and no authentication.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
import types
import urllib.parse

from fsspec.implementations.local import LocalFileSystem


def _generation(path: str) -> str:
  return str(os.stat(path).st_mtime_ns)


class _Handler(http.server.BaseHTTPRequestHandler):
  root = ""
  protocol_version = "HTTP/1.1"

  def log_message(self, *args):
    pass

  def _send(self, code: int, body: bytes = b"", headers: dict | None = None):
    self.send_response(code)
    for k, v in (headers or {}).items():
      self.send_header(k, v)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    if body and self.command != "HEAD":
      self.wfile.write(body)

  def _json(self, code: int, obj) -> None:
    self._send(code, json.dumps(obj).encode(), {"Content-Type": "application/json"})

  def _parse(self):
    url = urllib.parse.urlsplit(self.path)
    query = dict(urllib.parse.parse_qsl(url.query))
    parts = url.path.split("/")
    return parts, query

  def _object_path(self, bucket: str, name: str) -> str:
    return os.path.join(self.root, bucket, name)

  def _meta(self, bucket: str, name: str, path: str) -> dict:
    return {
      "kind": "storage#object",
      "bucket": bucket,
      "name": name,
      "size": str(os.path.getsize(path)),
      "generation": _generation(path),
      "metageneration": "1",
    }

  def _precondition(self, query: dict, path: str) -> bool:
    gen = _generation(path) if os.path.isfile(path) else "0"
    if "ifGenerationMatch" in query and query["ifGenerationMatch"] != gen:
      return False
    return not ("ifGenerationNotMatch" in query and query["ifGenerationNotMatch"] == gen)

  def do_GET(self):  # noqa: N802
    parts, query = self._parse()
    # /storage/v1/b/<bucket>/o[/<object>]
    if parts[1:4] != ["storage", "v1", "b"] or len(parts) < 6 or parts[5] != "o":
      return self._send(404)
    bucket = parts[4]
    if len(parts) == 6 or (len(parts) == 7 and not parts[6]):
      return self._list(bucket, query)
    name = urllib.parse.unquote("/".join(parts[6:]))
    path = self._object_path(bucket, name)
    if not os.path.isfile(path):
      return self._json(404, {"error": {"code": 404, "message": "No such object"}})
    if "ifGenerationNotMatch" in query and query["ifGenerationNotMatch"] == _generation(path):
      return self._send(304)
    if "ifGenerationMatch" in query and query["ifGenerationMatch"] != _generation(path):
      return self._send(412)
    if query.get("alt") != "media":
      return self._json(200, self._meta(bucket, name, path))
    with open(path, "rb") as f:
      data = f.read()
    headers = {"x-goog-generation": _generation(path)}
    rng = self.headers.get("Range")
    if rng and rng.startswith("bytes="):
      lo, _, hi = rng[6:].partition("-")
      if lo == "":  # suffix
        start, stop = max(0, len(data) - int(hi)), len(data)
      else:
        start, stop = int(lo), (int(hi) + 1 if hi else len(data))
      stop = min(stop, len(data))
      if start > len(data) or (start == len(data) and len(data)):
        return self._send(416, b"", headers)
      headers["Content-Range"] = f"bytes {start}-{max(stop - 1, start)}/{len(data)}"
      return self._send(206, data[start:stop], headers)
    return self._send(200, data, headers)

  def _list(self, bucket: str, query: dict):
    prefix = query.get("prefix", "")
    start, end = query.get("startOffset", ""), query.get("endOffset")
    base = os.path.join(self.root, bucket)
    items = []
    for dirpath, _, files in os.walk(base):
      for f in files:
        path = os.path.join(dirpath, f)
        name = os.path.relpath(path, base).replace(os.sep, "/")
        if name.startswith(prefix) and name >= start and (end is None or name < end):
          items.append(self._meta(bucket, name, path))
    items.sort(key=lambda m: m["name"])
    self._json(200, {"kind": "storage#objects", "items": items})

  def do_POST(self):  # noqa: N802
    parts, query = self._parse()
    # /upload/storage/v1/b/<bucket>/o?uploadType=media&name=<object>
    if parts[1:5] != ["upload", "storage", "v1", "b"] or query.get("uploadType") != "media":
      return self._send(404)
    bucket, name = parts[5], query["name"]
    body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
    path = self._object_path(bucket, name)
    if not self._precondition(query, path):
      return self._send(412)
    old = os.stat(path).st_mtime_ns if os.path.isfile(path) else None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.upload-{threading.get_ident()}"
    with open(tmp, "wb") as f:
      f.write(body)
    os.replace(tmp, path)
    if old is not None and os.stat(path).st_mtime_ns <= old:  # a new generation
      os.utime(path, ns=(old + 1, old + 1))
    self._json(200, self._meta(bucket, name, path))

  def do_DELETE(self):  # noqa: N802
    parts, query = self._parse()
    if parts[1:4] != ["storage", "v1", "b"] or len(parts) < 7:
      return self._send(404)
    path = self._object_path(parts[4], urllib.parse.unquote("/".join(parts[6:])))
    if not os.path.isfile(path):
      return self._send(404)
    if not self._precondition(query, path):
      return self._send(412)
    os.remove(path)
    self._send(204)


class FakeGCS:
  """The server over `root`, on a free port of 127.0.0.1 (`url`)."""

  def __init__(self, root: str):
    handler = type("Handler", (_Handler,), {"root": root})
    self.root = root
    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
    self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
    self._thread.start()

  def close(self) -> None:
    self.server.shutdown()
    self._thread.join()


class LocalGCSFileSystem(LocalFileSystem):
  """fsspec's `gcs` filesystem for epath: gs://bucket/o -> root/bucket/o."""

  protocol = ("gs", "gcs")
  root = ""

  def __init__(self, *args, **kwargs):
    kwargs.pop("finalize_on_close", None)
    super().__init__(*args, **kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        return os.path.join(cls.root, path[len(prefix) :]).rstrip("/") or "/"
    return super()._strip_protocol(path)

  def glob(self, path, **kwargs):
    # Like gcsfs: "bucket/object" names (epath prepends "gs://"), and with
    # detail=True each object's metadata, its generation included.
    found = super().glob(path, **kwargs)
    if isinstance(found, dict):
      return {os.path.relpath(p, self.root): self._gcs_info(i) for p, i in found.items()}
    return [os.path.relpath(p, self.root) for p in found]

  def info(self, path, **kwargs):
    return self._gcs_info(super().info(path, **kwargs))

  @staticmethod
  def _gcs_info(info: dict) -> dict:
    """gcsfs's object metadata has the generation the server gives."""
    if info.get("type") == "file":
      return info | {"generation": _generation(info["name"])}
    return info

  def unstrip_protocol(self, name: str) -> str:
    return "gs://" + os.path.relpath(name, self.root)


def install(monkeypatch, server: FakeGCS) -> None:
  """Routes gs:// (tensorstore and etils.epath) to `server` for one test."""
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top

  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", server.url)
  monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "fake-token")
  fs = type("FakeGCSFileSystem", (LocalGCSFileSystem,), {"root": server.root})()
  real = backend.fsspec_backend._get_filesystem  # pylint: disable=protected-access
  # epath's fsspec backend (cached per protocol): gcs -> this server's directory.
  monkeypatch.setattr(
    backend.fsspec_backend,
    "_get_filesystem",
    lambda name: fs if name in ("gs", "gcs") else real(name),
  )
  # Orbax asks google-cloud-storage whether the bucket has a hierarchical
  # namespace (not installed here): a flat bucket, the default.
  monkeypatch.setattr(
    gcs_utils,
    "get_bucket",
    lambda name: types.SimpleNamespace(hierarchical_namespace_enabled=False),
  )
