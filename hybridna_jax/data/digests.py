"""SHA-256 digests of input files, remembered per machine.

A token store records the digest of each FASTA file it was prepared from
(`prepare.fingerprint`), and a file whose times differ from the recorded
ones is compared by content (`prepare.compare_inputs`). Reading a genome
corpus at every training start would cost minutes per host, so digests are
kept in a JSON file keyed by (path, size, modification time, inode change
time): no rewrite of the file keeps all four, so a remembered digest is the
file's. The file is $HYBRIDNA_DIGEST_CACHE, by default
$XDG_CACHE_HOME/hybridna_jax/input_sha256.json (~/.cache/...); an empty
$HYBRIDNA_DIGEST_CACHE keeps digests for the process only. A cache that
cannot be read or written is ignored (the digests are computed).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

from absl import logging

CACHE_ENV = "HYBRIDNA_DIGEST_CACHE"
_KEEP = 100_000  # entries kept in the file, the newest (about 150 bytes each)

_known: dict[str, str] = {}  # this process's digests, by `_key`
_loaded: set[str] = set()  # cache files read into _known
_unsaved: dict[str, str] = {}


def cache_path() -> str | None:
  """The cache file (None: the process only)."""
  path = os.environ.get(CACHE_ENV)
  if path is None:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "hybridna_jax", "input_sha256.json")
  return path or None


def _key(path: str, size: int, mtime_ns: int, ctime_ns: int) -> str:
  return f"{size}:{mtime_ns}:{ctime_ns}:{path}"


def _read(cache: str) -> dict[str, str]:
  try:
    with open(cache, encoding="utf-8") as f:
      entries = json.load(f)
    return entries if isinstance(entries, dict) else {}
  except (OSError, ValueError):
    return {}


def sha256(path: str, size: int, mtime_ns: int, ctime_ns: int) -> str:
  """The hex SHA-256 of the file's bytes (as `sha256sum` gives it), from
  the cache when its (size, mtime_ns, ctime_ns) were seen before. Call
  `save` after a batch of calls to keep the new ones."""
  cache = cache_path()
  if cache is not None and cache not in _loaded:
    _known.update(_read(cache))
    _loaded.add(cache)
  key = _key(path, size, mtime_ns, ctime_ns)
  if key not in _known:
    with open(path, "rb") as f:
      _known[key] = _unsaved[key] = hashlib.file_digest(f, "sha256").hexdigest()
  return _known[key]


def save() -> None:
  """Adds the digests computed since the last call to the cache file
  (merged with what other processes wrote; replaced whole, atomically)."""
  cache = cache_path()
  if cache is None or not _unsaved:
    _unsaved.clear()
    return
  entries = _read(cache) | _unsaved
  entries = dict(list(entries.items())[-_KEEP:])
  tmp = None
  try:
    os.makedirs(os.path.dirname(cache) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".input_sha256.", dir=os.path.dirname(cache) or ".")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(entries, f)
    os.replace(tmp, cache)
  except OSError as e:
    logging.warning("could not keep input digests in %s (%s); they are computed again.", cache, e)
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)
  _unsaved.clear()
