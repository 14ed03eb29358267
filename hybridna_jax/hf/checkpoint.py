"""Hugging Face-format checkpoints: load onto a mesh without torch, export.

A Hugging Face directory holds config.json, model.safetensors (or shards
named by model.safetensors.index.json) and, when present, tokenizer files.
`load` reads tensor names and shapes from the safetensors headers, checks
them all against the naming family's table (hybridna_jax.hf.naming) and
reports every unmapped, missing or mis-shaped tensor in one error, then
reads one tensor at a time and puts it straight onto the mesh with its
parameter's sharding: host memory holds about one tensor, so a 7B
checkpoint loads on a small host. `export` writes the reverse
(transformers' BambaForCausalLM layout).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import uuid
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from hybridna_jax import paths, sharding
from hybridna_jax import tokenizer as our_tokenizer
from hybridna_jax.config import ModelConfig, base_config
from hybridna_jax.hf import naming
from hybridna_jax.hf.vocab import (
  CHAR_TOKENIZER_FILES,
  VocabTokenizer,
  read_json,
  read_vocab,
  write_char_tokenizer,
)
from hybridna_jax.model import abstract_model, convert_params

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
# PyTorch pickles, which transformers writes with safe_serialization=False;
# reading them would need torch (and unpickling runs code).
TORCH_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class HFCheckpointError(ValueError):
  """A checkpoint that does not fit the model its config describes; the
  message lists every problem."""


_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names


# The shards transformers' save_pretrained writes beside INDEX_FILE (and export).
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def local_dir(path: str | os.PathLike) -> str | None:
  """The local path of `path` (a local path or file:// URL, which Hugging
  Face directories may be given as), None for another URL (gs://, ...):
  load reads local files only."""
  text = os.fspath(path)
  if not paths.is_url(text):
    return text
  return paths.local_file_path(text) if paths.scheme(text) == "file" else None


def is_hf_dir(path: str | os.PathLike) -> bool:
  """True for a local directory (or file:// URL) with config.json and
  model.safetensors or its index."""
  path = local_dir(path)
  return (
    path is not None
    and os.path.isdir(path)
    and os.path.exists(os.path.join(path, CONFIG_FILE))
    and any(os.path.exists(os.path.join(path, f)) for f in (SINGLE_FILE, INDEX_FILE))
  )


def _shard_names(path: str) -> list[str]:
  return sorted(f for f in os.listdir(path) if _SHARD_NAME.fullmatch(f))


def check_safetensors(path: str | os.PathLike) -> None:
  """Raises HFCheckpointError for a Hugging Face directory that load cannot
  read: safetensors shards without model.safetensors.index.json, weights
  without their config.json (both incomplete downloads), or PyTorch weights
  (TORCH_FILES) and no safetensors."""
  path = local_dir(path)
  if path is None or not os.path.isdir(path) or is_hf_dir(path):
    return
  has_config = os.path.exists(os.path.join(path, CONFIG_FILE))
  shards = _shard_names(path)
  if shards and not os.path.exists(os.path.join(path, SINGLE_FILE)):
    what, it = (f"{INDEX_FILE}, which names each tensor's shard", "it")
    if not has_config:
      what, it = (f"{INDEX_FILE} and no {CONFIG_FILE}", "them")
    raise HFCheckpointError(
      f"{path} holds sharded safetensors ({shards[0]}, ...) but no {what}; download {it} too."
    )
  held = [
    f for f in (SINGLE_FILE, INDEX_FILE, *TORCH_FILES) if os.path.exists(os.path.join(path, f))
  ]
  if held and not has_config:
    raise HFCheckpointError(
      f"{path} holds {held[0]} but no {CONFIG_FILE}, which gives the model's settings; "
      f"download the checkpoint's {CONFIG_FILE} (and tokenizer files) into it."
    )
  held = [f for f in held if f in TORCH_FILES]
  if held:
    raise HFCheckpointError(
      f"{path} holds PyTorch weights ({held[0]}) and no {SINGLE_FILE}; only safetensors are "
      "read: re-save them in transformers with model.save_pretrained(dir, "
      "safe_serialization=True)."
    )


@dataclasses.dataclass(frozen=True)
class HFFiles:
  """A Hugging Face directory's config and tensor headers.

  shapes: {tensor name: shape}; files: {tensor name: safetensors path}.
  """

  path: str
  config: dict
  shapes: dict[str, tuple[int, ...]]
  files: dict[str, str]

  @property
  def shards(self) -> list[str]:
    return sorted(set(self.files.values()))


def read_files(path: str | os.PathLike) -> HFFiles:
  """Reads config.json and the safetensors headers (no tensor data) of a
  local directory or file:// URL."""
  local = local_dir(path)
  if local is None:
    raise HFCheckpointError(
      f"{os.fspath(path)}: Hugging Face directories are read from local disk (a path or "
      "file:// URL); download it first."
    )
  path = os.path.abspath(local)
  check_safetensors(path)
  config = read_json(os.path.join(path, CONFIG_FILE))
  if not isinstance(config, dict):
    raise HFCheckpointError(
      f"{os.path.join(path, CONFIG_FILE)}: expected a JSON object of model fields; "
      "download it again."
    )
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
      raise HFCheckpointError(
        f"{index}: no \"weight_map\" of tensor name -> shard file; download it again."
      )
    shards = sorted(set(weight_map.values()))
  else:
    shards = [SINGLE_FILE]
  shapes, files = {}, {}
  for shard in shards:
    shard_path = os.path.join(path, shard)
    if not os.path.exists(shard_path) and shard == SINGLE_FILE:
      raise HFCheckpointError(
        f"{path} holds {CONFIG_FILE} but no weights ({SINGLE_FILE}, or {INDEX_FILE} and its "
        "shards); download them into it."
      )
    if not os.path.exists(shard_path):
      raise HFCheckpointError(
        f"{shard_path} is missing, though {INDEX_FILE} names it; download it again."
      )
    try:
      with safe_open(shard_path, framework="np") as f:
        for name in f.keys():
          tensor = f.get_slice(name)
          if tensor.get_dtype() not in _FLOAT_DTYPES:
            raise HFCheckpointError(
              f"{shard_path}: tensor {name} holds {tensor.get_dtype()}, not floating-point "
              "weights (F16, BF16, F32 or F64); the file is damaged or not a model's weights."
            )
          shapes[name] = tuple(tensor.get_shape())
          files[name] = shard_path
    except SafetensorError as e:  # truncated or corrupt: its header does not cover the file
      raise HFCheckpointError(
        f"{shard_path}: not a readable safetensors file ({e}); download it again."
      ) from None
  return HFFiles(path, config, shapes, files)


def model_config(
  files: HFFiles, **overrides
) -> tuple[ModelConfig, naming.Family, naming.Translation]:
  """The ModelConfig a checkpoint describes (config.json translated, with
  what it leaves out -- vocabulary size, SSM head size, groups -- read from
  the tensor shapes), its naming family and the translation report.
  Raises HFCheckpointError for settings we cannot reproduce."""
  source = os.path.join(files.path, CONFIG_FILE)
  family = naming.detect_family(files.config, source)
  tr = family.translate(files.config)
  if tr.problems:
    raise HFCheckpointError(
      f"{source}: {len(tr.problems)} setting(s) this model cannot reproduce:\n  "
      + "\n  ".join(tr.problems)
    )
  fields = dict(tr.fields)
  names = family.names
  embed = files.shapes.get(names["embed"])
  if "vocab_size" not in fields and embed:
    fields["vocab_size"] = embed[0]
  # The layer pattern and Mamba2 sizes, to find and read the tensors below;
  # an unstated SSM head size, group count or state size is 1 here, which
  # any d_inner admits (stated ones are kept and checked).
  try:
    probe = ModelConfig.from_config(
      {"ssm_head_dim": 1, "ngroups": 1, "d_state": 1, **fields}, path=source
    )
  except ValueError as e:
    raise HFCheckpointError(f"{source}: {e}") from None
  first_mamba = next((i for i, k in enumerate(probe.layer_types) if k == "mamba"), None)
  if first_mamba is not None:
    prefix = names["layer"].format(i=first_mamba) + names["mamba"]
    heads = files.shapes.get(prefix + "A_log")
    if "ssm_head_dim" not in fields and heads:
      fields["ssm_head_dim"] = probe.d_inner // heads[0]
    conv = files.shapes.get(prefix + "conv1d.weight")
    if conv and not ("ngroups" in fields and "d_state" in fields):
      # conv1d's channels are d_inner + 2 * ngroups * d_state: the product
      # only. Either factor gives the other; a guessed one can load a model
      # with the wrong groups that runs and scores wrong.
      group_states = (conv[0] - probe.d_inner) // 2
      if "d_state" in fields:
        fields["ngroups"] = group_states // fields["d_state"]
      elif "ngroups" in fields:
        fields["d_state"] = group_states // fields["ngroups"]
      else:
        raise HFCheckpointError(
          f"{source} names neither the SSM state size nor the group count, and the tensors "
          f"give only their product ({group_states}); add mamba_d_state (or mamba_n_groups) "
          "to it."
        )
  try:
    cfg = ModelConfig.from_config({**fields, **overrides}, path=source)
  except ValueError as e:
    raise HFCheckpointError(f"{source}: {e}") from None
  return cfg, family, tr


def _check(files: HFFiles, specs: Mapping[str, tuple], family, cfg: ModelConfig) -> None:
  """One HFCheckpointError listing every unmapped, missing and mis-shaped tensor."""
  present, expected = set(files.shapes), set(specs)
  ignored = {family.names["lm_head"]} if cfg.tie_embeddings else set()
  unknown = sorted(present - expected - ignored)
  missing = sorted(expected - present)
  wrong = [
    f"{n}: {files.shapes[n]} in the checkpoint, {specs[n][1].shape} expected"
    for n in sorted(present & expected)
    if tuple(files.shapes[n]) != specs[n][1].shape
  ]
  if not (unknown or missing or wrong):
    return
  parts = []
  for title, items in (
    ("tensors no parameter maps to", unknown),
    ("parameters missing from the checkpoint", missing),
    ("shape mismatches", wrong),
  ):
    if items:
      parts.append(f"{len(items)} {title}:\n    " + "\n    ".join(items))
  attention = [i for i, k in enumerate(cfg.layer_types) if k == "attention"]
  raise HFCheckpointError(
    f"{files.path} does not match its config.json ({family.name} names, "
    f"{cfg.n_layers} layers, attention at {attention}):\n  " + "\n  ".join(parts)
  )


def _placements(
  tok: VocabTokenizer, n_rows: int
) -> tuple[dict[int, tuple[int, str]], dict[int, int]]:
  """Where the checkpoint's n_rows embedding rows go among our ids
  (hybridna_jax.tokenizer, at most VOCAB_SIZE).

  Returns (placed, shared): placed {our id: (row, why)}, why empty for a
  match by role or name, each row on one id at most, so a conversion that
  keeps every row is a permutation and the softmax is the checkpoint's;
  shared {our id: row} for ids whose token the checkpoint gives to a role
  placed before (pad = eos, bos = eos, ...): their input embedding reads
  that row (`vocab_remap`).

  First by role or name, in priority order, those generated or scored
  first (a row goes to the first of our ids that claims it): A C G T, N
  (else the checkpoint's unk: a character tokenizer without N reads it as
  unknown), eos
  (else the checkpoint's sep: HyenaDNA's ends sequences with [SEP]), bos
  (else its cls), mask, <task_i> by name, sep, pad. Then the rows left
  over (checkpoint order, embedding rows beyond the tokenizer's vocabulary
  included) take our ids left over, lowest first: our specials the
  checkpoint lacks, then 10, 11, ...
  """
  t = our_tokenizer
  claims = [
    *[(t.A + j, [(b, tok.nucleotides[b])]) for j, b in enumerate("ACGT")],
    (t.N, [("N", tok.nucleotides["N"]), ("unk", tok.unk)]),
    (t.EOS, [("eos", tok.eos), ("sep", tok.sep)]),
    (t.BOS, [("bos", tok.bos), ("cls", tok.cls)]),
    (t.MASK, [("mask", tok.mask)]),
    *[
      (i, [(t.token_name(i), tok.vocab.get(t.token_name(i)))])
      for i in range(t.FIRST_TASK_TOKEN, t.VOCAB_SIZE)
    ],
    (t.SEP, [("sep", tok.sep)]),
    (t.PAD, [("pad", tok.pad)]),
  ]
  placed: dict[int, tuple[int, str]] = {}
  shared: dict[int, int] = {}
  used: set[int] = set()
  for ours, candidates in claims:
    rows = [(k, role, row) for k, (role, row) in enumerate(candidates) if row is not None]
    rows = [(k, role, row) for k, role, row in rows if row < n_rows]
    if rows and rows[0][2] in used:
      shared[ours] = rows[0][2]
    for k, role, row in rows:
      if row not in used:
        why = f"the checkpoint's {role} token, standing in for {candidates[0][0]}" if k else ""
        placed[ours] = (row, why)
        used.add(row)
        break
  free = [i for i in range(t.VOCAB_SIZE) if i not in placed]
  left = [r for r in range(n_rows) if r not in used]
  # More rows than our ids: vocab_remap reports the rest as dropped.
  for ours, row in zip(free, left):
    placed[ours] = (row, "a token with no counterpart here, kept so the softmax keeps every row")
  return placed, shared


def _covered(placed: Mapping[int, tuple[int, str]]) -> int:
  """The smallest vocabulary of ours that keeps every checkpoint row
  `_placements` placed, at least 10 (specials and A C G T N): the converted
  model's softmax is the checkpoint's, so every score is (unless one of its
  tokens serves two of our roles and no row is left over for the second: a
  zero row, `vocab_remap`)."""
  return max([our_tokenizer.FIRST_TASK_TOKEN] + [i + 1 for i in placed])


def vocab_remap(
  tok: VocabTokenizer, n_rows: int, vocab_size: int = 0
) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Row maps from the checkpoint's n_rows-row vocabulary to vocab_size of
  our ids (0: the smallest that keeps every row, `_covered`).

  Returns (head, embed, notes): head[i] is the checkpoint row of our id i in
  the output head, or -1 for a zero row; embed[i] the same for the input
  embedding, where an id whose token the checkpoint shares with another
  role reads that row (pad = eos: our <pad> reads its row as input, which
  changes no score, while its output row is a spare one or zero); notes,
  one line per placement that is not a match by role or name, per shared
  token, per dropped row and for the zero rows.
  """
  placed, shared = _placements(tok, n_rows)
  covered = _covered(placed)
  vocab_size = vocab_size or covered

  def row_name(row):
    token = tok.id_to_token.get(row)
    return f"{token!r} (row {row})" if token is not None else f"row {row} (no token in its files)"

  head = np.full(vocab_size, -1, np.int64)
  notes = []
  for i, (row, why) in sorted(placed.items()):
    if i < vocab_size:
      head[i] = row
      if why:
        notes.append(
          f"our {our_tokenizer.token_name(i)} (id {i}) <- checkpoint {row_name(row)}: {why}"
        )
    else:
      notes.append(
        f"checkpoint {row_name(row)} dropped (its id here would be {i}, beyond vocab size "
        f"{vocab_size}): the softmax loses its row, so scores change"
      )
  kept = {r for r, _ in placed.values()}
  notes += [
    f"checkpoint {row_name(r)} dropped: more rows than our {our_tokenizer.VOCAB_SIZE} ids, "
    "so scores change"
    for r in range(n_rows)
    if r not in kept
  ]
  embed = head.copy()
  for i, row in sorted(shared.items()):
    if i < vocab_size:
      embed[i] = row
      notes.append(
        f"our {our_tokenizer.token_name(i)} (id {i}) reads checkpoint {row_name(row)} as input, "
        "a token that also serves a role placed before it"
      )
  zero = np.flatnonzero(head < 0)
  if zero.size:
    ids = ", ".join(str(i) for i in zero[:12]) + (", ..." if zero.size > 12 else "")
    exact = ""
    if vocab_size > covered:
      exact = f" (vocab size {covered}, the default, keeps exactly its rows)"
    notes.append(
      f"{zero.size} of our ids ({ids}) have no checkpoint row of their own in the output head: "
      "zero rows, whose logit 0 takes probability mass from every prediction, so scores "
      f"differ from the checkpoint's{exact}"
    )
  return head, embed, notes


def check_our_vocab(n: int | None, name: str = "our_vocab") -> None:
  """Raises ValueError unless `n` (hf.load's our_vocab, convert.py's
  --vocab_size) is None, 0 or 10..128: fewer than 10 ids leaves out tokens
  our tokenizer writes (specials, A C G T N), more than 128 ids it never writes."""
  t = our_tokenizer
  if n is not None and n != 0 and not t.FIRST_TASK_TOKEN <= n <= t.VOCAB_SIZE:
    raise ValueError(
      f"{name}={n}: pass 0 (every checkpoint row, exact scores) or {t.FIRST_TASK_TOKEN}.."
      f"{t.VOCAB_SIZE} (our specials and A C G T N, up to every task token)."
    )


def _remap_rows(array: np.ndarray, source: np.ndarray, axis: int) -> np.ndarray:
  taken = np.take(array, np.maximum(source, 0), axis=axis)
  keep = (source >= 0).reshape([-1 if a == axis else 1 for a in range(array.ndim)])
  return np.where(keep, taken, 0).astype(array.dtype)


def load(
  path: str,
  *,
  dtype: str | None = None,
  mesh: Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
  our_vocab: int | None = None,
  **runtime,
):
  """Loads a Hugging Face-format directory onto `mesh`.

  Args:
    path: directory (local path or file:// URL) with config.json and
      model.safetensors (or model.safetensors.index.json and its shards).
    dtype: "float32" (default, the reference framework's precision) or
      "bfloat16": parameter and compute dtype.
    mesh: where to place the parameters (default: all devices, fsdp).
    our_vocab: None keeps the checkpoint's vocabulary (embedding and head
      rows in its order; the tokenizer maps to its ids). 0 re-orders the
      rows into hybridna_jax.tokenizer's ids, keeping every row
      (`vocab_remap`), so scores are the checkpoint's; the returned tokenizer
      is hybridna_jax.tokenizer. N > 0 keeps ids 0..N-1: more than 0's
      size adds zero rows (logit 0: they take probability mass), fewer drops
      rows (the softmax renormalises); both are logged.
    **runtime: runtime ModelConfig fields (remat, ssd_impl, attention_impl,
      max_seq_len, scan_layers).

  Returns:
    (model, tokenizer, config): an nnx HybriDNA, a VocabTokenizer (None when
    the directory has no tokenizer files, or files that hold no DNA
    vocabulary: a warning names them) or hybridna_jax.tokenizer (with
    our_vocab), and a job config whose `model` section is the translated
    architecture (and score.add_bos True when the tokenizer adds bos, as
    transformers' does: VocabTokenizer.add_bos, from tokenizer.json's
    post_processor, or add_bos_token where there is no tokenizer.json;
    scores as the checkpoint's own pipeline computes them).
  """
  check_our_vocab(our_vocab)
  files = read_files(path)
  dtype = dtype or "float32"
  cfg, family, tr = model_config(files, dtype=dtype, param_dtype=dtype, **runtime)
  if tr.unknown:
    logging.warning(
      "%s: config.json fields with no counterpart here (ignored): %s",
      files.path,
      ", ".join(tr.unknown),
    )
  specs = family.tensor_specs(cfg, tr.conv_bias)
  _check(files, specs, family, cfg)
  try:
    tok, unreadable = read_vocab(files.path, files.config), None
  except ValueError as e:  # tokenizer files that hold no DNA vocabulary
    tok, unreadable = None, str(e)
  if tok is None and our_vocab is not None:
    why = unreadable or (
      f"{files.path} has no tokenizer files (tokenizer.json, vocab.json or tokenizer_config.json)."
    )
    raise HFCheckpointError(
      f"{why} Its ids cannot be mapped to ours without them: copy the checkpoint's tokenizer "
      "files into it (in Python, hf.load(..., our_vocab=None) loads the model with the "
      "checkpoint's own ids)."
    )
  if unreadable:
    # The model is usable with the checkpoint's own tokenizer (e.g. in transformers).
    logging.warning("%s Loading the model without a tokenizer (None).", unreadable)
  remap = None
  adds_bos = tok is not None and tok.add_bos
  bos_from = tok.add_bos_from if tok is not None else ""
  if our_vocab is not None:
    head, embed, notes = vocab_remap(tok, cfg.vocab_size, our_vocab)
    for note in notes:
      logging.warning("%s: %s", files.path, note)
    remap = {"lm_head": head, "embed": embed}
    tok, our_vocab = our_tokenizer, len(head)
  out_cfg = cfg if remap is None else dataclasses.replace(cfg, vocab_size=our_vocab)
  if remap is not None and cfg.tie_embeddings and not np.array_equal(head, embed):
    # One tied matrix cannot give an id that shares a token (bos = eos) the
    # shared row as input and keep the softmax's rows as output: two copies.
    logging.warning(
      "%s: the checkpoint ties its input and output embeddings, but one of its tokens serves "
      "two of our ids; the converted model keeps two matrices (model.tie_embeddings=False).",
      files.path,
    )
    out_cfg = dataclasses.replace(out_cfg, tie_embeddings=False)
  params = _place(
    files,
    specs,
    out_cfg,
    mesh or sharding.make_mesh(fsdp=-1),
    rules,
    remap,
    head_from_embed=cfg.tie_embeddings and not out_cfg.tie_embeddings,
  )
  graphdef, _ = nnx.split(abstract_model(out_cfg), nnx.Param)
  config = job_config(out_cfg)
  if adds_bos:
    # Scored as the checkpoint's pipeline scores: every sequence after bos.
    config.score.add_bos = True
    logging.info(
      "%s: its tokenizer adds bos (%s), so the job config scores with score.add_bos=True.",
      files.path,
      bos_from,
    )
  return nnx.merge(graphdef, params), tok, config


def _place(
  files, specs, cfg: ModelConfig, mesh: Mesh, rules, remap, head_from_embed: bool = False
) -> nnx.State:
  """Reads every tensor, converts it and device_puts each parameter with its
  sharding; one tensor at a time (one shard file open at a time). `remap`:
  None, or {"embed": rows, "lm_head": rows} (`vocab_remap`'s maps).
  `head_from_embed`: the checkpoint ties its embeddings and `cfg` does not;
  lm_head is read from the embedding."""
  loop_cfg = dataclasses.replace(cfg, scan_layers=False)
  _, abstract = nnx.split(abstract_model(loop_cfg), nnx.Param)
  shardings = sharding.state_shardings(abstract, mesh, rules)
  flat = list(nnx.to_flat_state(abstract))
  targets = {_key(p): v for p, v in flat}
  where = {_key(p): v.get_value() for p, v in nnx.to_flat_state(shardings)}
  values = {}
  for shard in files.shards:
    with safe_open(shard, framework="np") as f:
      for name in f.keys():
        if name not in specs or files.files[name] != shard:
          continue
        prefix, spec = specs[name]
        for rel, array in spec.to_ours(f.get_tensor(name)).items():
          converted = {prefix + rel: array}
          if prefix + rel == "embed" and head_from_embed:
            converted["lm_head"] = array.T  # (d, V), as an untied head
          for key, value in converted.items():
            if remap is not None and key in remap:
              value = _remap_rows(value, remap[key], axis=0 if key == "embed" else 1)
            target = targets[key]
            if value.shape != target.shape:  # the table and the model disagree: a bug here
              raise AssertionError(f"{name} -> {key}: {value.shape} vs {target.shape}")
            values[key] = jax.device_put(np.asarray(value).astype(target.dtype), where[key])
  params = nnx.from_flat_state([(p, v.replace(values[_key(p)])) for p, v in flat])
  if cfg.scan_layers:
    _, abstract = nnx.split(abstract_model(cfg), nnx.Param)
    out = sharding.state_shardings(abstract, mesh, rules)
    params = jax.jit(lambda p: convert_params(p, cfg), out_shardings=out)(params)
  return params


def _key(path) -> str:
  return ".".join(str(p) for p in path)


def export(
  model,
  out_dir: str,
  *,
  dtype: str = "float32",
  max_shard_bytes: int = 4 << 30,
  family: naming.Family = naming.BAMBA,
) -> list[str]:
  """Writes `model` (our vocabulary) as a Hugging Face directory that
  transformers' BambaForCausalLM.from_pretrained loads: config.json,
  model.safetensors (or shards of at most max_shard_bytes with
  model.safetensors.index.json) and a character-level tokenizer. Tensors are
  gathered to the host one at a time. Returns the files written.

  out_dir must be new, empty or an earlier export (which is replaced whole:
  no stale shard or index survives); anything else is refused. The files
  are written into a sibling directory that is renamed into place at the
  end, so an interrupted export leaves out_dir as it was.

  Attention without RoPE is written as a "linear" RoPE scaling by
  naming.NO_ROPE_FACTOR (Bamba always rotates; this rotation is the identity
  to float precision); RoPE must rotate half of each head as Bamba's does.
  """
  cfg: ModelConfig = model.cfg
  if cfg.rope and cfg.rope_fraction != 0.5:
    raise HFCheckpointError(
      f"model.rope_fraction={cfg.rope_fraction}: transformers' Bamba rotates half of each "
      "head; only rope=False or rope_fraction=0.5 exports."
    )
  check_export_dir(out_dir)
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  partial = os.path.join(parent, f".{os.path.basename(out_dir)}.partial-{uuid.uuid4().hex[:8]}")
  os.mkdir(partial)
  try:
    written = _write_export(model, partial, dtype, max_shard_bytes, family)
    check_export_dir(out_dir)  # again: files may have arrived while writing
    _replace_dir(partial, out_dir)
  finally:
    shutil.rmtree(partial, ignore_errors=True)  # gone after the rename unless it failed
  return written


# The files export writes (and _SHARD_NAME shards); a directory of nothing
# else is an earlier export.
_EXPORT_FILES = {CONFIG_FILE, SINGLE_FILE, INDEX_FILE, *CHAR_TOKENIZER_FILES}


def check_export_dir(out_dir: str) -> None:
  """Raises FileExistsError unless `out_dir` is absent, an empty directory
  or an earlier export (which export replaces)."""
  if not os.path.lexists(out_dir):
    return
  if not os.path.isdir(out_dir) or os.path.islink(out_dir):
    raise FileExistsError(f"{out_dir} exists and is no plain directory; pick a new output path.")
  foreign = sorted(
    f for f in os.listdir(out_dir) if f not in _EXPORT_FILES and not _SHARD_NAME.fullmatch(f)
  )
  if foreign or (os.listdir(out_dir) and not is_hf_dir(out_dir)):
    what = f"files an export does not write ({', '.join(foreign[:5])})" if foreign else "no model"
    raise FileExistsError(
      f"{out_dir} exists and is not empty, and is no earlier export ({what}); "
      "pick a new directory, or empty this one."
    )


def _replace_dir(new: str, out_dir: str) -> None:
  """Renames directory `new` to `out_dir`, replacing an earlier export there;
  out_dir is never a mix of the two (between the renames it is absent)."""
  if not os.path.isdir(out_dir) or not os.listdir(out_dir):
    os.replace(new, out_dir)  # atomic, also over an empty directory
    return
  old = f"{new}.old"
  os.rename(out_dir, old)
  try:
    os.rename(new, out_dir)
  except OSError:
    os.rename(old, out_dir)
    raise
  shutil.rmtree(old)


def _write_export(model, out_dir, dtype, max_shard_bytes, family) -> list[str]:
  """export's files, into the empty directory out_dir; config.json last, so
  the directory reads as a checkpoint only when complete."""
  cfg: ModelConfig = model.cfg
  loop_cfg = dataclasses.replace(cfg, scan_layers=False)
  params = convert_params(nnx.state(model, nnx.Param), loop_cfg)
  flat = {_key(p): v.get_value() for p, v in nnx.to_flat_state(params)}
  np_dtype = jnp.dtype(dtype)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, (prefix, spec) in family.tensor_specs(cfg).items():
    array = spec.to_hf(lambda rel, prefix=prefix: np.asarray(jax.device_get(flat[prefix + rel])))
    array = np.ascontiguousarray(array.astype(np_dtype))
    if size and size + array.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = array
    size += array.nbytes
  written = []
  if len(shards) == 1:
    names = [SINGLE_FILE]
  else:
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    index = {
      "metadata": {"total_size": sum(a.nbytes for s in shards for a in s.values())},
      "weight_map": {t: n for n, s in zip(names, shards) for t in s},
    }
    paths.write_json(os.path.join(out_dir, INDEX_FILE), index)
    written.append(INDEX_FILE)
  for name, shard in zip(names, shards):
    save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
    written.append(name)
  written += write_char_tokenizer(out_dir)
  hf_config = family.to_hf_config(cfg)
  hf_config.update(
    dtype=dtype,
    pad_token_id=our_tokenizer.PAD,
    bos_token_id=our_tokenizer.BOS,
    eos_token_id=our_tokenizer.EOS,
  )
  paths.write_json(os.path.join(out_dir, CONFIG_FILE), hf_config)
  return written + [CONFIG_FILE]


def job_config(model_cfg: ModelConfig) -> ml_collections.ConfigDict:
  """A job config (base_config) whose model section is `model_cfg`."""
  config = base_config()
  config.model = ModelConfig.config_dict(
    **{f: getattr(model_cfg, f) for f in ModelConfig.field_names()}
  )
  return config


def write_run(model, config: ml_collections.ConfigDict, workdir: str, step: int = 0) -> str:
  """Writes `model`'s parameters as an Orbax run directory (config.json +
  checkpoints/<step>) that restore.load, launch/eval.py, score.py,
  finetune.py and generate.py read like a trained run. Returns workdir."""
  from hybridna_jax.train import checkpoint as run_files  # pylint: disable=g-import-not-at-top
  from hybridna_jax.train.step import TrainState  # pylint: disable=g-import-not-at-top

  # An existing run's config.json describes its checkpoints: never rewrite it.
  for sub in (run_files.CHECKPOINT_DIR, run_files.BEST_DIR):
    held = os.path.join(workdir, sub)
    if os.path.isdir(held) and os.listdir(held):
      raise FileExistsError(
        f"{workdir} already holds a run ({held} is not empty); write into a new directory, "
        "or remove that run first."
      )
  os.makedirs(workdir, exist_ok=True)
  zero = jnp.zeros((), jnp.int32)
  checkpoints = run_files.Checkpoints(
    os.path.join(workdir, run_files.CHECKPOINT_DIR), async_save=False
  )
  state = TrainState(zero + step, nnx.state(model, nnx.Param), None, zero, zero)
  checkpoints.save(state, {"stage": 0, "converted_from": "huggingface"})
  checkpoints.close()
  # Written once the checkpoint is: a failed save leaves no config.json that
  # makes the directory look like a run.
  paths.write_text(
    os.path.join(workdir, run_files.CONFIG_FILE), config.to_json_best_effort(indent=2)
  )
  return workdir
