"""The vocabulary of a Hugging Face checkpoint, read from its tokenizer files.

`VocabTokenizer` maps DNA text and specials to the checkpoint's own ids, so
the same ids reach our model and transformers' (the imported model keeps the
checkpoint's embedding rows in order). It reads, in order of preference:

    tokenizer.json          HF `tokenizers`: model.vocab ({token: id} or
                            [[token, score], ...]), added_tokens, and
                            post_processor (whether a sequence starts
                            with bos, and which token that is)
    vocab.json              {token: id}
    tokenizer_config.json   added_tokens_decoder {id: {"content": token}},
                            the names of bos/eos/pad/... tokens, and
                            add_bos_token (without a tokenizer.json:
                            transformers ignores it beside one)
    config.json             pad/bos/eos_token_id

HyenaDNA's and Caduceus' `CharacterTokenizer` writes no vocabulary file: its
tokenizer_config.json lists `"characters": ["A", "C", "G", "T", "N"]` and the
class builds the ids in code, always the same: [CLS] 0, [SEP] 1, [BOS] 2,
[MASK] 3, [PAD] 4, [RESERVED] 5, [UNK] 6, then the characters from 7 in
order (12 tokens for A C G T N); its eos token is [SEP]. A
tokenizer_config.json with `characters` and no tokenizer.json or vocab.json
is read that way.

`write_char_tokenizer` writes the character-level tokenizer of our own
vocabulary (hybridna_jax.tokenizer) in those formats (export).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np

from hybridna_jax import paths
from hybridna_jax import tokenizer as ours

_ROLES = ("pad", "bos", "eos", "sep", "mask", "unk", "cls")
# Names a special token goes by in common vocabularies, per role.
_ROLE_NAMES = {
  "pad": ("<pad>", "[PAD]", "<|pad|>", "<PAD>"),
  "bos": ("<bos>", "<s>", "[BOS]", "<|bos|>", "<BOS>"),
  "eos": ("<eos>", "</s>", "[EOS]", "<|eos|>", "<EOS>", "<|endoftext|>"),
  "sep": ("<sep>", "[SEP]", "<SEP>"),
  "mask": ("<mask>", "[MASK]", "<MASK>"),
  "unk": ("<unk>", "[UNK]", "<UNK>"),
  "cls": ("<cls>", "[CLS]", "<CLS>"),
}
_INVALID = -1

# HyenaDNA/Caduceus CharacterTokenizer: the ids its __init__ assigns (from the
# class's code; the files do not hold them) -- specials 0..6, then the
# `characters` of tokenizer_config.json from 7 -- and its role defaults.
_CHAR_SPECIALS = ("[CLS]", "[SEP]", "[BOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]")
_CHAR_ROLES = {
  "pad": "[PAD]",
  "bos": "[BOS]",
  "eos": "[SEP]",
  "sep": "[SEP]",
  "mask": "[MASK]",
  "unk": "[UNK]",
  "cls": "[CLS]",
}


class VocabTokenizer:
  """DNA text <-> a checkpoint's token ids.

  Attributes: vocab {token: id}; ids of the roles pad/bos/eos/sep/mask/unk/cls
  (None when the vocabulary has none); A, C, G, T, N (with no N token, the
  unk token, as a character tokenizer reads N, else None);
  vocab_size (the id range of the tokenizer files; the model's embedding
  may have more rows); add_bos (the checkpoint's own pipeline starts every
  sequence with bos: tokenizer.json's post_processor puts a special token
  first, which is then the bos id, or, with no tokenizer.json,
  tokenizer_config.json's add_bos_token -- as transformers' tokenizer
  reads them) and add_bos_from (the file and field that said so).
  """

  def __init__(
    self,
    vocab: Mapping[str, int],
    specials: Mapping[str, int | None],
    source: str,
    add_bos: bool = False,
    add_bos_from: str = "",
  ):
    self.vocab = dict(vocab)
    self.source = source
    self.add_bos = add_bos
    self.add_bos_from = add_bos_from
    self.id_to_token = {i: t for t, i in self.vocab.items()}
    self.vocab_size = max(self.vocab.values()) + 1 if self.vocab else 0
    for role in _ROLES:
      setattr(self, role, specials.get(role))
    self.nucleotides = {}
    for base in ours.NUCLEOTIDES:
      self.nucleotides[base] = self.vocab.get(base, self.vocab.get(base.lower()))
    missing = [b for b in "ACGT" if self.nucleotides[b] is None]
    if missing:
      raise ValueError(
        f"{source}: the vocabulary has no token for {', '.join(missing)}; a DNA model needs "
        "A, C, G and T (tokens 'A'/'a', ...)."
      )
    self.A, self.C, self.G, self.T = (self.nucleotides[b] for b in "ACGT")
    self.N = self.nucleotides["N"] if self.nucleotides["N"] is not None else self.unk
    # Byte -> id, as our tokenizer folds case and IUPAC codes (to N, else
    # they are errors).
    self._lut = np.full(256, _INVALID, np.int64)
    for base, tok in self.nucleotides.items():
      if tok is not None:
        self._lut[ord(base)] = self._lut[ord(base.lower())] = tok
    self._lut[ord("U")] = self._lut[ord("u")] = self.T
    if self.N is not None:
      for code in "RYSWKMBDHVN":
        self._lut[ord(code)] = self._lut[ord(code.lower())] = self.N

  def __repr__(self):
    roles = {r: getattr(self, r) for r in _ROLES if getattr(self, r) is not None}
    return f"VocabTokenizer({len(self.vocab)} tokens from {self.source}, specials {roles})"

  def encode(self, sequence: str, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
    """DNA string -> int32 ids (the checkpoint's), optionally with bos/eos."""
    raw = np.frombuffer(sequence.encode("ascii", "replace"), np.uint8)
    ids = self._lut[raw]
    bad = np.flatnonzero(ids == _INVALID)
    if bad.size:
      raise ours.InvalidSequenceError(sequence[int(bad[0])], int(bad[0]))
    parts = [ids.astype(np.int32)]
    for flag, role in ((add_bos, "bos"), (add_eos, "eos")):
      if flag:
        tok = getattr(self, role)
        if tok is None:
          raise ValueError(f"{self.source}: the vocabulary has no {role} token.")
        parts.insert(0 if role == "bos" else len(parts), np.array([tok], np.int32))
    return np.concatenate(parts)

  def decode(self, ids, *, keep_specials: bool = False) -> str:
    """ids -> string; non-nucleotide tokens are dropped unless keep_specials."""
    nuc = {v: k for k, v in self.nucleotides.items() if v is not None}
    out = []
    for i in np.asarray(ids).reshape(-1).tolist():
      if i in nuc:
        out.append(nuc[i])
      elif keep_specials:
        out.append(self.id_to_token.get(i, f"<id_{i}>"))
    return "".join(out)

  def encode_batch(self, sequences: Sequence[str], *, pad_to: int | None = None):
    """Right-padded (batch, length) int32 ids and (batch,) lengths."""
    encoded = [self.encode(s) for s in sequences]
    lengths = np.array([len(e) for e in encoded], np.int32)
    width = max(pad_to or 0, int(lengths.max()) if encoded else 0)
    if self.pad is None and (lengths < width).any():
      raise ValueError(f"{self.source}: the vocabulary has no pad token; pass equal lengths.")
    tokens = np.full((len(encoded), width), self.pad or 0, np.int32)
    for row, e in zip(tokens, encoded):
      row[: len(e)] = e
    return tokens, lengths


def read_json(path: str):
  """A JSON file's contents; invalid JSON is a one-line error naming it."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e}); re-download or re-save it.") from None


def _token_content(t) -> str | None:
  if isinstance(t, str):
    return t
  if isinstance(t, Mapping):
    return t.get("content")
  return None


def _first_id(value) -> int | None:
  """A config.json token id; transformers allows a list (eos_token_id of a
  model with several stop tokens), whose first is the one to add."""
  if isinstance(value, (list, tuple)):
    value = value[0] if value else None
  return None if value is None else int(value)


def read_vocab(path: str, model_config: Mapping | None = None) -> VocabTokenizer | None:
  """The tokenizer of a Hugging Face directory, or None when it has no
  tokenizer files (tokenizer.json, vocab.json, or tokenizer_config.json with
  added_tokens_decoder or CharacterTokenizer `characters`). Raises ValueError
  naming the file when they hold no DNA vocabulary or are malformed."""
  try:
    return _read_vocab(path, model_config)
  except (KeyError, TypeError, AttributeError) as e:  # a field of an unexpected form
    raise ValueError(f"{path}: tokenizer files not understood ({e!r}).") from None


def _read_vocab(path: str, model_config: Mapping | None) -> VocabTokenizer | None:
  vocab: dict[str, int] = {}
  source = None
  role_defaults: Mapping[str, str] = {}
  tok_config_path = os.path.join(path, "tokenizer_config.json")
  tok_config = read_json(tok_config_path) if os.path.exists(tok_config_path) else {}
  tok_json = os.path.join(path, "tokenizer.json")
  data = None  # tokenizer.json's contents
  if os.path.exists(tok_json):
    data = read_json(tok_json)
    model_vocab = (data.get("model") or {}).get("vocab") or {}
    if isinstance(model_vocab, list):  # Unigram: [[token, score], ...]
      vocab.update({t[0]: i for i, t in enumerate(model_vocab)})
    else:
      vocab.update(model_vocab)
    vocab.update({t["content"]: t["id"] for t in data.get("added_tokens") or ()})
    source = tok_json
  elif os.path.exists(os.path.join(path, "vocab.json")):
    source = os.path.join(path, "vocab.json")
    vocab.update(read_json(source))
  elif tok_config.get("characters"):
    chars = [str(c) for c in tok_config["characters"]]
    vocab.update({t: i for i, t in enumerate(_CHAR_SPECIALS)})
    vocab.update({c: len(_CHAR_SPECIALS) + i for i, c in enumerate(chars)})
    role_defaults = _CHAR_ROLES
    source = (
      f"{tok_config_path} (HyenaDNA/Caduceus CharacterTokenizer, characters {''.join(chars)})"
    )
  for i, t in (tok_config.get("added_tokens_decoder") or {}).items():
    vocab.setdefault(t["content"], int(i))
    source = source or tok_config_path
  if source is None:
    return None
  model_config = model_config or {}
  specials = {}
  for role in _ROLES:
    token = _token_content(tok_config.get(f"{role}_token", role_defaults.get(role)))
    config_id = _first_id(model_config.get(f"{role}_token_id"))
    if token is not None and token in vocab:
      specials[role] = vocab[token]
    elif config_id is not None:
      specials[role] = config_id
    else:
      specials[role] = next((vocab[n] for n in _ROLE_NAMES[role] if n in vocab), None)
  if data is not None:
    add_bos, bos_from = _post_processor_bos(data, tok_json, vocab, specials, tok_config)
  else:
    add_bos = bool(tok_config.get("add_bos_token", False)) and specials.get("bos") is not None
    bos_from = f"{tok_config_path}'s add_bos_token"
  return VocabTokenizer(vocab, specials, source, add_bos=add_bos, add_bos_from=bos_from)


def _processor_ends(
  processor: Mapping, vocab: Mapping[str, int]
) -> tuple[list[int], list[int]] | None:
  """The ids a `tokenizers` post_processor puts before and after a single
  sequence, (prefix, suffix); None for a type not known here."""
  kind = processor.get("type")
  if kind == "Sequence":  # each wraps the output of the ones before it
    prefix, suffix = [], []
    for p in processor.get("processors") or ():
      inner = _processor_ends(p, vocab)
      if inner is None:
        return None
      prefix, suffix = inner[0] + prefix, suffix + inner[1]
    return prefix, suffix
  if kind in ("BertProcessing", "RobertaProcessing"):  # cls $A sep
    return [int(processor["cls"][1])], [int(processor["sep"][1])]
  if kind == "TemplateProcessing":
    special_tokens = processor.get("special_tokens") or {}
    ends, text_seen = ([], []), False
    for piece in processor.get("single") or ():
      if "SpecialToken" not in piece:  # {"Sequence": ...}: the text
        text_seen = True
        continue
      name = piece["SpecialToken"]["id"]
      ids = (special_tokens.get(name) or {}).get("ids")
      ends[text_seen].extend([int(i) for i in ids] if ids else [vocab[name]])
    return ends
  if kind == "ByteLevel":  # offsets only
    return [], []
  return None


def _post_processor_bos(
  data: Mapping,
  source: str,
  vocab: Mapping[str, int],
  specials: dict[str, int | None],
  tok_config: Mapping,
) -> tuple[bool, str]:
  """Whether a tokenizer.json tokenizer starts a sequence with bos, as
  transformers' tokenizer does: its post_processor decides (transformers
  drops tokenizer_config.json's add_bos_token when it loads a
  tokenizer.json, and with no post_processor adds nothing). The special
  token it puts first becomes specials["bos"], the token encode's add_bos
  adds. Returns (add_bos, where that was read)."""
  processor = data.get("post_processor")
  where = f"{source}'s post_processor"
  if not processor:
    if tok_config.get("add_bos_token"):
      logging.warning(
        "%s sets add_bos_token, but %s has no post_processor and transformers ignores "
        "add_bos_token beside a tokenizer.json: its tokenizer adds no bos, so neither does "
        "this one.",
        os.path.join(os.path.dirname(source), "tokenizer_config.json"),
        source,
      )
    return False, where
  ends = _processor_ends(processor, vocab)
  if ends is None:
    logging.warning(
      "%s: post_processor type %r is not known here; reading it as adding no bos.",
      source,
      processor.get("type"),
    )
    return False, where
  prefix, suffix = ends
  if suffix:
    logging.warning(
      "%s: the post_processor ends each sequence with the special token(s) %s, which scoring "
      "here does not add: the nucleotides' log-likelihoods are the same (a causal model reads "
      "no later token), but the sum over a sequence leaves out that token's, and "
      "score.pooling=last reads the last nucleotide's hidden state, not the token's.",
      source,
      suffix,
    )
  if not prefix:
    return False, where
  if len(prefix) > 1:
    logging.warning(
      "%s: the post_processor starts each sequence with %d special tokens %s; only the "
      "first is added (score.add_bos adds one token).",
      source,
      len(prefix),
      prefix,
    )
  if specials.get("bos") != prefix[0]:
    id_to_token = {i: t for t, i in vocab.items()}
    logging.warning(
      "%s: the post_processor starts each sequence with %r (id %d), not the bos token "
      "(id %s); it is taken as bos.",
      source,
      id_to_token.get(prefix[0]),
      prefix[0],
      specials.get("bos"),
    )
    specials["bos"] = prefix[0]
  return True, where


# The files write_char_tokenizer writes.
CHAR_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _char_normalizer() -> dict:
  """The `tokenizers` normalizer giving hybridna_jax.tokenizer's folding:
  lower case to upper, U to T, IUPAC ambiguity codes to N (special tokens,
  "normalized": false, are matched before it and stay as written)."""

  def replace(pattern, content):
    return {"type": "Replace", "pattern": pattern, "content": content}

  iupac = "RYSWKMBDHV"
  steps = [replace({"String": b.lower()}, b) for b in ours.NUCLEOTIDES]
  steps.append(replace({"Regex": "[Uu]"}, "T"))
  steps.append(replace({"Regex": f"[{iupac}{iupac.lower()}]"}, "N"))
  return {"type": "Sequence", "normalizers": steps}


def write_char_tokenizer(path: str) -> list[str]:
  """Writes our vocabulary (hybridna_jax.tokenizer) as a character-level
  tokenizer (CHAR_TOKENIZER_FILES): tokenizer.json (a WordLevel model over
  single characters, loadable by `tokenizers` and transformers'
  PreTrainedTokenizerFast, folding case, U and IUPAC codes as ours does),
  tokenizer_config.json and special_tokens_map.json. Returns the names.

  One difference: any other character becomes N (the model's unk_token)
  where ours raises InvalidSequenceError, as a `tokenizers` model cannot
  raise; the README's export section says so."""
  names = [ours.token_name(i) for i in range(ours.VOCAB_SIZE)]
  specials = {i for i in range(ours.VOCAB_SIZE) if not ours.A <= i <= ours.N}
  flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False}
  added = {i: {"content": names[i], **flags, "special": True} for i in sorted(specials)}
  tokenizer_json = {
    "version": "1.0",
    "truncation": None,
    "padding": None,
    "added_tokens": [{"id": i, **t} for i, t in added.items()],
    "normalizer": _char_normalizer(),
    "pre_tokenizer": {
      "type": "Split",
      "pattern": {"Regex": "."},
      "behavior": "Isolated",
      "invert": False,
    },
    "post_processor": None,
    "decoder": {"type": "Fuse"},
    "model": {"type": "WordLevel", "vocab": {n: i for i, n in enumerate(names)}, "unk_token": "N"},
  }
  roles = {
    "pad_token": "<pad>",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "sep_token": "<sep>",
    "mask_token": "<mask>",
  }
  tokenizer_config = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "model_max_length": 131_074,
    "clean_up_tokenization_spaces": False,
    **roles,
    # Keyed by id, with no "id" field (transformers warns about one).
    "added_tokens_decoder": {str(i): t for i, t in added.items()},
  }
  for name, data in zip(CHAR_TOKENIZER_FILES, (tokenizer_json, tokenizer_config, roles)):
    paths.write_json(os.path.join(path, name), data)
  return list(CHAR_TOKENIZER_FILES)
