"""FASTA files -> a train/val token store, streaming.

`prepare_store(data_cfg)` reads every input file block by block (see
`fasta.py`), routes each whole record to a split (see `SplitRule`) and
appends its tokens to that split's file in the store (see `store.py`).
Memory stays bounded by the block size plus a few bytes per record, so a
3 Gb genome prepares on a small machine. Inputs are grouped by source so
that each source's records are contiguous in each split.

Running it again with the same inputs and split re-uses the existing store.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging

from hybridna_jax.data import digests, fasta, inputs, store_writer
from hybridna_jax.data import store as store_lib
from hybridna_jax.data.config import SplitConfig
from hybridna_jax.data.inputs import InputFile, resolve_inputs

TRAIN, VAL = "train", "val"


def _unit_hash(seed: int, key: str) -> float:
  """A stable uniform number in [0, 1) for `key`."""
  digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") / 2.0**64


class SplitRule:
  """Routes whole records or whole sources to "train" or "val".

  A record is validation when its source matches `val_sources`, its name
  matches `val_records`, or the `val_fraction` hash picks its source
  (split_by="source") or the record itself (split_by="record").
  """

  def __init__(self, split_cfg, sources: Sequence[str] | None):
    """`sources`: all source names, or None when they are record names."""
    split = SplitConfig.from_config(split_cfg)  # typed; a single name reads as a 1-tuple
    self.val_sources, self.val_records = split.val_sources, split.val_records
    self.fraction, self.split_by, self.seed = split.val_fraction, split.split_by, split.seed
    if self.split_by not in ("source", "record"):
      raise ValueError(f"data.split.split_by must be 'source' or 'record', got {self.split_by!r}.")
    if not 0.0 <= self.fraction < 1.0:
      raise ValueError(f"data.split.val_fraction must be in [0, 1), got {self.fraction}.")
    self._matched_sources: set[str] = set()
    self._matched_records: set[str] = set()
    self._fraction_sources: set[str] | None = None
    if sources is not None:
      for pattern in self.val_sources:
        if not fnmatch.filter(sources, pattern):
          raise ValueError(
            f"data.split.val_sources: {pattern!r} matches none of the sources {sorted(sources)}."
          )
      if self.fraction and self.split_by == "source":
        if len(sources) < 2:
          raise ValueError(
            "data.split.val_fraction with split_by='source' needs at least "
            f"two sources, the inputs have {len(sources)}; use "
            "split_by='record' or name data.split.val_records."
          )
        # A source is validation when its own hash is below the fraction, so
        # adding sources never moves an existing one between the splits.
        # Only when that picks none (or all) of a few sources does the rank
        # decide (the lowest hash held out, or the highest kept), and that
        # choice can change as sources are added.
        ranked = sorted(sources, key=lambda s: _unit_hash(self.seed, s))
        picked = {s for s in sources if _unit_hash(self.seed, s) < self.fraction}
        if not picked:
          picked = {ranked[0]}
        elif len(picked) == len(sources):
          picked = set(ranked[:-1])
        self._fraction_sources = picked

  @property
  def active(self) -> bool:
    return bool(self.val_sources or self.val_records or self.fraction)

  def __call__(self, source: str, record: str) -> str:
    val = False
    for pattern in self.val_sources:
      if fnmatch.fnmatchcase(source, pattern):
        self._matched_sources.add(pattern)
        val = True
    for pattern in self.val_records:
      if fnmatch.fnmatchcase(record, pattern):
        self._matched_records.add(pattern)
        val = True
    if self.fraction:
      if self._fraction_sources is not None:
        val |= source in self._fraction_sources
      else:
        key = record if self.split_by == "record" else source
        val |= _unit_hash(self.seed, f"{source}\0{key}") < self.fraction
    return VAL if val else TRAIN

  def check_all_matched(self) -> None:
    """Raises for val_records / val_sources patterns that matched nothing."""
    for kind, patterns, matched in (
      ("val_records", self.val_records, self._matched_records),
      ("val_sources", self.val_sources, self._matched_sources),
    ):
      missing = [p for p in patterns if p not in matched]
      if missing:
        raise ValueError(
          f"data.split.{kind}: {missing} matched no record; "
          "check the names against the FASTA headers."
        )


def fingerprint(files: Sequence[InputFile], sha256s: Sequence[str], data_cfg) -> dict[str, Any]:
  """What a store depends on, recorded in its manifest: each input's name,
  size, times and SHA-256 (read while it was prepared), and the settings
  that route records to splits."""
  inputs = [dataclasses.asdict(f) | {"sha256": d} for f, d in zip(files, sha256s, strict=True)]
  return {"inputs": inputs, **_settings(data_cfg)}


def _settings(data_cfg) -> dict[str, Any]:
  return {
    "source_from": data_cfg.source_from,
    "allow_empty_records": bool(data_cfg.allow_empty_records),
    "split": {
      "val_sources": list(data_cfg.split.val_sources),
      "val_records": list(data_cfg.split.val_records),
      "val_fraction": float(data_cfg.split.val_fraction),
      "split_by": data_cfg.split.split_by,
      "seed": int(data_cfg.split.seed),
    },
  }


def content_digest(f: InputFile) -> str:
  """The SHA-256 of the file's bytes as stored (compressed, if it is), so
  `sha256sum` gives the same; read once per machine (`digests`)."""
  return digests.sha256(f.digest_key(), f.path)


def _name(source: str | None, path: str) -> tuple[str, str]:
  """How an input is matched wherever it lies: (source, file name)."""
  return source or "", os.path.basename(path)


def _some(names: Sequence[str]) -> str:
  n = len(names)
  return f"{n} file{'s' * (n != 1)} ({', '.join(names[:3])}{', ...' if n > 3 else ''})"


def compare_inputs(
  recorded: Sequence[dict[str, Any]], files: Sequence[InputFile]
) -> tuple[list[str], list[str]]:
  """Compares the inputs a store recorded (`fingerprint`) with `files` here.

  Files are matched by source and file name wherever they lie (a moved or
  copied checkout keeps its store). A file is unchanged when its size,
  modification time and inode change time are the recorded ones of a file
  of its name, or else when its content (SHA-256) is: a copy (cp -r,
  gsutil cp, rsync -a, a fresh download), a chmod or a hard link is read
  once on each machine to compare it (`digests`), and so is a file edited
  and given its old modification time back (touch -r), which the change
  time shows. Files of one name in several directories are compared as a
  set. Stores prepared before change times were recorded compare
  modification times alone.

  Returns:
    (differences, unverified): phrases naming the files added, removed or
    changed (empty when the inputs are the same); the files whose size
    matches but whose times differ, in a store whose version recorded no
    digest to compare their content with.
  """
  before: dict[tuple[str, str], list[dict[str, Any]]] = {}
  for entry in recorded:
    before.setdefault(_name(entry.get("source"), entry.get("path", "")), []).append(entry)
  now: dict[tuple[str, str], list[InputFile]] = {}
  for f in files:
    now.setdefault(_name(f.source, f.path), []).append(f)
  if {k: len(v) for k, v in before.items()} != {k: len(v) for k, v in now.items()}:
    stored, named = (
      _some(sorted(name for (_, name), group in by_name.items() for _ in group))
      for by_name in (before, now)
    )
    return [f"fasta_globs: store {stored}, config {named}"], []
  changed, unverified = [], []
  for key, group in sorted(now.items()):
    pending, retimed = list(before[key]), []
    for f in group:  # first the files with their recorded size and times
      same = next((s for s in pending if _same_stat(s, f)), None)
      if same is None:
        retimed.append(f)
      else:
        pending.remove(same)
    if not retimed:
      continue
    # The rest, as multisets: by size, then by content where recorded.
    lost = _count_missing([s.get("size") for s in pending], [f.size for f in retimed])
    if not lost and all("sha256" in s for s in pending):
      lost = _count_missing(
        [(s["size"], s["sha256"]) for s in pending],
        [(f.size, content_digest(f)) for f in retimed],
      )
    elif not lost:
      unverified += [key[1]] * len(retimed)
    changed += [key[1]] * lost
  digests.save()
  if changed:
    return [f"fasta_globs: {_some(changed)} changed since the store was prepared"], []
  return [], unverified


def _same_stat(saved: dict[str, Any], f: InputFile) -> bool:
  """Whether `f` has the recorded size, times and generation (the change
  time only where recorded)."""
  return (
    saved.get("size") == f.size
    and saved.get("mtime_ns") == f.mtime_ns
    and saved.get("ctime_ns", f.ctime_ns) == f.ctime_ns
    and saved.get("generation", "") == f.generation
  )


def _count_missing(recorded: list, now: list) -> int:
  """How many of `recorded` have no counterpart in `now` (multisets)."""
  left = collections.Counter(recorded)
  left.subtract(collections.Counter(now))
  return sum(n for n in left.values() if n > 0)


def store_differences(
  saved: dict[str, Any], files: Sequence[InputFile] | None, data_cfg
) -> tuple[list[str], list[str]]:
  """`compare_inputs` of a store's saved fingerprint (files None: the inputs
  are not compared), followed by 'field: store X, config Y' for each
  setting that differs from `data_cfg`'s."""

  def flat(settings):
    out = {k: v for k, v in settings.items() if k not in ("inputs", "split")}
    return out | {f"split.{k}": v for k, v in settings.get("split", {}).items()}

  differences, unverified = [], []
  if files is not None:
    differences, unverified = compare_inputs(saved.get("inputs", []), files)
  old, new = flat(saved), flat(_settings(data_cfg))
  differences += [
    f"{k}: store {old.get(k)!r}, config {v!r}" for k, v in new.items() if old.get(k) != v
  ]
  return differences, unverified


