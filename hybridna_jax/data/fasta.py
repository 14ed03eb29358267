"""Streaming FASTA reader: plain, gzip, bgzip, xz and bzip2 files.

The reader decodes a file block by block (`block_size` bytes of decompressed
text at a time), so memory stays bounded by the block size however long a
chromosome is, and encodes each block with the tokenizer's lookup table in a
single vectorised pass. It yields a `FastaHeader` when a record starts and
then the record's tokens as uint8 arrays (one or more per record, each at
most about `block_size` long):

    for item in iter_fasta("genome.fa.gz"):
      if isinstance(item, FastaHeader): ...   # a new record
      else: ...                                # uint8 (n,) token chunk

`iter_records` assembles whole records (keeping only the ones asked for),
and `read_fasta` reads a small file into memory.

Compression is detected from the file's magic bytes, not its name; bgzip is
gzip with many members and reads like gzip. Whitespace (spaces, tabs, CR and
LF, so Windows line endings too) inside sequence lines is ignored; blank
lines are allowed. Lines end in LF: carriage returns alone (classic Mac
OS) are refused. Every problem with the input raises `FastaFormatError`
naming the file and the line, with a hint on how to fix it.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import hashlib
import io
import lzma
import os
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO

import numpy as np
from absl import logging

from hybridna_jax import paths, tokenizer

DEFAULT_BLOCK_SIZE = 16 << 20
# A header line longer than this is not a header but a broken file.
_MAX_HEADER_BYTES = 1 << 20

_NL = ord("\n")
# Whitespace is dropped from sequence lines.
_WHITESPACE_BYTES = b" \t\r\n\v\f"
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[list(_WHITESPACE_BYTES)] = True
_INVALID_BYTE = b"\xff"
# File name endings of FASTA files and of the compressions read here. The
# reader tells compression from the content; names serve to find task files
# and to name sources and outputs (`strip_suffixes`).
FASTA_SUFFIXES = (".fna", ".fa", ".fasta", ".fas", ".fsa", ".ffn", ".mfa", ".seq", ".fa.txt")
COMPRESSION_SUFFIXES = (".gz", ".bgz", ".xz", ".bz2")


def _encode_table() -> bytes:
  """The tokenizer's byte -> token map as a `bytes.translate` table.

  Derived through `tokenizer.encode_bytes`, so the ids live in one place;
  bytes the tokenizer rejects map to 0xff. `bytes.translate` encodes and
  drops line breaks in one C pass, several times faster than numpy fancy
  indexing plus boolean masking.
  """
  table = bytearray(_INVALID_BYTE * 256)
  for byte in range(256):
    try:
      table[byte] = int(tokenizer.encode_bytes(bytes([byte]))[0])
    except tokenizer.InvalidSequenceError:
      pass
  return bytes(table)


_ENCODE_TABLE = _encode_table()

_MAGIC = (
  (b"\x1f\x8b", "gzip"),
  (b"\xfd7zXZ\x00", "xz"),
  (b"BZh", "bzip2"),
  (b"\x28\xb5\x2f\xfd", "zstd"),
)


class FastaFormatError(ValueError):
  """A FASTA input problem; the message names the file and the line."""

  def __init__(self, path: str, line: int | None, message: str):
    self.path = str(path)
    self.line = line
    where = f"{self.path} line {line}" if line is not None else self.path
    super().__init__(f"{where}: {message}")


@dataclasses.dataclass(frozen=True)
class FastaHeader:
  """The start of a record.

  Attributes:
    name: the first whitespace-delimited word after '>' (the record id).
    description: the rest of the header line, stripped.
    line: 1-based line number of the header in the (decompressed) file.
  """

  name: str
  description: str
  line: int


def strip_suffixes(name: str) -> str:
  """A file name without its compression and then its FASTA ending
  (case-insensitive): "E_coli.fna.gz" -> "E_coli"."""
  for suffixes in (COMPRESSION_SUFFIXES, FASTA_SUFFIXES):
    for suffix in suffixes:
      if name.lower().endswith(suffix):
        name = name[: -len(suffix)]
        break
  return name


def _kind_of(head: bytes) -> str:
  """The compression a file's first bytes show (`detect_compression`)."""
  for magic, kind in _MAGIC:
    if head.startswith(magic):
      return kind
  return "plain"


