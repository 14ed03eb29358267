"""Run directories on local disk or object storage: the one place that turns
a --workdir (or checkpoint path) into a path object.

A run directory may be a local path, a file:// URL (the same local path) or
gs://bucket/prefix. Paths are `etils.epath.Path` objects, the type Orbax
uses, so checkpoints, config.json, metrics.jsonl and summaries all go
through one API; on gs:// epath uses fsspec's gcsfs
and Orbax writes arrays through tensorstore's gcs driver. Object storage
needs, besides this package, `pip install gcsfs google-cloud-storage`
(Orbax asks the bucket whether it has a hierarchical namespace).

s3:// is refused for run directories: Orbax 0.12.8 builds tensorstore's
`file` driver for every path that is not gs://, so arrays "saved" to
s3://... would land in a local directory called s3:. (Token stores on s3://
are fine: they go through tensorstore's own s3 driver, `data.store`.)

Inputs read as bytes (FASTA files for a token store) may be local paths,
file:// or gs:// URLs too: `open_binary`, and `object_filesystem` for
listings with each object's generation.

What cannot write to object storage itself (matplotlib, tensorboardX,
pysam) writes into a local staging directory that `staged` copies to the
URL when it closes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import BinaryIO

from etils import epath
from etils.epath import backend as epath_backend

_RUN_SCHEMES = ("gs",)


def is_url(path: str | os.PathLike) -> bool:
  """Whether `path` is a URL (scheme://..., or file:/...) rather than a local path."""
  path = os.fspath(path)
  return "://" in path or path.lower().startswith("file:/")


def scheme(path: str | os.PathLike) -> str | None:
  """'gs', 's3', 'file', 'http', ... or None for a local path."""
  path = os.fspath(path)
  return path.split(":", 1)[0].lower() if is_url(path) else None


def local_file_path(url: str) -> str:
  """The absolute local path of a file: URL, as a browser reads it:
  file:///a%20b/c -> /a b/c; file://localhost/x and file:/x -> /x.

  Raises:
    ValueError: a file URL naming another host.
  """
  parts = urllib.parse.urlsplit(url)
  if parts.netloc not in ("", "localhost"):
    raise ValueError(
      f"{url}: a file:// URL names a path on this machine (file:///path); "
      f"'{parts.netloc}' is another host."
    )
  return os.path.abspath(urllib.request.url2pathname(parts.path))


def file_url(path: str | os.PathLike) -> str:
  """The file:// URL of a local path, percent-encoded ('#', '%', spaces
  are not URL syntax): the inverse of `local_file_path`."""
  return "file://" + urllib.request.pathname2url(os.path.abspath(path))


def run_path(path: str | os.PathLike, flag: str = "--workdir") -> epath.Path:
  """A run directory (or a file or checkpoint inside one) as an epath.Path:
  local paths and file:// URLs become absolute local paths, gs:// stays.

  Raises:
    ValueError: one line naming `flag` and the fix, for schemes Orbax
      cannot write (s3://, http(s)://, ...).
  """
  if isinstance(path, epath.Path) and not is_url(path):
    return path
  text = os.fspath(path)
  kind = scheme(text)
  if kind is None:
    return epath.Path(os.path.abspath(text))
  if kind == "file":
    return epath.Path(local_file_path(text))
  if kind in _RUN_SCHEMES:
    # epath knows the scheme in lower case only (GS://b fails deep inside).
    return epath.Path(kind + text[len(kind) :].rstrip("/"))
  why = (
    "Orbax 0.12.8 writes arrays to s3:// through its local file driver"
    if kind == "s3"
    else f"{kind}:// is read-only or unknown to Orbax"
  )
  raise ValueError(
    f"{flag}={text}: run directories and checkpoints may be local paths, file:// or gs:// "
    f"URLs ({why}); use one of those."
  )


def checkpoint_path(path: str | os.PathLike, flag: str = "--workdir") -> epath.Path:
  """`run_path` for a directory Orbax writes or reads checkpoints in.

  Raises:
    ValueError: also for a path with '[' or ']': Orbax 0.12.8 finishes a
      save by globbing for its files under the path, reads the brackets as
      a pattern, writes no manifest, and no step there restores.
  """
  text = os.fspath(path)
  if "[" in text or "]" in text:
    raise ValueError(
      f"{flag}={text}: Orbax reads '[' and ']' in a path as a glob pattern, so checkpoints "
      "there could not be restored; choose a path without brackets."
    )
  return run_path(path, flag)


def object_filesystem(url: str):
  """The fsspec file system etils.epath reaches `url` (gs://...) through
  (gcsfs): for listings with object metadata, which epath's stat leaves out.

  Raises:
    ImportError: the scheme's fsspec package (gcsfs) is not installed.
  """
  return epath_backend.fsspec_backend.fs(url)


def open_binary(path: str | os.PathLike) -> BinaryIO:
  """Opens a local path, a file:// URL or an object (gs://...) to read its
  bytes as stored."""
  path = os.fspath(path)
  kind = scheme(path)
  if kind is None:
    return open(path, "rb")  # pylint: disable=consider-using-with
  if kind == "file":
    return open(local_file_path(path), "rb")  # pylint: disable=consider-using-with
  return object_filesystem(path).open(path, "rb")


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` (after `run_path`) lives on object storage."""
  return scheme(path) in _RUN_SCHEMES


def join(path: str | os.PathLike, *parts: str) -> epath.Path:
  return run_path(path).joinpath(*parts)


def read_text(path: str | os.PathLike) -> str:
  return run_path(path).read_text(encoding="utf-8")


def write_text(path: str | os.PathLike, text: str) -> epath.Path:
  """Writes `text` to `path` whole, creating parent directories. Local
  files go through a temporary file and a rename; objects on gs:// appear
  whole or not at all (GCS uploads are atomic)."""
  path = run_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(path):
    path.write_text(text, encoding="utf-8")
    return path
  try:
    with replacing(os.fspath(path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())  # on disk before the rename makes it visible
  except OSError as e:
    if e.filename is None and e.errno is not None:  # a full disk's error names no file
      raise OSError(e.errno, e.strerror, os.fspath(path)) from None
    raise
  return path


def write_json(path: str | os.PathLike, value) -> epath.Path:
  """Writes `value` (nested dicts, lists, numbers, numpy scalars and
  arrays) as strict JSON, whole (`write_text`): non-finite floats become
  null (JSON has no NaN; a metric undefined for a record or a design set)
  and other objects (paths, dtypes) their str()."""
  text = json.dumps(_json_ready(value), indent=2, allow_nan=False, default=str)
  return write_text(path, text + "\n")


def _json_ready(value):
  if isinstance(value, dict):
    return {k: _json_ready(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_ready(v) for v in value]
  if getattr(value, "ndim", None) is not None and hasattr(value, "tolist"):
    return _json_ready(value.tolist())  # a numpy scalar or array
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
  """A temporary local path beside `path` (hidden, its extension kept for
  writers that read it: .<stem>.partial<ext>) that replaces it when the
  block ends without an exception: a kill mid-write leaves the old file (or
  none), never a truncated one."""
  head, name = os.path.split(path)
  stem, ext = os.path.splitext(name)
  tmp = os.path.join(head, f".{stem}.partial{ext}")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def upload(local: str, dest: str | os.PathLike) -> None:
  """Copies the local file or directory tree `local` to `dest`, replacing
  files of the same names."""
  dest = run_path(dest)
  if os.path.isdir(local):
    for dirpath, _, files in os.walk(local):
      rel = os.path.relpath(dirpath, local)
      target = dest if rel == "." else dest / rel
      target.mkdir(parents=True, exist_ok=True)
      for name in files:
        epath.Path(os.path.join(dirpath, name)).copy(target / name, overwrite=True)
  else:
    dest.parent.mkdir(parents=True, exist_ok=True)
    epath.Path(local).copy(dest, overwrite=True)


@contextlib.contextmanager
def staged(dest: str | os.PathLike, *, directory: bool = False) -> Iterator[str]:
  """A local path to write `dest` through, for writers that need a local
  file (matplotlib, tensorboardX, pysam): `dest` itself when it is local
  (its parent created; a file through `replacing`, so a kill mid-write
  leaves no truncated one), else a temporary file or directory that is
  copied to `dest` when the block ends without an exception, then deleted."""
  dest = run_path(dest)
  if not is_remote(dest):
    (dest if directory else dest.parent).mkdir(parents=True, exist_ok=True)
    if directory:
      yield os.fspath(dest)
    else:
      with replacing(os.fspath(dest)) as tmp:
        yield tmp
    return
  tmp = tempfile.mkdtemp(prefix="hybridna-staged-")
  local = tmp if directory else os.path.join(tmp, dest.name)
  try:
    yield local
    upload(local, dest)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
