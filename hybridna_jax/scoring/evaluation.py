"""Language-model evaluation of a trained model: bits per nucleotide,
perplexity and next-base accuracy, per record and overall, on FASTA files or
on a split of the token store (launch/eval.py).

Scoring goes through `hybridna_jax.scoring.Scorer`: records longer than the
context are covered by sliding windows, every position scored once with at
least context - stride tokens before it (see that module). Scored positions
are A/C/G/T targets with at least one token of context, as in the training
loss; N is left out. Metrics are token-weighted:

    bits_per_nt = sum(-log p) / count / ln 2
    perplexity  = exp(sum(-log p) / count)
    accuracy    = (argmax prediction == next base) / count
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
from absl import logging

from hybridna_jax import paths as hybridna_paths
from hybridna_jax import plotting
from hybridna_jax.data import fasta
from hybridna_jax.data import store as store_lib
from hybridna_jax.scoring import scorer as scorer_lib

LN2 = math.log(2.0)


class NamedSequence(NamedTuple):
  """A sequence to evaluate: its name, where it came from, and its tokens."""

  name: str
  source: str
  tokens: np.ndarray


def fasta_sequences(
  paths: Sequence[str],
  max_records: int = 0,
  max_tokens: int = 0,
  *,
  allow_empty_records: bool = False,
) -> list[NamedSequence]:
  """Records of FASTA files (plain or compressed), optionally only the first
  `max_records` and the first `max_tokens` tokens of each; records with no
  sequence are refused, or skipped with a warning (`allow_empty_records`,
  config data.allow_empty_records). Files are streamed: reading stops after
  the `max_records`-th record, and only `max_tokens` of a record are held."""
  out = []
  for path in paths:
    if not os.path.exists(path):
      raise FileNotFoundError(f"FASTA file {path} not found.")
    records = fasta.iter_records(
      path, max_tokens=max_tokens, allow_empty_records=allow_empty_records
    )
    for header, tokens in records:
      out.append(NamedSequence(header.name, os.path.basename(path), tokens))
      if max_records and len(out) >= max_records:
        return out
  if not out:
    raise ValueError(f"no FASTA records in {', '.join(paths)}.")
  return out


def warn_repeated_names(names: Sequence[str]) -> list[str]:
  """Logs one warning naming the record names that occur more than once
  (outputs keep every record in input order, but a lookup by name cannot
  tell them apart); returns them."""
  repeated = sorted(n for n, c in collections.Counter(names).items() if c > 1)
  if repeated:
    logging.warning(
      "%d record name(s) repeat (%s): the outputs keep every record in input order, but a "
      "bedGraph or a lookup by name cannot tell them apart.",
      len(repeated),
      ", ".join(repeated[:5]) + (", ..." if len(repeated) > 5 else ""),
    )
  return repeated


def store_sequences(
  store_dir: str, split: str = "val", max_records: int = 0, max_tokens: int = 0
) -> list[NamedSequence]:
  """Records of a token-store split, memory-mapped (not read until scored)."""
  store = store_lib.TokenStore.open(store_dir)
  if split not in store:
    raise ValueError(
      f"the token store {store_dir} has no split {split!r} (it has "
      f"{', '.join(store.splits)}); set score.eval_split."
    )
  records = list(store[split])
  if max_records:
    records = records[:max_records]
  if not records:
    raise ValueError(f"split {split!r} of {store_dir} has no records.")
  return [
    NamedSequence(r.name, r.source, r.tokens[:max_tokens] if max_tokens else r.tokens)
    for r in records
  ]


def unscorable(
  names: Sequence[str],
  sequences: Sequence[np.ndarray],
  *,
  add_bos: bool = False,
  rc_average: bool = False,
) -> list[str]:
  """'name (why)' for each record (token ids, (len,)) that has no scored
  position, so its log-likelihood and bits/nt are nan: a record with
  nothing to predict (one nucleotide, or none with `add_bos`, where <bos>
  gives the first one its context) or whose scored positions are all N
  (N is not scored). With `rc_average` the reverse strand counts too: its
  first base (not scored without <bos>) is the record's last."""
  from hybridna_jax import tokenizer  # pylint: disable=g-import-not-at-top

  first = 0 if add_bos else 1  # the first scored position
  out = []
  for name, tokens in zip(names, sequences):
    tokens = np.asarray(tokens)
    scored = [tokens[first:]] + ([tokens[: tokens.size - first]] if rc_average else [])
    if tokens.size <= first:
      out.append(f"{name} ({tokens.size} nt: nothing to predict)")
    elif not any(np.any(t != tokenizer.N) for t in scored):
      out.append(f"{name} (all N)")
  return out


def warn_unscorable(
  names: Sequence[str],
  sequences: Sequence[np.ndarray],
  *,
  add_bos: bool = False,
  rc_average: bool = False,
) -> list[str]:
  """Logs one warning naming the `unscorable` records (their scores are
  nan); returns them."""
  bad = unscorable(names, sequences, add_bos=add_bos, rc_average=rc_average)
  if bad:
    shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
    logging.warning("%d record(s) cannot be scored and get nan: %s.", len(bad), shown)
  return bad


