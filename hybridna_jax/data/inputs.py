"""The FASTA files a token store is prepared from, wherever they lie.

`data.fasta_globs` may name local paths (globs with `**`, `~`), file:// URLs
(the same local files) and gs:// objects (globs too, listed through gcsfs:
`pip install gcsfs`, as for gs:// run directories). `resolve_inputs` expands
them into `InputFile`s, each with what tells a later run whether its content
could have changed:

  local file: size, modification time and inode change time (no tool sets
    the change time back, so a file with all three recorded is unchanged);
  gs:// object: size and generation (GCS gives every write of an object a
    new generation, and never reuses one).

Whatever the kind, `paths.open_binary` reads the file's bytes as stored and
`check_unchanged` refuses a file rewritten since it was listed.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import posixpath
from collections.abc import Sequence

from hybridna_jax import paths
from hybridna_jax.data import fasta
from hybridna_jax.data.config import SOURCE_FROM

_OBJECT_SCHEMES = ("gs",)


@dataclasses.dataclass(frozen=True)
class InputFile:
  """path: an absolute local path or a gs:// URL. The times are 0 and
  generation is "" where they do not apply (objects; local files)."""

  path: str
  source: str | None  # None when every record is its own source.
  size: int
  mtime_ns: int
  ctime_ns: int = 0
  generation: str = ""

  @property
  def is_object(self) -> bool:
    return paths.is_url(self.path)

  def digest_key(self) -> str:
    """Names this content version of the file for `digests`: a local
    file's (size, times, device, inode, path); an object's (size,
    generation, URL)."""
    if self.is_object:
      return f"{self.size}:gs-generation={self.generation}:{self.path}"
    st = os.stat(self.path)
    return f"{self.size}:{self.mtime_ns}:{self.ctime_ns}:{st.st_dev}:{st.st_ino}:{self.path}"


def source_name(path: str, source_from: str) -> str | None:
  """The source a file's records belong to (None: each record is one)."""
  if source_from == "record":
    return None
  if source_from == "dir":
    if paths.is_url(path):
      return posixpath.basename(posixpath.dirname(path))
    return os.path.basename(os.path.dirname(os.path.abspath(path)))
  if source_from == "file":
    return fasta.strip_suffixes(os.path.basename(path))
  raise ValueError(f"data.source_from must be one of {SOURCE_FROM}, got {source_from!r}.")


def _object_filesystem(pattern: str):
  """The fsspec file system behind gs:// (gcsfs), as etils.epath uses it."""
  try:
    return paths.object_filesystem(pattern)
  except ImportError as e:
    raise ValueError(
      f"data.fasta_globs: {pattern!r} is on GCS, which needs gcsfs here ({e}); "
      "pip install gcsfs, or copy the files to a local disk and name them there."
    ) from None


def _match_local(pattern: str) -> list[tuple[str, InputFile]]:
  found = []
  for p in sorted(glob.glob(os.path.expanduser(pattern), recursive=True)):
    if os.path.isfile(p):
      real = os.path.realpath(p)
      st = os.stat(real)
      found.append((p, InputFile(real, None, st.st_size, st.st_mtime_ns, st.st_ctime_ns)))
  return found


def _match_objects(pattern: str) -> list[tuple[str, InputFile]]:
  fs = _object_filesystem(pattern)
  fs.invalidate_cache()  # gcsfs keeps listings: ask GCS
  listed = fs.glob(pattern, detail=True)
  found = []
  for name, info in sorted(listed.items()):
    if info.get("type", "file") != "file":
      continue
    url = "gs://" + name.removeprefix("gs://").lstrip("/")
    generation = str(info.get("generation") or "")
    if not generation:
      raise ValueError(
        f"data.fasta_globs: {url} was listed without a GCS generation, so a later run could "
        "not tell whether it changed; update gcsfs (pip install -U gcsfs)."
      )
    found.append((url, InputFile(url, None, int(info["size"]), 0, 0, generation)))
  return found


def _matches(pattern: str) -> list[tuple[str, InputFile]]:
  """The files `pattern` matches, as (the path as matched, which names its
  source; the file, its path resolved and no source yet)."""
  kind = paths.scheme(pattern)
  if kind is None:
    return _match_local(pattern)
  if kind == "file":
    return _match_local(paths.local_file_path(pattern))
  if kind in _OBJECT_SCHEMES:
    # epath knows the scheme in lower case only.
    return _match_objects(kind + pattern[len(kind) :])
  raise ValueError(
    f"data.fasta_globs: {pattern!r}: FASTA inputs may be local paths, file:// or gs:// "
    "URLs; copy them to a local disk or to GCS first."
  )


def resolve_inputs(globs: Sequence[str], source_from: str) -> list[InputFile]:
  """Expands the globs into files sorted by (source, path).

  Raises:
    ValueError: no globs, a glob that matches no file, a URL scheme other
      than file:// and gs://, or two files that would give one source with
      source_from="file".
  """
  if isinstance(globs, str):
    globs = (globs,)
  if not globs:
    raise ValueError(
      "data.fasta_globs is empty: name the FASTA files to prepare, e.g. ('genomes/*.fa.gz',)."
    )
  matched: dict[str, tuple[str, InputFile]] = {}
  for pattern in globs:
    found = _matches(pattern)
    if not found:
      where = "" if paths.is_url(pattern) else f" (current directory {os.getcwd()})"
      raise ValueError(f"data.fasta_globs: {pattern!r} matches no file{where}.")
    for as_named, f in found:
      matched.setdefault(f.path, (as_named, f))
  files = []
  by_source: dict[str, str] = {}
  for as_named, f in matched.values():
    source = source_name(as_named, source_from)
    if source_from == "file" and source in by_source:
      raise ValueError(
        f"{by_source[source]} and {as_named} both give source {source!r}; rename "
        "one, or set data.source_from='dir' if they are one genome."
      )
    by_source[source] = as_named
    files.append(dataclasses.replace(f, source=source))
  files.sort(key=lambda f: (f.source or "", f.path))
  return files


def _now(f: InputFile) -> InputFile:
  """`f` as it is listed now."""
  if f.is_object:
    fs = _object_filesystem(f.path)
    fs.invalidate_cache(f.path)
    info = fs.info(f.path)
    return dataclasses.replace(f, size=int(info["size"]), generation=str(info.get("generation")))
  st = os.stat(f.path)
  return dataclasses.replace(f, size=st.st_size, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns)


def check_unchanged(f: InputFile) -> None:
  """Raises ValueError when `f` was rewritten since it was listed (while it
  was read): the store would hold a mix of its versions."""
  try:
    unchanged = _now(f) == f
  except FileNotFoundError:
    unchanged = False
  if not unchanged:
    raise ValueError(
      f"{f.path} changed while it was being prepared; prepare the store again once it is "
      "complete (the store was left as it was)."
    )