def check_store_matches(data_cfg) -> None:
  """Refuses a store prepared from other inputs or another split than
  `data_cfg` names, so that a run trains and validates on the data its
  config.json records. Nothing is checked when data.fasta_globs is empty
  (the store is used as it is); the input files are compared
  (`compare_inputs`) only when the globs match files here (a store
  prepared on another machine is not).

  Raises:
    store.StoreError: naming the fields that differ and the fix.
  """
  if not data_cfg.fasta_globs:
    return
  try:
    saved = store_lib.read_manifest(data_cfg.store_dir).get("metadata", {}).get("fingerprint")
  except (OSError, ValueError):
    return  # opening the store reports it
  if not isinstance(saved, dict):
    return  # written by an export or an earlier version: nothing recorded
  try:
    files = resolve_inputs(data_cfg.fasta_globs, data_cfg.source_from)
  except ValueError:
    files = None
  differences, unverified = store_differences(saved, files, data_cfg)
  if differences:
    raise store_lib.StoreError(
      f"{data_cfg.store_dir} was prepared from other data than this config names "
      f"({'; '.join(differences)}); prepare it again (launch/prepare_data.py with this config, "
      "and data.overwrite_store=True), set these data fields to the store's, or empty "
      "data.fasta_globs to train on the store as it is."
    )
  if unverified:
    logging.warning(
      "%s: input %s: the same size as when the store was prepared, another modification "
      "time (copied?), and no digest to compare contents with (the store is an earlier "
      "version's); training on the store as prepared. Prepare it again "
      "(data.overwrite_store=True) if their contents changed.",
      data_cfg.store_dir,
      _some(unverified),
    )


