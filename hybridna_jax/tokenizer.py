"""Single-nucleotide tokenizer.

Vocabulary (ids are stable: token stores on disk hold them as uint8):

    0 <pad>   1 <bos>   2 <eos>   3 <sep>   4 <mask>
    5 A   6 C   7 G   8 T   9 N
    10 .. 127  reserved task/prompt tokens <task_0> .. <task_117>

Input handling: soft-masked (lower-case) bases fold to upper case, IUPAC
ambiguity codes (R Y S W K M B D H V, and U -> T as RNA) map to N, and any
other character raises `InvalidSequenceError` naming the character and its
position. Encoding is vectorised through a 256-entry lookup table, so it runs
at memory speed on whole chromosomes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

PAD, BOS, EOS, SEP, MASK = 0, 1, 2, 3, 4
A, C, G, T, N = 5, 6, 7, 8, 9
NUCLEOTIDES = "ACGTN"
NUM_SPECIAL = 5
FIRST_TASK_TOKEN = 10
VOCAB_SIZE = 128
NUM_TASK_TOKENS = VOCAB_SIZE - FIRST_TASK_TOKEN

SPECIAL_NAMES = ("<pad>", "<bos>", "<eos>", "<sep>", "<mask>")

_INVALID = 255

# Byte -> token lookup table. Unlisted bytes stay _INVALID.
_ENCODE_LUT = np.full(256, _INVALID, dtype=np.uint8)
for _base, _tok in zip("ACGTN", (A, C, G, T, N)):
  _ENCODE_LUT[ord(_base)] = _tok
  _ENCODE_LUT[ord(_base.lower())] = _tok
_ENCODE_LUT[ord("U")] = _ENCODE_LUT[ord("u")] = T
for _code in "RYSWKMBDHV":
  _ENCODE_LUT[ord(_code)] = _ENCODE_LUT[ord(_code.lower())] = N

# Token -> character for decoding.
_DECODE_CHARS = np.array(["?"] * VOCAB_SIZE, dtype="<U1")
for _base, _tok in zip("ACGTN", (A, C, G, T, N)):
  _DECODE_CHARS[_tok] = _base

# Token -> complementary token; identity on N and every non-nucleotide.
COMPLEMENT = np.arange(VOCAB_SIZE, dtype=np.int32)
COMPLEMENT[[A, C, G, T]] = [T, G, C, A]


class InvalidSequenceError(ValueError):
  """A character outside the DNA alphabet (A C G T N, IUPAC codes, any case)."""

  def __init__(self, char: str, position: int, context: str = ""):
    self.char = char
    self.position = position
    where = f"{context}: " if context else ""
    super().__init__(
      f"{where}invalid nucleotide {char!r} at position {position} "
      "(allowed: A C G T N, IUPAC ambiguity codes R Y S W K M B D H V, "
      "U, in either case); remove or replace it, e.g. with N."
    )


def task_token(index: int) -> int:
  """Id of the `index`-th reserved task/prompt token."""
  if not 0 <= index < NUM_TASK_TOKENS:
    raise ValueError(f"task token index {index} out of range [0, {NUM_TASK_TOKENS}).")
  return FIRST_TASK_TOKEN + index


def encode_bytes(
  data: bytes | bytearray | memoryview | np.ndarray, context: str = "", offset: int = 0
) -> np.ndarray:
  """ASCII bytes -> uint8 token ids (no specials added).

  Args:
    data: raw sequence bytes (no newlines).
    context: prefix for error messages, e.g. "genome.fa line 12".
    offset: added to the reported position (for streamed chunks).
  """
  raw = (
    np.frombuffer(data, dtype=np.uint8)
    if not isinstance(data, np.ndarray)
    else data.astype(np.uint8, copy=False)
  )
  tokens = _ENCODE_LUT[raw]
  bad = np.flatnonzero(tokens == _INVALID)
  if bad.size:
    i = int(bad[0])
    raise InvalidSequenceError(chr(raw[i]), offset + i, context)
  return tokens


def encode(
  sequence: str, *, add_bos: bool = False, add_eos: bool = False, context: str = ""
) -> np.ndarray:
  """DNA string -> int32 token ids, optionally wrapped in <bos> ... <eos>.
  `context` prefixes the error message (e.g. "sequence")."""
  try:
    data = sequence.encode("ascii")
  except UnicodeEncodeError as e:
    raise InvalidSequenceError(sequence[e.start], e.start, context) from None
  body = encode_bytes(data, context).astype(np.int32)
  parts = (
    ([np.array([BOS], np.int32)] if add_bos else [])
    + [body]
    + ([np.array([EOS], np.int32)] if add_eos else [])
  )
  return np.concatenate(parts) if len(parts) > 1 else body


def decode(tokens: Iterable[int] | np.ndarray, *, keep_specials: bool = False) -> str:
  """Token ids -> string. Specials and task tokens are dropped unless
  `keep_specials`, in which case they render as their names."""
  tokens = np.asarray(tokens).reshape(-1)
  if keep_specials:
    return "".join(token_name(int(t)) for t in tokens)
  nuc = tokens[(tokens >= A) & (tokens <= N)]
  return "".join(_DECODE_CHARS[nuc].tolist())


def token_name(token: int) -> str:
  if token < NUM_SPECIAL:
    return SPECIAL_NAMES[token]
  if token <= N:
    return NUCLEOTIDES[token - A]
  if token < VOCAB_SIZE:
    return f"<task_{token - FIRST_TASK_TOKEN}>"
  raise ValueError(f"token id {token} outside the vocabulary (size {VOCAB_SIZE})")


def is_nucleotide(tokens):
  """Elementwise mask of A/C/G/T/N tokens (numpy or jax arrays)."""
  return (tokens >= A) & (tokens <= N)


def encode_batch(
  sequences: Sequence[str],
  *,
  add_bos: bool = False,
  add_eos: bool = False,
  pad_to: int | None = None,
  pad_to_multiple: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
  """Encodes and right-pads a batch.

  Returns:
    tokens: int32 (batch, length), padded with <pad>.
    lengths: int32 (batch,), tokens per row before padding.
  """
  encoded = [encode(s, add_bos=add_bos, add_eos=add_eos) for s in sequences]
  lengths = np.array([len(e) for e in encoded], np.int32)
  width = int(lengths.max()) if len(encoded) else 0
  if pad_to is not None:
    if pad_to < width:
      raise ValueError(
        f"pad_to={pad_to} is shorter than the longest "
        f"sequence ({width} tokens); raise pad_to or truncate."
      )
    width = pad_to
  width = -(-width // pad_to_multiple) * pad_to_multiple
  tokens = np.full((len(encoded), width), PAD, np.int32)
  for row, e in zip(tokens, encoded):
    row[: len(e)] = e
  return tokens, lengths


def reverse_complement(sequence: str) -> str:
  """Reverse complement of a DNA string; case is kept, IUPAC codes other
  than A/C/G/T/U (and N) become N."""
  encode(sequence)  # validates, naming the bad character's position in the input
  table = str.maketrans("ACGTUacgtuRYSWKMBDHVryswkmbdhv", "TGCAAtgcaaNNNNNNNNNNnnnnnnnnnn")
  return sequence.translate(table)[::-1]


def reverse_complement_nucleotides(tokens: np.ndarray) -> np.ndarray:
  """Reverse complement of a 1-D array of nucleotide tokens only (A C G T N;
  N stays N), in the input's dtype. For rows with special tokens or
  padding, use `reverse_complement_tokens`."""
  return COMPLEMENT[np.asarray(tokens)[::-1]].astype(np.asarray(tokens).dtype)


def reverse_complement_tokens(tokens, xp=np):
  """Reverse-complements the nucleotides of each row; specials stay in place.

  Works for (..., length) numpy or jax arrays (pass `xp=jnp`). Nucleotides are
  reversed among the nucleotide positions of their own row, so
  [<bos> A C G <eos> <pad>] -> [<bos> C G T <eos> <pad>], and left- or
  right-padded rows both come out right.
  """
  tokens = xp.asarray(tokens)
  nuc = is_nucleotide(tokens)
  count = nuc.sum(axis=-1, keepdims=True)
  rank = xp.cumsum(nuc, axis=-1) - 1
  # Positions of the nucleotides of each row, in order, followed by the rest.
  nuc_positions = xp.argsort(~nuc, axis=-1, stable=True)
  source_rank = xp.clip(count - 1 - rank, 0, tokens.shape[-1] - 1)
  source = xp.take_along_axis(nuc_positions, source_rank, axis=-1)
  flipped = xp.take_along_axis(tokens, source, axis=-1)
  complement = xp.asarray(COMPLEMENT)[flipped]
  return xp.where(nuc, complement, tokens).astype(tokens.dtype)
