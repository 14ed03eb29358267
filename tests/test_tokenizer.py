import jax.numpy as jnp
import numpy as np
import pytest

from hybridna_jax import tokenizer as tok


def test_roundtrip_and_ids():
  ids = tok.encode("ACGTN")
  assert ids.tolist() == [tok.A, tok.C, tok.G, tok.T, tok.N]
  assert tok.decode(ids) == "ACGTN"
  wrapped = tok.encode("AC", add_bos=True, add_eos=True)
  assert wrapped.tolist() == [tok.BOS, tok.A, tok.C, tok.EOS]
  assert tok.decode(wrapped) == "AC"
  assert tok.decode(wrapped, keep_specials=True) == "<bos>AC<eos>"


def test_soft_mask_and_iupac():
  assert tok.decode(tok.encode("acgtn")) == "ACGTN"
  assert tok.decode(tok.encode("RYSWKMBDHVryswkmbdhv")) == "N" * 20
  assert tok.decode(tok.encode("u")) == "T"


@pytest.mark.parametrize(
  "seq,char,pos", [("ACGX", "X", 3), ("A-C", "-", 1), ("AC GT", " ", 2), ("ACé", "é", 2)]
)
def test_invalid_character_named_with_position(seq, char, pos):
  with pytest.raises(tok.InvalidSequenceError) as e:
    tok.encode(seq)
  assert e.value.char == char and e.value.position == pos
  assert repr(char) in str(e.value) and f"position {pos}" in str(e.value)


def test_encode_bytes_context_and_offset():
  with pytest.raises(tok.InvalidSequenceError, match=r"g.fa line 3: .*position 105"):
    tok.encode_bytes(b"ACGT!", context="g.fa line 3", offset=101)


def test_task_tokens():
  assert tok.task_token(0) == tok.FIRST_TASK_TOKEN
  assert tok.task_token(tok.NUM_TASK_TOKENS - 1) == tok.VOCAB_SIZE - 1
  assert tok.token_name(tok.task_token(3)) == "<task_3>"
  with pytest.raises(ValueError):
    tok.task_token(tok.NUM_TASK_TOKENS)


def test_encode_batch_pads_and_reports_lengths():
  tokens, lengths = tok.encode_batch(["ACG", "A", ""], add_bos=True, pad_to_multiple=4)
  assert tokens.shape == (3, 4) and lengths.tolist() == [4, 2, 1]
  assert tokens[1].tolist() == [tok.BOS, tok.A, tok.PAD, tok.PAD]
  with pytest.raises(ValueError, match="pad_to"):
    tok.encode_batch(["ACGT"], pad_to=2)


def test_reverse_complement_string():
  assert tok.reverse_complement("AACGTN") == "NACGTT"
  assert tok.reverse_complement("acgR") == "Ncgt"
  assert tok.reverse_complement("aCgT") == "AcGt"
  # A bad character is named at its place in the input, not in the output.
  for text, char, position in (("ACGTX", "X", 4), ("ACGTé", "é", 4)):
    with pytest.raises(tok.InvalidSequenceError, match=f"'{char}' at position {position}"):
      tok.reverse_complement(text)


@pytest.mark.parametrize("xp", [np, jnp])
def test_reverse_complement_tokens_keeps_specials_in_place(xp):
  rows = [
    [tok.BOS, tok.A, tok.C, tok.G, tok.EOS, tok.PAD],
    [tok.PAD, tok.PAD, tok.task_token(2), tok.A, tok.A, tok.N],
  ]
  out = np.asarray(tok.reverse_complement_tokens(xp.array(rows), xp=xp))
  assert out[0].tolist() == [tok.BOS, tok.C, tok.G, tok.T, tok.EOS, tok.PAD]
  assert out[1].tolist() == [tok.PAD, tok.PAD, tok.task_token(2), tok.N, tok.T, tok.T]
  # An involution.
  back = np.asarray(tok.reverse_complement_tokens(xp.array(out), xp=xp))
  assert back.tolist() == rows


def test_reverse_complement_tokens_matches_string():
  rng = np.random.default_rng(0)
  seq = "".join(rng.choice(list("ACGTN"), 101))
  assert tok.decode(tok.reverse_complement_tokens(tok.encode(seq))) == tok.reverse_complement(seq)