class _Progress:
  """Logs bytes, records and throughput every `every` seconds."""

  def __init__(self, files: Sequence[InputFile], every: float, log: Callable[..., None]):
    self.total = sum(f.size for f in files)
    self.num_files = len(files)
    self.every = every
    self.log = log
    self.start = self.last = time.monotonic()
    self.done_bytes = 0

  def update(
    self,
    file_index: int,
    reader: fasta.FastaReader | None,
    writer: store_writer.TokenStoreWriter,
    force: bool = False,
  ):
    """Logs if `every` seconds passed (or `force`); reader None: all done."""
    now = time.monotonic()
    if not force and now - self.last < self.every:
      return
    self.last = now
    elapsed = max(now - self.start, 1e-9)
    done = self.done_bytes + (reader.bytes_in if reader else 0)
    rate = (writer.num_tokens / 1e6) / elapsed
    eta = (self.total - done) / max(done / elapsed, 1e-9)
    where = (
      f"file {file_index + 1}/{self.num_files} {os.path.basename(reader.path)}"
      if reader
      else "done"
    )
    self.log(
      "%s: %.1f/%.1f MB of input (%.0f%%), %d records, %.1f M tokens, "
      "%.1f Mb/s, %.0fs elapsed, ETA %.0fs",
      where,
      done / 1e6,
      self.total / 1e6,
      100.0 * done / max(self.total, 1),
      writer.num_records,
      writer.num_tokens / 1e6,
      rate,
      elapsed,
      eta,
    )