def _bgzip_head(head: bytes) -> bool:
  """Whether a file's first 14 bytes are a BGZF block's (`is_bgzip`)."""
  return head[:4] == b"\x1f\x8b\x08\x04" and head[12:14] == b"BC"


# The empty block that ends every BGZF file (htslib's bgzf.c, SAM spec 4.1.2).
BGZF_EOF = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")


def _ends_in_bgzf_eof(f: BinaryIO) -> bool:
  size = f.seek(0, os.SEEK_END)
  f.seek(max(0, size - len(BGZF_EOF)))
  return f.read() == BGZF_EOF


def detect_compression(path: str | os.PathLike) -> str:
  """Returns "plain", "gzip" (also bgzip), "xz", "bzip2" or "zstd"."""
  with paths.open_binary(path) as f:
    return _kind_of(f.read(8))


def is_bgzip(path: str | os.PathLike) -> bool:
  """Whether a gzip file is BGZF, which htslib reads at random (its first
  member's extra field is "BC")."""
  with paths.open_binary(path) as f:
    return _bgzip_head(f.read(14))


def has_bgzf_eof(path: str | os.PathLike) -> bool:
  """Whether a BGZF file ends in its end-of-file block: one cut between two
  blocks still decompresses, to a shorter sequence."""
  with paths.open_binary(path) as f:
    return _ends_in_bgzf_eof(f)


class _HashedFile:
  """A binary file whose bytes, as they are read, also go to `hasher` (the
  read/tell/close that gzip, lzma, bz2 and FastaReader use of a raw file)."""

  def __init__(self, f: BinaryIO, hasher):
    self._f, self.hasher = f, hasher

  def read(self, size: int = -1) -> bytes:
    data = self._f.read(size)
    self.hasher.update(data)
    return data

  def tell(self) -> int:
    return self._f.tell()

  def close(self) -> None:
    self._f.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def open_decompressed(path: str | os.PathLike, hasher=None) -> tuple[BinaryIO, BinaryIO, str]:
  """Opens `path` (a local path, file:// or gs:// URL) for reading its
  decompressed bytes; with `hasher` (a hashlib object), the file's bytes as
  stored also go to it as they are read.

  Returns:
    (stream, raw, kind): the decompressed stream, the underlying raw file
    (whose `tell()` gives compressed bytes consumed, for progress) and the
    compression kind.
  """
  # One open for the checks and the read (each open of a gs:// object is a
  # request).
  raw = paths.open_binary(path)
  head = raw.read(14)
  kind = _kind_of(head)
  if kind == "zstd":
    raw.close()
    raise FastaFormatError(
      path,
      None,
      "zstd-compressed files are not supported; decompress it "
      "first (zstd -d) or recompress with gzip/bgzip/xz.",
    )
  if kind == "gzip" and _bgzip_head(head) and not _ends_in_bgzf_eof(raw):
    # A warning, as htslib gives: writers before 2011 left the block out.
    logging.warning(
      "%s: no BGZF end-of-file block; the file may be truncated (an interrupted download?) "
      "and read short.",
      path,
    )
  raw.seek(0)
  if hasher is not None:
    raw = _HashedFile(raw, hasher)
  if kind == "gzip":
    stream = gzip.GzipFile(fileobj=raw, mode="rb")
  elif kind == "xz":
    stream = lzma.LZMAFile(raw, mode="rb")
  elif kind == "bzip2":
    stream = bz2.BZ2File(raw, mode="rb")
  else:
    stream = raw
  return stream, raw, kind


