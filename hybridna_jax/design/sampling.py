"""Designing a set of sequences from a trained model: prompts -> batched
generation -> FASTA with the prompt and settings in every header -> a
summary against the training sequences (JSON, table, plot).

    sets = design_sets(model, vocab, [{"label": "HepG2"}, {"label": "K562"}],
                       settings, num_samples=100, batch_size=50, seed=0)
    write_fasta(sets, "designs.fasta", settings=settings, seed=0)
    summary = summarize_sets(sets, training_rows, vocab)

This is what `launch/generate.py --mode=sample` runs (`run_sampling`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging

from hybridna_jax import generate as gen
from hybridna_jax import paths
from hybridna_jax import tokenizer as tok
from hybridna_jax.config import GenerateConfig
from hybridna_jax.data import fasta
from hybridna_jax.data import sampling as data_sampling
from hybridna_jax.design import data as design_data
from hybridna_jax.design import metrics, oracle, prompts


@dataclasses.dataclass
class DesignedSet:
  """The designs of one prompt. sequences include the DNA prefix."""

  name: str  # vocab.describe(labels), or "unconditional"
  labels: dict[str, str] | None
  prefix: str
  prompt: np.ndarray  # the prompt tokens
  sequences: list[str]
  log_probs: np.ndarray  # (n,) of the generated part, <eos> included
  ended: np.ndarray  # (n,) bool: ended with <eos>
  lengths: np.ndarray  # (n,) nucleotides generated (not the prefix, not the <eos>)

  @property
  def scored_tokens(self) -> np.ndarray:
    """(n,) tokens each log_prob sums over: the generated nucleotides and
    the <eos> where there is one."""
    return self.lengths + self.ended.astype(self.lengths.dtype)


def _slug(text: str) -> str:
  return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in text).strip("_")


def design_sets(
  model,
  vocab: prompts.PromptVocab | None,
  label_sets: Sequence[dict[str, str] | None],
  settings: GenerateConfig,
  *,
  num_samples: int,
  batch_size: int,
  seed: int,
  prefix: str = "",
  mesh=None,
) -> list[DesignedSet]:
  """Generates `num_samples` designs per label set (beam search: the
  beam_width best, at most num_samples) in batches mixing prompts.

  Without a vocabulary (a pretrained LM, not a design run) the prompt is
  the DNA prefix alone. Designs start with the prefix as the model reads
  it (`tokenizer.encode`: "acgu" is written ACGT). Each sample's random
  stream is keyed by (seed, prompt, sample index), so the designs do not
  depend on batch_size or on which other prompts are generated alongside.
  """
  for name, count in (("num_samples", num_samples), ("batch_size", batch_size)):
    if count < 1:
      raise ValueError(f"design_sets: {name} must be >= 1, got {count}.")
  # The prefix as the model reads it (upper case, U as T, IUPAC codes as N),
  # so that the designs, their headers and metrics hold the modelled bases.
  prefix = tok.decode(tok.encode(prefix)) if prefix else ""
  if vocab is None:
    if any(labels is not None for labels in label_sets):
      raise ValueError(
        "this checkpoint has no prompt vocabulary (it is not a design run), "
        "so it cannot take labels; give only a DNA prefix."
      )
    if not prefix:
      raise ValueError("a model without label tokens needs a DNA prefix to start from.")
  prompts = []
  for labels in label_sets:
    prompt = vocab.prompt(labels, prefix) if vocab is not None else tok.encode(prefix)
    name = vocab.describe(labels) if vocab is not None else "prefix"
    prompts.append((name, labels, prompt))
  names = [p[0] for p in prompts]
  if len(set(names)) != len(names):
    raise ValueError(f"the same prompt is given twice: {names}.")

  if settings.beam_width > 1:
    return _beam_sets(model, prompts, settings, num_samples, batch_size, prefix, mesh)

  # One row per (prompt, sample); rows are keyed, then cut into batches.
  rows = [(p, i) for p in range(len(prompts)) for i in range(num_samples)]
  base = jax.random.key(seed)
  prompt_keys = [jax.random.fold_in(base, data_sampling.derive_seed(seed, name)) for name in names]
  width = max(p[2].size for p in prompts)
  out_tokens, out_logp, out_ended, out_lengths = [], [], [], []
  start, generated = time.perf_counter(), 0
  num_batches = -(-len(rows) // batch_size)
  for b in range(num_batches):
    chunk = rows[b * batch_size : (b + 1) * batch_size]
    padded = chunk + [chunk[0]] * (batch_size - len(chunk))  # one compiled shape
    tokens, segment_ids = gen.left_pad([prompts[p][2] for p, _ in padded])
    tokens = np.pad(tokens, [(0, 0), (width - tokens.shape[1], 0)])
    segment_ids = np.pad(segment_ids, [(0, 0), (width - segment_ids.shape[1], 0)])
    keys = jax.numpy.stack([jax.random.fold_in(prompt_keys[p], i) for p, i in padded])
    result = jax.device_get(
      gen.sample(model, tokens, settings, keys=keys, segment_ids=segment_ids, mesh=mesh)
    )
    out_tokens.append(result.tokens[: len(chunk)])
    out_logp.append(result.log_probs[: len(chunk)])
    out_ended.append(result.ended[: len(chunk)])
    out_lengths.append(result.lengths[: len(chunk)])
    generated += int(out_lengths[-1].sum())
    elapsed = time.perf_counter() - start
    logging.info(
      "batch %d/%d: %d designs, %.0f nt/s (first batch includes compilation)",
      b + 1,
      num_batches,
      min((b + 1) * batch_size, len(rows)),
      generated / max(elapsed, 1e-9),
    )
  tokens = np.concatenate(out_tokens)
  logp = np.concatenate(out_logp)
  ended = np.concatenate(out_ended)
  lengths = np.concatenate(out_lengths)
  sets = []
  for p, (name, labels, prompt) in enumerate(prompts):
    sel = slice(p * num_samples, (p + 1) * num_samples)
    seqs = [prefix + s for s in metrics.decode_designs(tokens[sel])]
    sets.append(
      DesignedSet(name, labels, prefix, prompt, seqs, logp[sel], ended[sel], lengths[sel])
    )
  return sets


def _beam_sets(model, prompts, settings, num_samples, batch_size, prefix, mesh):
  keep = min(num_samples, settings.beam_width)
  if num_samples > settings.beam_width:
    logging.warning(
      "beam search gives beam_width=%d designs per prompt; num_samples=%d "
      "is capped to it (use several prefixes, or sampling, for more).",
      settings.beam_width,
      num_samples,
    )
  per_batch = max(1, batch_size // settings.beam_width)
  sets = []
  for s in range(0, len(prompts), per_batch):
    chunk = prompts[s : s + per_batch]
    beams = jax.device_get(gen.beam_search(model, [p[2] for p in chunk], settings, mesh=mesh))
    for row, (name, labels, prompt) in enumerate(chunk):
      # Empty slots (-inf: fewer hypotheses exist than the beam holds) are
      # not designs.
      slots = np.flatnonzero(np.isfinite(beams.scores[row, :keep]))
      if len(slots) < keep:
        logging.warning(
          "%s: beam search found %d of %d designs (fewer hypotheses exist; raise "
          "max_new_tokens or lower beam_width).",
          name,
          len(slots),
          keep,
        )
      seqs = [prefix + x for x in metrics.decode_designs(beams.tokens[row, slots])]
      best = (beams.log_probs[row, slots], beams.ended[row, slots], beams.lengths[row, slots])
      sets.append(DesignedSet(name, labels, prefix, prompt, seqs, *best))
  return sets


def write_fasta(
  sets: Sequence[DesignedSet], path: str, *, settings: GenerateConfig, seed: int, source: str = ""
) -> str:
  """One record per design: >{prompt}_{i} prompt=... labels=... prefix=...
  settings... seed=... log_prob=... ended=... [checkpoint=...]. Empty
  designs (<eos> sampled first, min_new_tokens=0) have no FASTA record:
  they are counted in a warning (and in the summary's lengths)."""
  records, empty = [], 0
  slugs = [_slug(s.name) for s in sets]
  if len(set(slugs)) < len(slugs):  # e.g. Su(Hw) and Su_Hw: number the prompts
    slugs = [f"p{k}_{slug}" for k, slug in enumerate(slugs)]
  for s, slug in zip(sets, slugs):
    prompt_text = "".join(tok.token_name(int(t)) for t in s.prompt)
    common = (
      f"prompt={prompt_text} labels={s.name.replace(' ', '_')} "
      f"prefix={s.prefix or '-'} {settings.describe()} seed={seed}"
      + (f" checkpoint={source}" if source else "")
    )
    for i, (seq, logp, ended) in enumerate(zip(s.sequences, s.log_probs, s.ended)):
      if s.lengths[i] == 0:  # the prefix alone
        empty += 1
        continue
      records.append(
        (
          f"{slug}_{i} {common} log_prob={float(logp):.3f} ended_with_eos={int(bool(ended))}",
          seq,
        )
      )
  if empty:
    logging.warning(
      "%d design(s) ended at once (<eos> first) and have no record in %s; "
      "--min_length=1 (generate.min_new_tokens) requires a nucleotide.",
      empty,
      path,
    )
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with paths.replacing(path) as tmp:
    fasta.write_fasta(tmp, records)
  return path


def summarize_sets(
  sets: Sequence[DesignedSet],
  training: design_data.DesignData | None,
  vocab: prompts.PromptVocab | None,
  *,
  k: int = 6,
  max_pairs: int = 20_000,
) -> dict[str, dict]:
  """{prompt name: metrics.summarize(...)}; each set is compared
  with the training sequences of its label (all of them when unconditional)."""
  by_label: dict[str, list[str]] = {}
  all_training: set[str] | None = None
  if training is not None:
    all_training = set(training.sequences)
    if vocab is not None:
      by_label = design_data.sequences_by_label(training, vocab)
  out = {}
  for s in sets:
    reference = None
    if training is not None:
      reference = by_label.get(s.name) if s.labels is not None else list(training.sequences)
    out[s.name] = metrics.summarize(
      s.sequences,
      reference,
      training=all_training,
      log_probs=s.log_probs,
      scored_tokens=s.scored_tokens,
      k=k,
      max_pairs=max_pairs,
    )
    out[s.name]["ended_share"] = float(np.mean(s.ended)) if len(s.ended) else math.nan
  return out


def output_files(output: str) -> tuple[str, str, str, str]:
  """The files a sampling run writes: the FASTA `output`, then its summary
  beside it (.summary.json, .summary.txt, .summary.png in place of the
  FASTA's extension, so d.fa and d.fasta share them)."""
  stem = os.path.splitext(output)[0]
  return output, stem + ".summary.json", stem + ".summary.txt", stem + ".summary.png"


def run_sampling(
  checkpoint: str,
  output: str,
  *,
  config=None,
  which: str = "latest",
  label_specs: Sequence[str] = (),
  prefix: str = "",
  reference_csv: str | None = None,
  mesh=None,
  **overrides,
) -> dict:
  """The sample mode of launch/generate.py.

  Args:
    checkpoint: a run directory, checkpoints/ or best/ directory, or step
      directory (`restore.load`).
    output: the FASTA path; the summary goes next to it (.summary.json,
      .summary.txt, .summary.png). In a multi-host job every process
      samples the same designs and process 0 alone writes them.
    config: a config whose `generate` section gives the sampling defaults
      (None: the run's own config).
    label_specs: prompts as `PromptVocab.parse` reads them (none: every
      label combination).
    reference_csv: training CSV for the summary (None: the run's
      generate.train_csv when it exists).
    overrides: GenerateConfig fields (oracle_csv, oracle_dev_csv and test_csv
      among them) and num_samples, batch_size, seed (None: keep).

  Returns:
    {"fasta": path, "summary": {prompt: metrics}, "settings": str, ...,
    "oracle": `oracle.judge`'s report when generate.oracle_csv,
    oracle_dev_csv and test_csv are set}.
  """
  from hybridna_jax import restore  # pylint: disable=g-import-not-at-top

  # Resolved first: a directory that is not a run (a Hugging Face one) is
  # refused before its weights load, and the step recorded is the one loaded.
  ref = restore.find_checkpoint(checkpoint, which)
  # The loop layout: in the decode loop a scanned model's per-layer weight
  # slices would be hoisted into a second copy of the weights.
  model, _, run_config = restore.load(ref.step_dir, mesh=mesh, scan_layers=False)
  # Defaults for a run from before the generate section existed (pretraining).
  run_generate = GenerateConfig.of(run_config)
  g = GenerateConfig.of(config) if config is not None else run_generate
  # The sampling fields (GenerateConfig) and the counts; None keeps the
  # config's value, anything else (0 too) is set and validated.
  settings = g.replace(**overrides)
  num_samples, batch_size, seed = settings.num_samples, settings.batch_size, settings.seed
  vocab = (
    prompts.PromptVocab.from_config(run_generate.prompt_vocab)
    if run_generate.prompt_vocab
    else None
  )
  if vocab is not None:
    label_sets = prompts.iter_label_sets(vocab, label_specs)
  else:
    if label_specs:
      raise ValueError(
        f"{checkpoint} is not a design run (no prompt vocabulary in its "
        "config), so --labels cannot be used; give --prefix only."
      )
    label_sets = [None]
  judged = any(getattr(settings, f) for f in oracle.ORACLE_FIELDS)
  oracle_csvs = {f: str(getattr(settings, f)) for f in oracle.ORACLE_FIELDS}
  if judged:  # refused now, not after the sampling
    if vocab is None:
      raise ValueError(
        f"{checkpoint} has no prompt vocabulary (not a design run): the oracle "
        "judges designs by their requested label; unset config.generate.oracle_csv."
      )
    oracle.check_oracle_settings(vocab, **oracle_csvs)
  logging.info(
    "designing %d x %d sequences (%s) from %s step %d",
    len(label_sets),
    num_samples,
    settings.describe(),
    ref.manager_dir,
    ref.step,
  )
  start = time.perf_counter()
  sets = design_sets(
    model,
    vocab,
    label_sets,
    settings,
    num_samples=num_samples,
    batch_size=batch_size,
    seed=seed,
    prefix=prefix,
    mesh=mesh,
  )
  seconds = time.perf_counter() - start
  source = ref.step_dir
  # Every process of a multi-host job holds the same designs; one writes,
  # once the summaries are computed (a failure there leaves no output).
  writes = jax.process_index() == 0
  training = None
  csv_path = reference_csv or run_generate.train_csv or None
  if csv_path and os.path.isfile(csv_path):
    # Without a prompt vocabulary (a pretrained LM) its sequences are the
    # reference of every (unconditional) set.
    training = design_data.load_design_csv(csv_path, vocab.columns if vocab else None)
  elif csv_path:
    logging.warning(
      "training CSV %s not found; the summary leaves out the comparisons "
      "with training sequences (pass --reference_csv).",
      csv_path,
    )
  summary = summarize_sets(sets, training, vocab, k=int(g.kmer), max_pairs=int(g.max_edit_pairs))
  fasta_path, json_path, text_path, plot_path = output_files(output)
  table = metrics.format_table(summary)
  report = None
  if judged:
    designs = {s.labels[vocab.columns[0]]: s.sequences for s in sets if s.labels is not None}
    report = oracle.judge_designs(vocab, designs, **oracle_csvs, seed=seed)
    table += "\n\n" + oracle.format_report(report)
    logging.info("%s", report["verdict"])
  result = {
    "fasta": output,
    "checkpoint": source,
    "settings": settings.describe(),
    "seed": seed,
    "num_samples": num_samples,
    "seconds": seconds,
    "reference_csv": csv_path if training is not None else None,
    "summary": summary,
  }
  if report is not None:
    result["oracle"] = report
  if writes:
    # Each file whole or not at all; the FASTA, whose presence marks a
    # finished run, last. A metric undefined for a set (the edit distance of
    # one design) is null in the strict JSON.
    paths.write_json(json_path, result)
    paths.write_text(text_path, table + "\n")
    references = {}  # as summarize_sets compares: a set without labels with every row
    if training is not None:
      if vocab is not None:
        references = design_data.sequences_by_label(training, vocab)
      references.update({s.name: list(training.sequences) for s in sets if s.labels is None})
    result["plot"] = metrics.plot_summary(
      {s.name: s.sequences for s in sets}, references, plot_path, k=int(g.kmer)
    )
    write_fasta(sets, fasta_path, settings=settings, seed=seed, source=source)
    logging.info("wrote %s and its summaries", output)
  result["table"] = table
  return result