def prepare_store(data_cfg, *, log: Callable[..., None] = logging.info) -> store_lib.TokenStore:
  """Prepares `data_cfg.store_dir` from `data_cfg.fasta_globs`.

  Returns the opened store. If a complete store prepared from the same
  inputs and split already exists there, it is returned unchanged, unless
  its files no longer match its manifest (`store.verify`: it is rebuilt) or
  data.overwrite_store is set (it is rebuilt).

  Raises:
    fasta.FastaFormatError: bad input (names the file and line).
    ValueError / store.StoreError: bad configuration or an existing store
      prepared from other inputs (without data.overwrite_store).
  """
  if not data_cfg.store_dir:
    raise ValueError("data.store_dir is empty: name the output directory.")
  files = resolve_inputs(data_cfg.fasta_globs, data_cfg.source_from)
  overwrite = bool(data_cfg.overwrite_store)
  if store_lib.is_complete(data_cfg.store_dir):
    try:
      existing = store_lib.read_manifest(data_cfg.store_dir)
    except (OSError, ValueError) as e:
      existing = {"damage": str(e)}
    saved = existing.get("metadata", {}).get("fingerprint")
    if isinstance(saved, dict):
      differences, unverified = store_differences(saved, files, data_cfg)
    else:
      differences, unverified = ["it records no inputs"], []
    if unverified:
      differences += [
        f"{_some(unverified)}: the same size, another modification time, and no digest "
        "to compare contents with (recorded since; the store is an earlier version's)"
      ]
    ours = not differences
    damage = existing.get("damage") or (store_lib.verify(data_cfg.store_dir) if ours else None)
    if ours and not damage and not overwrite:
      log(
        "Token store %s is up to date with its %d input files; re-using it.",
        data_cfg.store_dir,
        len(files),
      )
      return store_lib.TokenStore.open(data_cfg.store_dir)
    if damage and (ours or "damage" in existing):
      # Our own store (or an unreadable manifest), damaged after it was
      # written: rebuild it from the same inputs.
      log("Token store %s is damaged (%s); preparing it again.", data_cfg.store_dir, damage)
      overwrite = True
    elif ours:
      log("Token store %s: data.overwrite_store=True, preparing it again.", data_cfg.store_dir)
    elif not overwrite:
      raise store_lib.StoreError(
        f"{data_cfg.store_dir} holds a store prepared from other inputs or another split "
        f"({'; '.join(differences)}); delete it, choose another data.store_dir, or set "
        "data.overwrite_store=True."
      )
  sources = None if data_cfg.source_from == "record" else sorted({f.source for f in files})
  rule = SplitRule(data_cfg.split, sources)
  log(
    "Preparing %s from %d files (%.1f MB) with %s sources.",
    data_cfg.store_dir,
    len(files),
    sum(f.size for f in files) / 1e6,
    len(sources) if sources is not None else "per-record",
  )
  progress = _Progress(files, float(data_cfg.progress_seconds), log)
  seen: dict[tuple[str, str], tuple[str, int]] = {}
  sha256s = []  # of the bytes parsed, from the same read
  with store_writer.open_writer(data_cfg.store_dir, overwrite=overwrite) as writer:
    for i, f in enumerate(files):
      reader = fasta.FastaReader(
        f.path,
        block_size=int(data_cfg.prepare_block_bytes),
        allow_empty_records=bool(data_cfg.allow_empty_records),
        digest=True,
      )
      for item in reader:
        if isinstance(item, fasta.FastaHeader):
          source = f.source if f.source is not None else item.name
          key = (source, item.name)
          if key in seen:
            first_path, first_line = seen[key]
            raise fasta.FastaFormatError(
              f.path,
              item.line,
              f"duplicate record name {item.name!r} in source {source!r} "
              f"(first at {first_path} line {first_line}); names must be "
              "unique within a source: rename or remove one of them.",
            )
          seen[key] = (f.path, item.line)
          writer.begin_record(rule(source, item.name), item.name, source)
        else:
          writer.append(item)
          progress.update(i, reader, writer)
      progress.done_bytes += f.size
      inputs.check_unchanged(f)
      sha256s.append(reader.sha256)
      digests.remember(f.digest_key(), reader.sha256)
    digests.save()
    rule.check_all_matched()
    counts = writer.split_counts()
    if TRAIN not in counts:
      raise ValueError("every record went to validation; hold out less (data.split).")
    if rule.active and VAL not in counts:
      raise ValueError(
        "the validation split is empty although data.split asks for one "
        "(val_fraction too small for the number of records or sources?); "
        "name data.split.val_sources or val_records instead."
      )
    progress.update(len(files) - 1, None, writer, force=True)
    result = writer.commit(metadata={"fingerprint": fingerprint(files, sha256s, data_cfg)})
  for split in result.splits:
    s = result[split]
    per_source = s.info["per_source"]
    log(
      "  %s: %d records, %d tokens, %d sources: %s",
      split,
      s.num_records,
      s.num_tokens,
      len(per_source),
      ", ".join(f"{k} ({v['tokens'] / 1e6:.2f} Mb)" for k, v in list(per_source.items())[:20])
      + (" ..." if len(per_source) > 20 else ""),
    )
  return result