class FastaReader:
  """Iterates over one FASTA file; see the module docstring.

  Attributes (readable while iterating, for progress reports):
    bytes_in: compressed bytes consumed so far.
    bytes_out: decompressed bytes consumed so far.
    line: number of complete lines consumed so far.
    sha256: with digest=True, the hex SHA-256 of the file's bytes as stored
      (as `sha256sum` gives it) once the file was read to its end (None
      before), computed from the same read.
  """

  def __init__(
    self,
    path: str | os.PathLike,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    allow_empty_records: bool = False,
    digest: bool = False,
  ):
    if block_size < 1:
      raise ValueError(f"block_size must be positive, got {block_size}.")
    self.path = os.fspath(path)
    self.block_size = block_size
    self.allow_empty_records = allow_empty_records
    self.bytes_in = 0
    self.bytes_out = 0
    self.line = 0
    self.digest = digest
    self.sha256: str | None = None

  def __iter__(self) -> Iterator[FastaHeader | np.ndarray]:
    hasher = hashlib.sha256() if self.digest else None
    stream, raw, kind = open_decompressed(self.path, hasher)
    with stream, raw:
      yield from self._parse(stream, raw, kind)
      if hasher is not None:
        while raw.read(1 << 20):  # bytes past the decompressor's end, if any
          pass
        self.sha256 = hasher.hexdigest()

  def _read(self, stream: BinaryIO, raw: BinaryIO, kind: str) -> bytes:
    try:
      data = stream.read(self.block_size)
    except (EOFError, OSError, zlib.error, lzma.LZMAError) as e:
      raise FastaFormatError(
        self.path,
        self.line + 1,
        f"the {kind} stream is truncated or corrupt ({e}); the file was "
        "probably cut short while downloading or copying: fetch it "
        "again.",
      ) from None
    self.bytes_in = raw.tell()
    self.bytes_out += len(data)
    return data

  def _parse(self, stream, raw, kind) -> Iterator[FastaHeader | np.ndarray]:
    carry = b""  # an incomplete header line from the last buffer
    at_line_start = True  # whether the next buffer starts a line
    column = 0  # bytes of the current line in earlier buffers
    pending = None  # header of the record being read
    pending_len = 0  # tokens of `pending` seen so far
    header_yielded = False
    seen_header = False
    eof = False
    first_block = True
    while not eof:
      data = self._read(stream, raw, kind)
      eof = not data
      if first_block:
        # A UTF-8 byte-order mark, as some Windows editors write, is not data.
        data, first_block = data.removeprefix(b"\xef\xbb\xbf"), False
      if eof and not carry:
        break
      buf = carry + data if carry else data
      carry = b""
      # Header lines: '>' at a line start (bytes.find is a fast memchr, and
      # '>' is rare elsewhere).
      headers = []  # (start, end) with buf[end] the newline or len(buf)
      i = buf.find(b">")
      while i >= 0:
        if (i == 0 and at_line_start) or (i > 0 and buf[i - 1] == _NL):
          end = buf.find(b"\n", i)
          if end < 0:
            if not eof:
              carry = buf[i:]
              if len(carry) > _MAX_HEADER_BYTES:
                raise FastaFormatError(
                  self.path,
                  self.line + 1 + buf.count(b"\n", 0, i),
                  f"header line longer than {_MAX_HEADER_BYTES} bytes; this "
                  "is not a FASTA file, or its line breaks are missing.",
                )
              buf = buf[:i]
              break
            end = len(buf)
          headers.append((i, end))
          i = buf.find(b">", end)
        else:
          i = buf.find(b">", i + 1)
      # Segment k holds the sequence bytes after header k-1; segment 0
      # continues the record pending from earlier buffers.
      bounds = [0]
      for h, e in headers:
        bounds += [h, e]
      bounds.append(len(buf))
      for k in range(len(bounds) // 2):
        if k:
          h, e = headers[k - 1]
          if pending is not None and pending_len == 0:
            self._empty_record(pending)
          pending = self._header(buf, h, e, self.line + 1 + buf.count(b"\n", 0, h))
          pending_len, header_yielded, seen_header = 0, False, True
        lo, hi = bounds[2 * k], bounds[2 * k + 1]
        if lo == hi:
          continue
        raw_seq = buf if (lo, hi) == (0, len(buf)) else buf[lo:hi]
        seq = raw_seq.translate(_ENCODE_TABLE, _WHITESPACE_BYTES)
        if not seq:
          continue
        bad = seq.find(_INVALID_BYTE)
        if bad >= 0 or pending is None:
          self._raise_bad_sequence(
            buf, lo, raw_seq, max(bad, 0), pending, pending_len, at_line_start, column
          )
        if not header_yielded:
          header_yielded = True
          yield pending
        pending_len += len(seq)
        yield np.frombuffer(seq, dtype=np.uint8)
      # Advance the line and column counters past this buffer.
      n_lines = buf.count(b"\n")
      if n_lines:
        self.line += n_lines
        column = len(buf) - buf.rfind(b"\n") - 1
      else:
        column += len(buf)
      if carry:
        at_line_start = True
      elif buf:
        at_line_start = buf[-1] == _NL
    if self.bytes_out == 0:
      raise FastaFormatError(
        self.path,
        None,
        "the file is empty (0 bytes of text); remove it from the inputs or fetch it again.",
      )
    if not seen_header:
      raise FastaFormatError(
        self.path, None, "no FASTA header ('>name' line) in the file; is this a FASTA file?"
      )
    if pending is not None and pending_len == 0:
      self._empty_record(pending)

  def _raise_bad_sequence(
    self,
    buf: bytes,
    lo: int,
    raw_seq: bytes,
    kept_index: int,
    pending: FastaHeader | None,
    pending_len: int,
    at_line_start: bool,
    column: int,
  ):
    """Raises for the `kept_index`-th sequence byte of `raw_seq`.

    That byte is an invalid character, or (with no `pending` header) the
    first sequence byte before any header. The slow path: only on errors.
    """
    raw = np.frombuffer(raw_seq, dtype=np.uint8)
    pos = lo + int(np.flatnonzero(~_WHITESPACE[raw])[kept_index])
    line = self.line + 1 + buf.count(b"\n", 0, pos)
    line_start = buf.rfind(b"\n", 0, pos) + 1
    col = pos - line_start + 1 + (column if line_start == 0 and not at_line_start else 0)
    if pending is None:
      raise FastaFormatError(
        self.path,
        line,
        "sequence data before the first header; a FASTA "
        "record starts with a '>name' line (is this a FASTA file?).",
      )
    error = tokenizer.InvalidSequenceError(
      chr(buf[pos]), pending_len + kept_index, f"record '{pending.name}', column {col}"
    )
    raise FastaFormatError(self.path, line, str(error)) from error

  def _header(self, buf: bytes, start: int, end: int, line: int) -> FastaHeader:
    text = buf[start + 1 : end].decode("utf-8", "replace").strip()
    if "\r" in text:  # CRLF ends in '\r\n' (stripped): this line goes on after a '\r'
      raise FastaFormatError(
        self.path,
        line,
        "line breaks are carriage returns alone (classic Mac OS); convert them, e.g. "
        "tr '\\r' '\\n' < in.fa > out.fa.",
      )
    parts = text.split(None, 1)
    if not parts:
      raise FastaFormatError(
        self.path, line, "header with no name ('>' alone); give every record a name, e.g. '>chr1'."
      )
    return FastaHeader(parts[0], parts[1] if len(parts) > 1 else "", line)

  def _empty_record(self, header: FastaHeader):
    message = (
      f"header '>{header.name}' has no sequence (the next line is "
      "another header or the end of the file)"
    )
    if not self.allow_empty_records:
      raise FastaFormatError(
        self.path,
        header.line,
        message + "; remove the record, or set data.allow_empty_records=True to skip such records.",
      )
    logging.warning("%s line %d: %s; skipped.", self.path, header.line, message)


def iter_fasta(
  path: str | os.PathLike,
  *,
  block_size: int = DEFAULT_BLOCK_SIZE,
  allow_empty_records: bool = False,
) -> Iterator[FastaHeader | np.ndarray]:
  """Streams one FASTA file: a `FastaHeader` per record, then its tokens.

  Args:
    path: a plain, gzip, bgzip, xz or bzip2 FASTA file.
    block_size: decompressed bytes read and encoded at a time; bounds memory.
    allow_empty_records: skip records with no sequence (with a warning)
      instead of raising.

  Yields:
    `FastaHeader` at each record start, then uint8 (n,) token chunks of that
    record (ids from `hybridna_jax.tokenizer`), in file order.
  """
  return iter(FastaReader(path, block_size=block_size, allow_empty_records=allow_empty_records))


def iter_records(
  path: str | os.PathLike,
  *,
  keep: Callable[[str], bool] | None = None,
  max_tokens: int = 0,
  **kwargs,
) -> Iterator[tuple[FastaHeader, np.ndarray | None]]:
  """Streams one FASTA file record by record.

  Args:
    path: as for `iter_fasta`; `kwargs` go to it too.
    keep: which records (by name) to hold; the sequence of the others is
      dropped as it streams, so a few chromosomes can be read from a whole
      genome without holding it. None keeps all.
    max_tokens: when > 0, only the first `max_tokens` tokens of each record
      are held (the rest is read, checked and dropped).

  Yields:
    (header, uint8 (length,) tokens) per record in file order; tokens is
    None for a record `keep` rejected.
  """
  header, wanted, chunks, held = None, False, [], 0
  for item in iter_fasta(path, **kwargs):
    if isinstance(item, FastaHeader):
      if header is not None:
        yield header, _concat(chunks) if wanted else None
      header, chunks, held = item, [], 0
      wanted = keep is None or keep(item.name)
    elif wanted and not (max_tokens and held >= max_tokens):
      if max_tokens:
        item = item[: max_tokens - held]
      chunks.append(item)
      held += len(item)
  if header is not None:
    yield header, _concat(chunks) if wanted else None


def read_fasta(path: str | os.PathLike, **kwargs) -> list[tuple[FastaHeader, np.ndarray]]:
  """Reads a whole (small) FASTA file into memory.

  Returns:
    [(header, uint8 (length,) tokens)] in file order.
  """
  return list(iter_records(path, **kwargs))


def _concat(chunks: list[np.ndarray]) -> np.ndarray:
  if not chunks:
    return np.zeros((0,), np.uint8)
  return np.concatenate(chunks) if len(chunks) > 1 else chunks[0].copy()


def write_fasta(
  path: str | os.PathLike,
  records: list[tuple[str, str]],
  *,
  width: int = 60,
  compress: str | None = None,
) -> None:
  """Writes `(name, sequence)` records (for tests and examples).

  Args:
    path: output file.
    records: record names (with optional description after a space) and
      DNA strings.
    width: line width of the sequence lines.
    compress: None, "gzip" or "xz".
  """
  out = io.BytesIO()
  for name, seq in records:
    out.write(f">{name}\n".encode())
    for i in range(0, len(seq), width):
      out.write(seq[i : i + width].encode("ascii"))
      out.write(b"\n")
  data = out.getvalue()
  if compress == "gzip":
    data = gzip.compress(data)
  elif compress == "xz":
    data = lzma.compress(data)
  elif compress is not None:
    raise ValueError(f"unknown compression {compress!r}")
  with open(path, "wb") as f:
    f.write(data)
