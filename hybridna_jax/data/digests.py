"""SHA-256 digests of input files, remembered per machine.

A token store records the digest of each FASTA file it was prepared from
(`prepare.fingerprint`), and a file whose times differ from the recorded
ones is compared by content (`prepare.compare_inputs`). Reading a genome
corpus at every training start would cost minutes per host, so digests are
kept in a JSON file keyed by (path, device, inode, size, modification time,
inode change time), or for a gs:// object (URL, size, generation): where the
file system keeps a real change time, no rewrite keeps them all, so a
remembered digest is the file's. Where it does not (squashfs images, some
FUSE mounts report the modification time), an edit whose modification time
was put back goes unseen, as it does by times alone; set
$HYBRIDNA_DIGEST_CACHE to "" there. The cache is $HYBRIDNA_DIGEST_CACHE, by
default $XDG_CACHE_HOME/hybridna_jax/input_sha256.json (~/.cache/...); an
empty value keeps digests for the process only. A cache that cannot be read
or written is ignored (the digests are computed). Processes that save at
once take turns (a lock file beside the cache), so none drops another's
entries.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import stat
import tempfile

from absl import logging

from hybridna_jax import paths

CACHE_ENV = "HYBRIDNA_DIGEST_CACHE"
_KEEP = 100_000  # entries kept in the file, the newest (about 150 bytes each)

_known: dict[str, str] = {}  # this process's digests, by `_key`
_loaded: set[str] = set()  # cache files read into _known
_unsaved: dict[str, str] = {}


def cache_path() -> str | None:
  """The cache file (None: the process only)."""
  path = os.environ.get(CACHE_ENV)
  if path is None:
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
      home = os.path.expanduser("~")
      if home == "~":
        return None  # no home directory: not a folder named "~" here
      base = os.path.join(home, ".cache")
    path = os.path.join(base, "hybridna_jax", "input_sha256.json")
  return path or None


_DIGEST = re.compile(r"[0-9a-f]{64}")


def _read(cache: str) -> dict[str, str]:
  """The cache's well-formed entries ({} when absent, unreadable or not a
  regular file: a FIFO would block)."""
  try:
    if not stat.S_ISREG(os.stat(cache).st_mode):
      return {}
    with open(cache, encoding="utf-8") as f:
      entries = json.load(f)
  except (OSError, ValueError):
    return {}
  if not isinstance(entries, dict):
    return {}
  return {k: v for k, v in entries.items() if isinstance(v, str) and _DIGEST.fullmatch(v)}


def sha256(key: str, path: str) -> str:
  """The hex SHA-256 of the bytes of `path` (a local path or gs:// URL; as
  `sha256sum` gives it), from the cache when `key` (`InputFile.digest_key`,
  which changes with the content) was seen before. Call `save` after a
  batch of calls to keep the new ones."""
  _load()
  if key not in _known:
    with paths.open_binary(path) as f:
      _known[key] = _unsaved[key] = hashlib.file_digest(f, "sha256").hexdigest()
  return _known[key]


def remember(key: str, digest: str) -> None:
  """Keeps a digest computed elsewhere (while the file was parsed) for
  `sha256`; `save` writes it."""
  _load()
  _known[key] = _unsaved[key] = digest


def _load() -> None:
  cache = cache_path()
  if cache is not None and cache not in _loaded:
    _known.update(_read(cache))
    _loaded.add(cache)


def save() -> None:
  """Adds the digests computed since the last call to the cache file
  (merged with what other processes wrote; replaced whole, atomically)."""
  cache = cache_path()
  if cache is None or not _unsaved:
    _unsaved.clear()
    return
  folder = os.path.dirname(cache) or "."
  tmp = None
  try:
    os.makedirs(folder, exist_ok=True)
    # Read, merge and replace under the lock: another process's entries,
    # saved between our read and our rename, would be lost otherwise.
    with open(cache + ".lock", "a") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      entries = _read(cache) | _unsaved
      entries = dict(list(entries.items())[-_KEEP:])
      fd, tmp = tempfile.mkstemp(prefix=".input_sha256.", dir=folder)
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(entries, f)
      os.replace(tmp, cache)
  except OSError as e:
    logging.warning("could not keep input digests in %s (%s); they are computed again.", cache, e)
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)
  _unsaved.clear()