def metrics(nll: float, correct: float, count: float) -> dict:
  """bits/nt, perplexity, accuracy and loss (nats) from summed stats."""
  if count <= 0:
    return {
      "loss": math.nan,
      "bits_per_nt": math.nan,
      "perplexity": math.nan,
      "accuracy": math.nan,
      "tokens": 0,
    }
  loss = nll / count
  return {
    "loss": loss,
    "bits_per_nt": loss / LN2,
    "perplexity": math.exp(loss),
    "accuracy": correct / count,
    "tokens": int(count),
  }


def evaluate(
  scorer: scorer_lib.Scorer,
  sequences: Sequence[NamedSequence],
  *,
  progress: scorer_lib.Progress | None = None,
) -> dict:
  """Scores `sequences`; returns {"records": [...], "overall": {...}, ...}."""
  warn_unscorable(
    [s.name for s in sequences], [s.tokens for s in sequences], add_bos=scorer.settings.add_bos
  )
  start = time.perf_counter()
  stats = scorer.token_stats([s.tokens for s in sequences], progress=progress)
  seconds = time.perf_counter() - start
  records = []
  for s, nll, correct, count in zip(sequences, stats.nll, stats.correct, stats.count):
    records.append(
      {
        "name": s.name,
        "source": s.source,
        "length": int(len(s.tokens)),
        **metrics(float(nll), float(correct), float(count)),
      }
    )
  overall = metrics(float(stats.nll.sum()), float(stats.correct.sum()), float(stats.count.sum()))
  overall["records"] = len(records)
  total_length = sum(r["length"] for r in records)
  return {
    "context": scorer.context,
    "stride": scorer.stride,
    "min_context": scorer.context - scorer.stride,
    "records": records,
    "overall": overall,
    "seconds": seconds,
    "nucleotides_per_second": total_length / seconds if seconds > 0 else math.nan,
  }


def format_table(result: dict) -> str:
  """A fixed-width table: one row per record, then the overall row."""
  rows = [
    (
      r["name"],
      r["source"],
      f"{r['length']:,}",
      f"{r['tokens']:,}",
      _fmt(r["bits_per_nt"]),
      _fmt(r["perplexity"]),
      _fmt(r["accuracy"]),
    )
    for r in result["records"]
  ]
  o = result["overall"]
  total = sum(r["length"] for r in result["records"])
  rows.append(
    (
      "overall",
      f"{o['records']} records",
      f"{total:,}",
      f"{o['tokens']:,}",
      _fmt(o["bits_per_nt"]),
      _fmt(o["perplexity"]),
      _fmt(o["accuracy"]),
    )
  )
  header = ("record", "source", "length", "scored", "bits/nt", "perplexity", "accuracy")
  widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
  line = lambda cells: "  ".join(
    c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
  )
  rule = "-" * len(line(header))
  title = (
    f"context {result['context']:,}, stride {result['stride']:,} (every position "
    f"scored once, >= {result['min_context']:,} nt of context after the first window)"
  )
  return "\n".join([title, line(header), rule, *(line(r) for r in rows[:-1]), rule, line(rows[-1])])


def _fmt(x: float) -> str:
  return "nan" if x != x else f"{x:.4f}"


def plot(result: dict, path: str) -> str:
  """Bar chart of bits/nt per record with the overall value as a line."""
  plt = plotting.pyplot()
  records = result["records"]
  fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(records) + 2), 4))
  ax.bar(range(len(records)), [r["bits_per_nt"] for r in records], color="tab:blue")
  ax.axhline(
    result["overall"]["bits_per_nt"],
    color="tab:red",
    lw=1,
    label=f"overall {result['overall']['bits_per_nt']:.4f}",
  )
  ax.axhline(2.0, color="gray", lw=0.8, ls="--", label="uniform (2 bits)")
  ax.set_xticks(range(len(records)))
  ax.set_xticklabels([r["name"] for r in records], rotation=60, ha="right", fontsize=7)
  ax.set_ylabel("bits per nucleotide")
  ax.set_title(f"context {result['context']:,}, stride {result['stride']:,}")
  ax.legend(fontsize=8)
  return plotting.save(fig, path, dpi=120)


def store_identity(store_dir: str) -> str:
  """What names a token store in an evaluation's file name and JSON: its
  absolute path (a file:// URL as the local path it names), or its URL."""
  if hybridna_paths.scheme(store_dir) == "file":
    store_dir = hybridna_paths.local_file_path(store_dir)
  if hybridna_paths.is_url(store_dir):
    return store_dir.rstrip("/")
  return os.path.abspath(store_dir)


def output_stem(
  data: str | Sequence[str],
  context: int,
  stride: int,
  which: str = "latest",
  *,
  store: str | None = None,
  step: int | None = None,
  add_bos: bool = False,
  dtype: str = "float32",
  param_dtype: str = "float32",
  max_records: int = 0,
  max_tokens: int = 0,
) -> str:
  """The file stem of an evaluation, distinct for each data set, window,
  checkpoint step, compute and weight dtype and subset (`write` refuses to
  replace the evaluation of another checkpoint or store):
  eval_<data>_ctx<C>_stride<S>[_step<N>][_best][_bos][_<dtype>][_<param_dtype>weights]
  [_max<R>rec][_max<T>tok],
  where <data> is a split name, "<split>-<hash>" with the hash of the token
  `store` it is of (`store_identity`: the val splits of two stores are two
  data sets), or for FASTA files "<stem of one>-<hash>" or "<n>fasta-<hash>",
  the hash of their absolute paths (two genome.fa of other folders are two
  data sets)."""
  from hybridna_jax.data import fasta as fasta_lib  # pylint: disable=g-import-not-at-top

  if isinstance(data, str):
    name = data
    if store is not None:
      name += "-" + hashlib.sha1(store_identity(store).encode()).hexdigest()[:8]
  else:
    joined = "\0".join(sorted(os.path.abspath(p) for p in data)).encode()
    digest = hashlib.sha1(joined).hexdigest()[:8]
    if len(data) == 1:
      name = f"{fasta_lib.strip_suffixes(os.path.basename(data[0]))}-{digest}"
    else:
      name = f"{len(data)}fasta-{digest}"
  parts = [f"eval_{name}_ctx{context}_stride{stride}"]
  parts += [f"step{step}"] if step is not None else []
  parts += [which] if which != "latest" else []
  parts += ["bos"] if add_bos else []
  parts += [dtype] if dtype != "float32" else []
  parts += [f"{param_dtype}weights"] if param_dtype != "float32" else []
  parts += [f"max{max_records}rec"] if max_records else []
  parts += [f"max{max_tokens}tok"] if max_tokens else []
  return "_".join(parts)


def output_files(output_dir: str, stem: str) -> dict[str, str]:
  """{"json": <output_dir>/<stem>.json, "txt": ..., "png": ...}."""
  return {ext: os.path.join(output_dir, f"{stem}.{ext}") for ext in ("json", "txt", "png")}


def refuse_to_replace(
  output_dir: str, stem: str, *, checkpoint: str | None, store: str | None = None
) -> None:
  """Refuses an evaluation of `checkpoint` (its step directory) on `store`
  (None for FASTA files) whose <stem>.json already holds the evaluation of
  another checkpoint or store; an evaluation of the same is replaced. Called
  by `write`, and by launch/eval.py before it evaluates, so that a refusal
  costs no scoring.

  Raises:
    ValueError: <stem>.json holds the evaluation of another checkpoint
      (of another run, or another of the same run) or of another store.
  """
  path = output_files(output_dir, stem)["json"]
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    before = json.load(f)
  ran, now = before.get("checkpoint"), checkpoint
  # A relative and an absolute path of one step directory are the same.
  same = lambda a, b: (
    a == b or (not hybridna_paths.is_url(a) and os.path.abspath(a) == os.path.abspath(b))
  )
  if ran is not None and now is not None and not same(ran, now):
    # <run>/<checkpoints or best>/<step>: the run is two levels up.
    run_of = lambda c: os.path.dirname(os.path.dirname(c.rstrip("/")))
    whose = "the same run" if run_of(ran) == run_of(now) else "another run"
    raise ValueError(
      f"{path} holds the evaluation of another checkpoint of {whose}, {ran}, not of {now}; "
      "pass another --output_dir."
    )
  ran, now = before.get("store"), store
  if ran is not None and now is not None and ran != now:
    raise ValueError(
      f"{path} holds the evaluation of the token store {ran}, not of {now}; "
      "pass another --output_dir."
    )


def write(result: dict, output_dir: str, stem: str) -> dict[str, str]:
  """Writes <stem>.json (strict JSON: an unscorable record's NaN is null),
  <stem>.txt (the table) and <stem>.png, each whole.

  Raises:
    ValueError: <stem>.json holds the evaluation of another checkpoint or
      token store (`refuse_to_replace`; result["checkpoint"] and
      result["store"] are compared).
  """
  os.makedirs(output_dir, exist_ok=True)
  files = output_files(output_dir, stem)
  refuse_to_replace(
    output_dir, stem, checkpoint=result.get("checkpoint"), store=result.get("store")
  )
  hybridna_paths.write_json(files["json"], result)
  hybridna_paths.write_text(files["txt"], format_table(result) + "\n")
  plot(result, files["png"])
  return files


def log_records(sequences: Iterable[NamedSequence]) -> None:
  """Logs how much is evaluated, and warns about repeated record names."""
  seqs = list(sequences)
  warn_repeated_names([s.name for s in seqs])
  total = sum(len(s.tokens) for s in seqs)
  logging.info("evaluating %d records, %s nucleotides", len(seqs), f"{total:,}")
