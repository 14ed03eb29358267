"""Hugging Face interop against PyTorch transformers (CPU): BambaForCausalLM
checkpoints load with the reference's logits, our models export to it, a
bad checkpoint lists every problem, and a Jamba-style HybriDNA-named
checkpoint with a 12-token vocabulary loads and scores like the Bamba one."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from launch_env import launch_env
from safetensors import safe_open
from safetensors.numpy import save_file

from hybridna_jax import hf, paths, restore, sharding
from hybridna_jax import tokenizer as our_tokenizer
from hybridna_jax.config import ModelConfig, load_config
from hybridna_jax.model import create_model
from hybridna_jax.scoring.scorer import Scorer
from hybridna_jax.train import checkpoint as train_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SEQ = "ACGTTGCAAGGCTTAACGTANNGCATTACGGA"


def _bamba(vocab=16, layers=3, attn=(1,), groups=1, kv_heads=2, seed=0, **fields):
  """A random-weight BambaForCausalLM (every parameter random, norms near 1);
  `fields` override config fields, None leaves one out (its default)."""
  args = dict(
    vocab_size=vocab,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=layers,
    num_attention_heads=4,
    num_key_value_heads=kv_heads,
    head_dim=16,
    attn_layer_indices=list(attn),
    mamba_n_heads=4,
    mamba_d_head=16,
    mamba_n_groups=groups,
    mamba_d_state=8,
    mamba_chunk_size=8,
    pad_token_id=0,
  )
  args.update(fields)
  config = transformers.BambaConfig(**{k: v for k, v in args.items() if v is not None})
  torch.manual_seed(seed)
  model = transformers.BambaForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(("norm.weight", "layernorm.weight")):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif name.endswith("A_log"):
        p.copy_(torch.log(torch.empty_like(p).uniform_(1, 8)))
      else:
        p.copy_(0.3 * torch.randn_like(p))
  return model


def _torch_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids)), use_cache=False).logits.float().numpy()


def _ours(model, ids):
  return np.asarray(jax.jit(lambda m, x: m(x).logits)(model, jnp.asarray(ids)))


def _rel(a, b):
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize(
  "attn, groups, kv_heads, shard, on_mesh",
  [
    ((1,), 1, 2, False, False),  # GQA, one group
    ((0, 2), 2, 1, True, True),  # two attention layers, MQA, 2 groups, sharded index, 2x2 mesh
    ((), 2, 4, False, False),  # Mamba2 only, MHA layout unused
  ],
)
def test_bamba_checkpoint_gives_transformers_logits(
  tmp_path, attn, groups, kv_heads, shard, on_mesh
):
  ref = _bamba(attn=attn, groups=groups, kv_heads=kv_heads)
  ref.save_pretrained(tmp_path, max_shard_size="20KB" if shard else "5GB")
  assert os.path.exists(tmp_path / "model.safetensors.index.json") == shard
  ids = np.random.RandomState(1).randint(0, 16, (2, 21))
  mesh = sharding.make_mesh(fsdp=2, tensor=2, devices=jax.devices()[:4]) if on_mesh else None
  model, tok, config = restore.load(str(tmp_path), dtype="float32", mesh=mesh, our_vocab=None)
  assert config.model.attn_layers == attn and config.model.ngroups == groups
  assert tok is None  # save_pretrained of a bare model writes no tokenizer
  assert _rel(_ours(model, ids), _torch_logits(ref, ids)) <= 1e-4
  if on_mesh:
    kernel = model.layers[0].mixer.q.kernel[...]
    assert kernel.sharding.mesh.shape["tensor"] == 2 and len(kernel.sharding.device_set) == 4


def test_bf16_checkpoint(tmp_path):
  ref = _bamba().to(torch.bfloat16)
  ref.save_pretrained(tmp_path)
  ids = np.random.RandomState(2).randint(0, 16, (1, 24))
  with safe_open(str(tmp_path / "model.safetensors"), framework="np") as f:
    assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
  model, _, _ = restore.load(str(tmp_path), dtype="bfloat16", our_vocab=None)
  assert model.embed[...].dtype == jnp.bfloat16
  # bf16 activations cannot match fp32 math closely (transformers' own bf16
  # forward is 0.10 away here): ours may be as far as that, with a margin.
  torch_bf16 = _torch_logits(ref, ids)
  expected = _torch_logits(ref.float(), ids)  # the same bf16 weights, fp32 math
  assert _rel(_ours(model, ids), expected) <= max(5e-2, 1.25 * _rel(torch_bf16, expected))


@pytest.mark.parametrize("rope", [False, True])
def test_export_loads_in_transformers_with_our_logits(tmp_path, rope):
  cfg = ModelConfig.from_config(load_config("configs/tiny.py").model)
  if rope:
    cfg = ModelConfig.from_config({**cfg.to_dict(), "rope": True, "rope_fraction": 0.5})
  model = create_model(cfg, seed=3)
  hf.export(model, str(tmp_path), max_shard_bytes=40_000)  # several shards
  assert os.path.exists(tmp_path / "model.safetensors.index.json")
  theirs = transformers.BambaForCausalLM.from_pretrained(str(tmp_path)).eval()
  ids = our_tokenizer.encode(SEQ, add_bos=True)[None]
  assert _rel(_torch_logits(theirs, ids), _ours(model, ids)) <= 1e-4
  # The character-level tokenizer gives our ids, in transformers and here.
  fast = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
  assert fast(SEQ, add_special_tokens=False)["input_ids"] == our_tokenizer.encode(SEQ).tolist()
  assert fast.pad_token_id == our_tokenizer.PAD
  # And it round-trips through our loader.
  back, tok, _ = restore.load(str(tmp_path))
  assert tok is our_tokenizer
  assert _rel(_ours(back, ids), _ours(model, ids)) <= 1e-5


def test_a_repeating_bamba_pattern_scans(tmp_path):
  """Attention at layers 1 and 3 of 4 repeats every 2 layers: the import's
  attn_period says so, and scan_layers stacks blocks of 2 (review: Bamba
  kept the default period 8, and scan_layers fell back to the loop)."""
  ref = _bamba(layers=4, attn=(1, 3))
  ref.save_pretrained(tmp_path)
  ids = np.random.RandomState(1).randint(0, 16, (2, 21))
  model, _, config = restore.load(str(tmp_path), dtype="float32", our_vocab=None, scan_layers=True)
  assert config.model.attn_period == 2 and "scanned_layers" in nnx.state(model)
  assert _rel(_ours(model, ids), _torch_logits(ref, ids)) <= 1e-4


def test_bad_checkpoint_lists_every_problem(tmp_path):
  _bamba().save_pretrained(tmp_path)
  path = str(tmp_path / "model.safetensors")
  with safe_open(path, framework="np") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  tensors["model.layers.0.mamba.extra_scale"] = np.ones(3, np.float32)
  del tensors["model.layers.1.self_attn.q_proj.weight"]
  del tensors["model.final_layernorm.weight"]
  tensors["model.layers.2.feed_forward.up_proj.weight"] = np.ones((47, 32), np.float32)
  save_file(tensors, path, metadata={"format": "pt"})
  with pytest.raises(hf.HFCheckpointError) as e:
    restore.load(str(tmp_path))
  message = str(e.value)
  for expected in (
    "1 tensors no parameter maps to",
    "model.layers.0.mamba.extra_scale",
    "2 parameters missing",
    "model.layers.1.self_attn.q_proj.weight",
    "model.final_layernorm.weight",
    "1 shape mismatches",
    "model.layers.2.feed_forward.up_proj.weight: (47, 32) in the checkpoint, (48, 32) expected",
  ):
    assert expected in message


def test_pytorch_weights_only_say_how_to_resave(tmp_path):
  _bamba().config.save_pretrained(tmp_path)
  (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")  # never read
  for load in (restore.load, hf.load):
    with pytest.raises(hf.HFCheckpointError, match=r"PyTorch weights \(pytorch_model.bin\)"):
      load(str(tmp_path))
  with pytest.raises(hf.HFCheckpointError, match=r"save_pretrained\(dir, safe_serialization=True"):
    restore.find_checkpoint(str(tmp_path))  # the launchers' lookup


def test_weights_without_config_json_are_named(tmp_path):
  _bamba().save_pretrained(tmp_path)
  os.remove(tmp_path / "config.json")  # an incomplete download
  with pytest.raises(hf.HFCheckpointError, match=r"holds model.safetensors but no config.json"):
    restore.find_checkpoint(str(tmp_path))  # the launchers' lookup


def test_weights_of_another_type_are_named(tmp_path):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top

  _bamba().save_pretrained(tmp_path)
  weights = load_file(tmp_path / "model.safetensors")
  weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"].astype(np.int64)
  save_file(weights, tmp_path / "model.safetensors")
  with pytest.raises(hf.HFCheckpointError, match=r"embed_tokens.weight holds I64, not floating"):
    hf.load(str(tmp_path))


def test_truncated_shard_is_named(tmp_path):
  _bamba().save_pretrained(tmp_path, max_shard_size="20KB")
  shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
  shard.write_bytes(shard.read_bytes()[:100])  # an interrupted download
  with pytest.raises(hf.HFCheckpointError, match=rf"^{shard}: not a readable safetensors file"):
    hf.load(str(tmp_path))


def test_shards_without_their_index_or_a_named_shard_are_named(tmp_path):
  """Review: shards whose index was not downloaded read as no Hugging Face
  directory (restore.load blamed a missing checkpoints/, hf.load asked for
  a model.safetensors that never existed); a shard the index names but the
  download lacks was a FileNotFoundError."""
  _bamba().save_pretrained(tmp_path, max_shard_size="20KB")
  index = tmp_path / "model.safetensors.index.json"
  saved = index.read_text()
  index.unlink()
  no_index = rf"^{re.escape(str(tmp_path))} holds sharded safetensors \(model-00001-of-\d+"
  no_index += r"\.safetensors, \.\.\.\) but no model\.safetensors\.index\.json.*download it too"
  for load in (restore.load, hf.load, restore.find_checkpoint):  # the last: the launchers'
    with pytest.raises(hf.HFCheckpointError, match=no_index):
      load(str(tmp_path))
  index.write_text(saved)
  shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
  shard.unlink()
  with pytest.raises(hf.HFCheckpointError, match=rf"^{re.escape(str(shard))} is missing.*again"):
    restore.load(str(tmp_path))


def test_unsupported_setting_is_named(tmp_path):
  _bamba().save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  config.update(hidden_act="gelu", time_step_limit=[0.0, 0.1])
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(hf.HFCheckpointError, match="hidden_act='gelu'.*\n.*time_step_limit"):
    restore.load(str(tmp_path))


def test_unreadable_config_or_index_is_named(tmp_path):
  _bamba().save_pretrained(tmp_path, max_shard_size="20KB")
  config, index = tmp_path / "config.json", tmp_path / "model.safetensors.index.json"
  index.write_text('{"metadata": {}}')
  with pytest.raises(hf.HFCheckpointError, match=rf'^{index}: no "weight_map"'):
    hf.load(str(tmp_path))
  config.write_text('{"model_type": "bamba",}')  # a trailing comma
  with pytest.raises(ValueError, match=rf"^{config}: not valid JSON"):
    hf.load(str(tmp_path))


# A 12-token byte-level DNA vocabulary, nucleotides not in our order.
_VOCAB12 = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[BOS]", "[EOS]"] + list("TGCAN")


def _jamba_dir(tmp_path, groups=1):
  """A HybriDNA Jamba-style checkpoint synthesised from the naming table,
  with the tensors of a Bamba model whose RoPE is made the identity (Jamba's
  attention has none). Returns (reference torch model, directory)."""
  ref = _bamba(vocab=12, layers=4, attn=(2,), groups=groups)
  ref.model.rotary_emb.inv_freq.zero_()  # angle 0 everywhere: no rotation
  bamba_dir = tmp_path / "bamba"
  ref.save_pretrained(bamba_dir)
  hybridna_dir = tmp_path / "hybridna"
  hybridna_dir.mkdir()
  hf_config = json.loads((bamba_dir / "config.json").read_text())
  config = {
    "architectures": ["HybriDNAForCausalLM"],
    "model_type": "hybridna",
    "use_mamba_kernels": True,
    "attn_layer_period": 4,
    "attn_layer_offset": 2,
    "num_experts": 1,
    "mamba_headdim": 16,
    **{
      k: hf_config[k]
      for k in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "mamba_d_state",
        "mamba_d_conv",
        "mamba_expand",
        "tie_word_embeddings",
      )
    },
    "some_future_field": 1,
  }
  (hybridna_dir / "config.json").write_text(json.dumps(config))
  files = hf.read_files(str(bamba_dir))
  cfg = ModelConfig.from_config(
    {"vocab_size": 12, "d_model": 32, "n_layers": 4, "attn_layers": (2,), "mlp_dim": 48}
    | {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "d_state": 8, "ssm_head_dim": 16}
    | {"ngroups": groups}
  )
  tensors = {}
  with safe_open(files.files["lm_head.weight"], framework="np") as f:
    for ours, theirs in zip(hf.HYBRIDNA_JAMBA.tensor_specs(cfg), hf.BAMBA.tensor_specs(cfg)):
      tensors[ours] = f.get_tensor(theirs)
  save_file(tensors, str(hybridna_dir / "model.safetensors"), metadata={"format": "pt"})
  added = [{"id": i, "content": t, "special": True} for i, t in enumerate(_VOCAB12) if "[" in t]
  tokenizer_json = {
    "added_tokens": added,
    "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(_VOCAB12)}, "merges": []},
  }
  (hybridna_dir / "tokenizer.json").write_text(json.dumps(tokenizer_json))
  (hybridna_dir / "tokenizer_config.json").write_text(
    json.dumps({"pad_token": "[PAD]", "bos_token": "[BOS]", "eos_token": "[EOS]"})
  )
  return ref, hybridna_dir


def test_jamba_style_checkpoint_scores_like_bamba(tmp_path, caplog):
  ref, path = _jamba_dir(tmp_path)
  model, tok, config = hf.load(str(path), dtype="float32")  # the checkpoint's ids
  assert "some_future_field" in caplog.text  # unknown config fields are reported
  layer_types = ModelConfig.from_config(config.model).layer_types
  assert layer_types == ("mamba", "mamba", "attention", "mamba")
  assert (tok.A, tok.C, tok.G, tok.T, tok.N, tok.pad, tok.bos) == (10, 9, 8, 7, 11, 0, 5)
  ids = tok.encode(SEQ, add_bos=True)[None]
  ours, theirs = _ours(model, ids), _torch_logits(ref, ids)
  assert _rel(ours, theirs) <= 1e-4

  def log_likelihood(logits):
    logp = jax.nn.log_softmax(jnp.asarray(logits[0, :-1]), axis=-1)
    return float(jnp.take_along_axis(logp, jnp.asarray(ids[0, 1:, None]), axis=-1).sum())

  assert log_likelihood(ours) == pytest.approx(log_likelihood(theirs), rel=1e-5)
  # Re-ordered into our vocabulary (what launch/convert.py writes): the same
  # logits for every mapped token, under our ids.
  mapped, our_tok, _ = restore.load(str(path), dtype="float32")  # as convert.py's default
  assert our_tok is our_tokenizer and mapped.cfg.vocab_size == 12  # [UNK], [CLS] on 10, 11
  logits = _ours(mapped, our_tokenizer.encode(SEQ, add_bos=True)[None])
  pairs = [(our_tokenizer.A, 10), (our_tokenizer.T, 7), (our_tokenizer.EOS, 6)]
  assert _rel(logits[..., [o for o, _ in pairs]], theirs[..., [t for _, t in pairs]]) <= 1e-4


@pytest.mark.parametrize("asks", [{"use_rope": True}, {"position_embedding_type": "rope"}])
def test_jamba_style_config_asking_for_rope_is_refused(tmp_path, asks):
  _, path = _jamba_dir(tmp_path)
  config = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**config, **asks}))
  with pytest.raises(hf.HFCheckpointError, match="loads without positional encoding"):
    hf.load(str(path))
  (path / "config.json").write_text(json.dumps({**config, "use_rope": False}))
  hf.load(str(path))


def test_restore_load_maps_a_hf_directory_to_our_ids(tmp_path):
  # The Scorer (and fine-tuning, design) encode with hybridna_jax.tokenizer:
  # restore.load gives a model in those ids, with the checkpoint's scores.
  ref, path = _jamba_dir(tmp_path)
  model, tok, _ = restore.load(str(path), dtype="float32")
  assert tok is our_tokenizer and model.cfg.vocab_size == 12
  seq = SEQ.replace("N", "")
  ids = hf.read_vocab(str(path)).encode(seq, add_bos=True)[None]
  logp = jax.nn.log_softmax(_torch_logits(ref, ids)[0, :-1])
  truth = float(logp[np.arange(len(seq)), ids[0, 1:]].sum())
  scorer = Scorer(model, context=64, batch_size=1, min_bucket=64, add_bos=True)
  assert float(scorer.log_likelihood([seq]).total[0]) == pytest.approx(truth, rel=1e-5)
  _, kept, _ = restore.load(str(path), our_vocab=None)  # the checkpoint's ids
  assert isinstance(kept, hf.VocabTokenizer) and kept.A == 10
  # The launchers look for a run: the error says how to convert.
  with pytest.raises(FileNotFoundError, match=r"is a Hugging Face directory.*launch/convert.py"):
    restore.find_checkpoint(str(path))


def _convert(*args):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run(
    [sys.executable, os.path.join(root, "launch", "convert.py"), *args],
    env=launch_env(1),
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_convert_hf_to_run_and_back(tmp_path):
  ref, path = _jamba_dir(tmp_path)
  run = tmp_path / "run"
  done = _convert(f"--input={path}", f"--output={run}", "--vocab_size=10")
  assert done.returncode == 0, done.stdout + done.stderr
  assert "checkpoint '[UNK]' (row 1) dropped (its id here would be 10" in done.stderr
  # The run restores like a trained one and scores with our tokenizer.
  model, tok, config = restore.load(str(run), dtype="float32")
  assert tok is our_tokenizer and config.model.vocab_size == 10
  ids = our_tokenizer.encode(SEQ, add_bos=True)[None]
  theirs = _torch_logits(ref, np.array([[5, 10, 9, 8, 7, 7, 8, 9]]))  # <bos> A C G T T G C
  ours = _ours(model, ids[:, :8])
  columns = [our_tokenizer.A, our_tokenizer.C, our_tokenizer.G, our_tokenizer.T]
  assert _rel(ours[..., columns], theirs[..., [10, 9, 8, 7]]) <= 1e-4
  # ... and exports back to a directory transformers loads, with its logits.
  back = tmp_path / "back"
  done = _convert(f"--input={run}", f"--output={back}", "--max_shard_gb=0.00002")
  assert done.returncode == 0, done.stdout + done.stderr
  theirs_back = transformers.BambaForCausalLM.from_pretrained(str(back)).eval()
  assert _rel(_torch_logits(theirs_back, ids), _ours(model, ids)) <= 1e-4
  # A clear one-line error for a bad --output, before anything loads: a
  # directory holding other files (an earlier export would be replaced,
  # test_export_replaces_an_earlier_export), and a run onto a non-empty one.
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("mine")
  done = _convert(f"--input={run}", f"--output={other}")
  assert done.returncode != 0 and "is no earlier export (files an export" in done.stderr
  assert os.listdir(other) == ["notes.txt"]
  done = _convert(f"--input={path}", f"--output={run}")
  assert done.returncode != 0 and "exists and is not empty" in done.stderr
  done = _convert(f"--input={path}", f"--output={tmp_path / 'new'}", "--vocab_size=5")
  assert done.returncode != 0 and "error: --vocab_size=5: pass 0 (every" in done.stderr


def test_convert_keeps_the_checkpoints_add_bos(tmp_path):
  """Review: a tokenizer whose post_processor adds bos gave score.add_bos
  False, and --config dropped a True; a file:// input was taken for a run."""
  _, path = _jamba_dir(tmp_path)
  _fast_tokenizer_dir(path, _BOS_TEMPLATE)
  _, _, config = restore.load(str(path), dtype="float32")
  assert config.score.add_bos
  for extra, source in (([], str(path)), (["--config=configs/tiny.py"], paths.file_url(path))):
    run = tmp_path / f"run{len(extra)}"
    done = _convert(f"--input={source}", f"--output={run}", *extra)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((run / "config.json").read_text())["score"]["add_bos"] is True
  # Review: scoring it with a --config (README: a size config for a longer
  # context) dropped the bos, so its scores were not the checkpoint's.
  tiny = load_config("configs/tiny.py")
  assert not tiny.score.add_bos
  assert Scorer.from_run(str(run), tiny)[0].settings.add_bos
  assert not Scorer.from_run(str(run), tiny, add_bos=False)[0].settings.add_bos
  # Shards without their index are named, not taken for a run without checkpoints/.
  shards = tmp_path / "shards"
  _bamba().save_pretrained(shards, max_shard_size="20KB")
  (shards / "model.safetensors.index.json").unlink()
  done = _convert(f"--input={shards}", f"--output={tmp_path / 'run2'}")
  assert done.returncode != 0 and "but no model.safetensors.index.json" in done.stderr


def test_restore_load_reads_a_hf_directory_as_a_file_url(tmp_path):
  """Review: restore.load("file:///...") missed the Hugging Face directory and
  said to use restore.load."""
  path = tmp_path / "a b"  # percent-encoded in the URL
  ref = _bamba()
  ref.save_pretrained(path)
  model, _, _ = restore.load(paths.file_url(path), dtype="float32", our_vocab=None)
  ids = np.random.RandomState(1).randint(0, 16, (1, 9))
  assert _rel(_ours(model, ids), _torch_logits(ref, ids)) <= 1e-4
  with pytest.raises(FileNotFoundError, match=r"is a Hugging Face directory.*launch/convert.py"):
    restore.find_checkpoint(paths.file_url(path))  # the launchers' lookup


# -- Config fields as transformers reads them ----------------------------------


def test_stock_bamba_config_loads_with_transformers_logits(tmp_path):
  # BambaConfig writes no head_dim (hidden_size // heads: 48 // 4 = 12), a
  # null num_key_value_heads means one per head, and mamba_d_head 16 gives
  # 6 Mamba2 heads over d_inner 96, which the default SSM head size (64)
  # does not divide.
  ref = _bamba(kv_heads=4, hidden_size=48, head_dim=None, mamba_n_heads=6, mamba_d_head=16)
  ref.save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  assert "head_dim" not in config
  (tmp_path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": None}))
  theirs = transformers.BambaForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert theirs.config.num_key_value_heads == 4
  model, _, config = restore.load(str(tmp_path), dtype="float32", our_vocab=None)
  m = config.model
  assert (m.head_dim, m.num_kv_heads, m.ssm_head_dim) == (12, 4, 16)
  ids = np.random.RandomState(1).randint(0, 16, (1, 12))
  assert _rel(_ours(model, ids), _torch_logits(theirs, ids)) <= 1e-4


def test_absent_fields_take_the_architecture_defaults():
  sizes = {"hidden_size": 32, "num_attention_heads": 4, "attn_layer_period": 4}
  jamba = hf.HYBRIDNA_JAMBA.translate(sizes).fields
  assert (jamba["norm_eps"], jamba["head_dim"], jamba["num_kv_heads"]) == (1e-6, 8, 8)
  assert jamba["max_seq_len"] == 262_144 and "d_state" not in jamba  # Mamba2's, ours
  bamba = hf.BAMBA.translate({**sizes, "num_key_value_heads": None, "head_dim": None}).fields
  assert (bamba["head_dim"], bamba["num_kv_heads"], bamba["d_state"]) == (8, 4, 256)
  assert "norm_eps" not in bamba  # BambaConfig's 1e-5 is ours


def test_stated_mamba_head_size_that_cannot_be_is_a_checkpoint_error(tmp_path):
  _bamba(hidden_size=48, mamba_n_heads=6, mamba_d_head=16, head_dim=12).save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, "mamba_d_head": 20}))
  with pytest.raises(hf.HFCheckpointError, match=r"config.json: .*multiple of ssm_head_dim \(20\)"):
    restore.load(str(tmp_path))


def test_ssm_state_size_is_stated_or_an_error(tmp_path):
  # conv1d's width fixes only ngroups * d_state (2 * 8 here): a config that
  # states neither cannot be read; either one (under any known name) does.
  ref, path = _jamba_dir(tmp_path, groups=2)
  config = json.loads((path / "config.json").read_text())
  d_state = config.pop("mamba_d_state")
  ids = np.random.RandomState(3).randint(0, 12, (1, 20))
  for stated in ({"ssm_state_size": d_state}, {"state_size": d_state}, {"mamba_n_groups": 2}):
    (path / "config.json").write_text(json.dumps({**config, **stated}))
    model, _, loaded = hf.load(str(path), dtype="float32")
    assert (loaded.model.d_state, loaded.model.ngroups) == (8, 2)
  assert _rel(_ours(model, ids), _torch_logits(ref, ids)) <= 1e-4
  (path / "config.json").write_text(json.dumps(config))
  with pytest.raises(hf.HFCheckpointError, match=r"config.json names neither .* add mamba_d_state"):
    hf.load(str(path))


def test_older_rope_scaling_is_read(tmp_path):
  # transformers 4's rope_scaling ({"type": ...}, rope_theta beside it) is
  # what transformers 5 applies: the default type with its theta loads, a
  # scaling we cannot reproduce is named.
  older = {"rope_theta": 500.0, "rope_scaling": {"type": "default"}}
  fields = hf.BAMBA.translate({**older, "rope_parameters": {"rope_theta": 9.0}}).fields
  assert fields["rope"] and fields["rope_theta"] == 500.0
  _bamba().save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  del config["rope_parameters"]
  config.update(rope_theta=10_000.0, rope_scaling={"type": "linear", "factor": 4.0})
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(hf.HFCheckpointError, match="rope_scaling.rope_type='linear'"):
    restore.load(str(tmp_path))


def test_list_valued_eos_token_id(tmp_path):
  # transformers allows eos_token_id: int | list[int]; the first is ours.
  vocab = ["<pad>", "<s>", "</s>", "<eot>", "A", "C", "G", "T"]
  model = {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(vocab)}, "unk_token": "<pad>"}
  (tmp_path / "tokenizer.json").write_text(json.dumps({"model": model}))
  tok = hf.read_vocab(
    str(tmp_path), {"eos_token_id": [3, 2], "bos_token_id": [], "pad_token_id": 0}
  )
  assert (tok.eos, tok.bos, tok.pad) == (3, 1, 0)


def _fast_tokenizer_dir(path, post_processor, **config):
  """A character-level tokenizer.json over _VOCAB12 that transformers loads
  (PreTrainedTokenizerFast), with `post_processor` (absent when None)."""
  flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False}
  added = [{"id": i, "content": t, **flags, "special": True} for i, t in enumerate(_VOCAB12)]
  split = {"type": "Split", "pattern": {"Regex": "."}, "behavior": "Isolated", "invert": False}
  tokenizer_json = {
    "version": "1.0",
    **{"truncation": None, "padding": None, "normalizer": None, "decoder": None},
    "added_tokens": [t for t in added if "[" in t["content"]],
    "pre_tokenizer": split,
    "post_processor": post_processor,
    "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(_VOCAB12)}},
  }
  tokenizer_json["model"]["unk_token"] = "[UNK]"
  (path / "tokenizer.json").write_text(json.dumps(tokenizer_json))
  roles = {"pad_token": "[PAD]", "bos_token": "[BOS]", "eos_token": "[EOS]", "unk_token": "[UNK]"}
  tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", **roles, **config}
  (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))


def _template(*first):
  """A TemplateProcessing post_processor putting the tokens `first` before the text."""
  names = [t for t, _ in first]
  specials = [{"SpecialToken": {"id": t, "type_id": 0}} for t in names]
  text = {"Sequence": {"id": "A", "type_id": 0}}
  return {
    "type": "TemplateProcessing",
    "single": [*specials, text],
    "pair": [*specials, text, {"Sequence": {"id": "B", "type_id": 1}}],
    "special_tokens": {t: {"id": t, "ids": [i], "tokens": [t]} for t, i in first},
  }


_BOS_TEMPLATE = _template(("[BOS]", 5))


@pytest.mark.parametrize(
  "post_processor, config, bos",
  [
    (_BOS_TEMPLATE, {}, 5),  # review: add_bos was read from add_bos_token only
    (  # bos, the text, then two specials after it
      {
        **_BOS_TEMPLATE,
        "single": [
          *_BOS_TEMPLATE["single"],
          *({"SpecialToken": {"id": t, "type_id": 0}} for t in ("[SEP]", "[EOS]")),
        ],
        "special_tokens": {
          **_BOS_TEMPLATE["special_tokens"],
          "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]},
          "[EOS]": {"id": "[EOS]", "ids": [6], "tokens": ["[EOS]"]},
        },
      },
      {},
      5,
    ),
    (None, {"add_bos_token": True}, None),  # transformers drops add_bos_token beside tokenizer.json
    (None, {}, None),
    ({"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]}, {}, 2),  # cls first
    (
      {
        "type": "Sequence",
        "processors": [
          {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False},
          {"type": "RobertaProcessing", "sep": ["[EOS]", 6], "cls": ["[BOS]", 5]},
        ],
      },
      {"add_bos_token": False},
      5,
    ),
  ],
)
def test_add_bos_is_what_transformers_tokenizer_does(tmp_path, caplog, post_processor, config, bos):
  _fast_tokenizer_dir(tmp_path, post_processor, **config)
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))("ACGT")["input_ids"]
  tok = hf.read_vocab(str(tmp_path))
  ours = tok.encode("ACGT", add_bos=tok.add_bos).tolist()
  assert tok.add_bos == (bos is not None) and "tokenizer.json's post_processor" in tok.add_bos_from
  # The same ids, but for the tokens a processor appends (Bert's [SEP]),
  # which scoring does not add: the import names them in a warning.
  assert theirs[: len(ours)] == ours
  appended = theirs[len(ours) :]
  assert (f"ends each sequence with the special token(s) {appended}" in caplog.text) == bool(
    appended
  )
  if bos is not None:
    assert ours[0] == tok.bos == bos


# HyenaDNA/Caduceus CharacterTokenizer: no vocabulary file; the class's code
# numbers 7 specials, then the characters from 7.
_CHAR_SPECIALS = ["[CLS]", "[SEP]", "[BOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]"]


def _write_char_tokenizer_config(path, characters="ACGTN"):
  config = {
    "added_tokens_decoder": {
      str(i): {"content": t, "special": True} for i, t in enumerate(_CHAR_SPECIALS)
    },
    "characters": list(characters),
    "bos_token": "[BOS]",
    "pad_token": "[PAD]",
    "model_max_length": 131074,
    "tokenizer_class": "CharacterTokenizer",
  }
  (path / "tokenizer_config.json").write_text(json.dumps(config))


def test_character_tokenizer_config_is_read(tmp_path):
  _write_char_tokenizer_config(tmp_path)
  tok = hf.read_vocab(str(tmp_path))
  assert tok.vocab_size == 12 and "CharacterTokenizer" in tok.source
  assert (tok.A, tok.C, tok.G, tok.T, tok.N) == (7, 8, 9, 10, 11)
  assert (tok.cls, tok.sep, tok.bos, tok.mask, tok.pad, tok.unk) == (0, 1, 2, 3, 4, 6)
  assert tok.eos == 1  # the class's eos_token is [SEP]
  np.testing.assert_array_equal(tok.encode("acgtn", add_bos=True), [2, 7, 8, 9, 10, 11])


def test_unreadable_tokenizer_loads_the_model_without_one(tmp_path, caplog):
  _bamba().save_pretrained(tmp_path)
  words = {"type": "WordLevel", "vocab": {"<pad>": 0, "hello": 1}, "unk_token": "<pad>"}
  (tmp_path / "tokenizer.json").write_text(json.dumps({"model": words}))
  model, tok, _ = hf.load(str(tmp_path))
  assert tok is None and model.cfg.vocab_size == 16
  assert f"{tmp_path / 'tokenizer.json'}: the vocabulary has no token for A" in caplog.text
  with pytest.raises(hf.HFCheckpointError, match=r"tokenizer.json: .*our_vocab=None"):
    hf.load(str(tmp_path), our_vocab=0)
  (tmp_path / "tokenizer.json").write_text("{")
  assert hf.load(str(tmp_path))[1] is None and "tokenizer.json: not valid JSON" in caplog.text


def test_default_vocab_map_is_a_permutation_with_transformers_scores(tmp_path, caplog):
  # A HyenaDNA-style vocabulary (12 tokens, no eos: [SEP] ends sequences)
  # over a 16-row embedding: the default keeps every row, each once.
  ref = _bamba(vocab=16)
  ref.save_pretrained(tmp_path)
  _write_char_tokenizer_config(tmp_path)
  tok = hf.read_vocab(str(tmp_path))
  source, embed, _ = hf.checkpoint.vocab_remap(tok, 16)
  assert sorted(source.tolist()) == list(range(16))
  t = our_tokenizer
  assert source[[t.PAD, t.BOS, t.EOS, t.MASK]].tolist() == [4, 2, 1, 3]  # eos <- [SEP]
  # Our <sep> (the echo separator) reads [SEP] as input; only its output row is [CLS].
  assert embed[t.SEP] == 1 and (np.delete(embed, t.SEP) == np.delete(source, t.SEP)).all()
  assert source[t.A : t.N + 1].tolist() == [7, 8, 9, 10, 11]
  # Rows left over, in checkpoint order: [CLS] on our sep, then [RESERVED],
  # [UNK] and the rows beyond the tokenizer on 10, 11, ...
  assert source[t.SEP] == 0 and source[10:].tolist() == [5, 6, 12, 13, 14, 15]
  model, our_tok, _ = hf.load(str(tmp_path), dtype="float32", our_vocab=0)
  assert our_tok is our_tokenizer and model.cfg.vocab_size == 16
  assert "our <sep> (id 3) <- checkpoint '[CLS]' (row 0)" in caplog.text
  assert "dropped" not in caplog.text and "zero rows" not in caplog.text
  theirs_ids = tok.encode(SEQ, add_bos=True, add_eos=True)[None]
  ours_ids = our_tokenizer.encode(SEQ, add_bos=True, add_eos=True)[None]
  theirs = jax.nn.log_softmax(_torch_logits(ref, theirs_ids)[0, :-1])
  ours = jax.nn.log_softmax(_ours(model, ours_ids)[0, :-1])
  np.testing.assert_allclose(ours, theirs[:, source], atol=1e-4)  # every log-prob
  positions = np.arange(len(SEQ) + 1)
  ll_theirs = float(theirs[positions, theirs_ids[0, 1:]].sum())
  assert float(ours[positions, ours_ids[0, 1:]].sum()) == pytest.approx(ll_theirs, rel=1e-5)
  # An explicit size: smaller drops rows, larger adds zero rows; both said.
  _, _, notes = hf.checkpoint.vocab_remap(tok, 16, 10)
  assert len([n for n in notes if "dropped (its id here would be" in n]) == 6
  source, _, notes = hf.checkpoint.vocab_remap(tok, 16, 128)
  assert (source[16:] == -1).all() and "112 of our ids (16, 17" in notes[-1]
  assert "takes probability mass" in notes[-1]
  # Fewer than our specials and A C G T N, or more than our ids: one line.
  for bad in (5, -3, 129):
    with pytest.raises(ValueError, match=rf"^our_vocab={bad}: pass 0 .* or 10..128 "):
      hf.load(str(tmp_path), our_vocab=bad)


def test_a_vocabulary_without_n_reads_n_as_its_unknown_token(tmp_path, caplog):
  """Review: HyenaDNA-style characters A C G T and no N: a character
  tokenizer reads N as [UNK]; our N took whichever row was left over, so
  every logit after an N was wrong."""
  ref = _bamba(vocab=11)
  ref.save_pretrained(tmp_path)
  _write_char_tokenizer_config(tmp_path, characters="ACGT")
  tok = hf.read_vocab(str(tmp_path))
  assert tok.N == tok.unk == 6
  np.testing.assert_array_equal(tok.encode("ACNr"), [7, 8, 6, 6])  # IUPAC codes too
  model, _, job = hf.load(str(tmp_path), dtype="float32", our_vocab=0)
  assert "our N (id 9) <- checkpoint '[UNK]' (row 6): the checkpoint's unk token" in caplog.text
  assert not job.score.add_bos  # no add_bos_token
  head, _, _ = hf.checkpoint.vocab_remap(tok, 11)
  theirs = jax.nn.log_softmax(_torch_logits(ref, tok.encode(SEQ)[None])[0])
  ours = jax.nn.log_softmax(_ours(model, our_tokenizer.encode(SEQ)[None])[0])
  np.testing.assert_allclose(ours, theirs[:, head], atol=1e-4)  # after the Ns too


def test_tied_embeddings_with_a_shared_token_keep_its_input_row(tmp_path, caplog):
  """Review: tied embeddings and bos = eos (a common Hugging Face setup):
  our <bos> had a zero input embedding, the log saying it read the shared
  row. The converted model now keeps two matrices."""
  ref = _bamba(vocab=6, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
  ref.save_pretrained(tmp_path)
  vocab = {"<|endoftext|>": 0, "A": 1, "C": 2, "G": 3, "T": 4, "N": 5}
  (tmp_path / "vocab.json").write_text(json.dumps(vocab))
  config = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "add_bos_token": True}
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  model, _, job = hf.load(str(tmp_path), dtype="float32", our_vocab=0)
  assert not job.model.tie_embeddings and "keeps two matrices" in caplog.text
  # Its tokenizer adds bos (review: never read): the run scores after bos too.
  assert job.score.add_bos and hf.read_vocab(str(tmp_path)).add_bos
  t = our_tokenizer
  embedding = np.asarray(ref.model.embed_tokens.weight.detach())
  np.testing.assert_array_equal(_array(model.embed)[t.BOS], embedding[0])
  theirs = jax.nn.log_softmax(_torch_logits(ref, np.array([[0, 1, 2, 3, 4, 5, 1]]))[0])
  ours = jax.nn.log_softmax(_ours(model, our_tokenizer.encode("ACGTNA", add_bos=True)[None])[0])
  acgtn = slice(t.A, t.N + 1)
  np.testing.assert_allclose(  # the zero rows (pad, sep, mask) take mass: compare A..N
    jax.nn.log_softmax(ours[:, acgtn]), jax.nn.log_softmax(theirs[:, 1:6]), atol=1e-4
  )


def test_a_token_serving_two_roles_goes_to_the_one_generated():
  """pad = bos = eos (a common Hugging Face setup), and pad = N: the row goes
  to our <eos> and N (generated, scored), not <pad>; <pad> and <bos> read
  it as input, their output rows being zero (no row is left over)."""
  vocab = {"</s>": 0, "A": 1, "C": 2, "G": 3, "T": 4, "N": 5}
  tok = hf.VocabTokenizer(vocab, {"pad": 0, "bos": 0, "eos": 0}, "test")
  head, embed, notes = hf.checkpoint.vocab_remap(tok, 6)
  t = our_tokenizer
  assert head[t.EOS] == 0 and head[t.A : t.N + 1].tolist() == [1, 2, 3, 4, 5]
  assert head[[t.PAD, t.BOS]].tolist() == [-1, -1] and embed[[t.PAD, t.BOS]].tolist() == [0, 0]
  assert any("our <pad> (id 0) reads checkpoint '</s>' (row 0) as input" in n for n in notes)
  tok = hf.VocabTokenizer(vocab, {"pad": 5, "eos": 0}, "test")
  head, embed, _ = hf.checkpoint.vocab_remap(tok, 6)
  assert head[t.N] == 5 and head[t.PAD] == -1 and embed[t.PAD] == 5


# -- Our exports ---------------------------------------------------------------


def _tiny(seed):
  return create_model(ModelConfig.from_config(load_config("configs/tiny.py").model), seed=seed)


def _array(param):
  return np.asarray(jax.device_get(param[...]))


def test_export_round_trip_keeps_task_tokens(tmp_path, caplog):
  model = _tiny(seed=3)
  hf.export(model, str(tmp_path))
  # convert.py's default keeps every task token of our export (scores exact).
  back, tok, _ = hf.load(str(tmp_path), our_vocab=0)
  assert back.cfg.vocab_size == our_tokenizer.VOCAB_SIZE
  assert tok is our_tokenizer and "dropped" not in caplog.text and "zero rows" not in caplog.text
  np.testing.assert_array_equal(_array(back.embed), _array(model.embed))
  np.testing.assert_array_equal(_array(back.lm_head), _array(model.lm_head))


def test_exported_tokenizer_folds_like_ours(tmp_path):
  hf.vocab.write_char_tokenizer(str(tmp_path))
  text = "acgtnACGTNuUrykmRYKMbdhvBDHVswSW"
  loaded = (
    transformers.AutoTokenizer.from_pretrained(str(tmp_path)),
    transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path)),
  )
  for fast in loaded:
    assert fast(text, add_special_tokens=False)["input_ids"] == our_tokenizer.encode(text).tolist()
    # Special and task tokens are matched as written, not normalised.
    ids = fast("<bos>acgu<task_3><eos>", add_special_tokens=False)["input_ids"]
    assert ids == [our_tokenizer.BOS, 5, 6, 7, 8, our_tokenizer.task_token(3), our_tokenizer.EOS]
    # Documented difference (README, write_char_tokenizer): another character
    # is N there, as a Hugging Face tokenizer cannot raise; ours raises.
    assert fast("AXG", add_special_tokens=False)["input_ids"] == [5, our_tokenizer.N, 7]
  with pytest.raises(our_tokenizer.InvalidSequenceError, match="'X' at position 1"):
    our_tokenizer.encode("AXG")


def test_export_replaces_an_earlier_export(tmp_path, monkeypatch):
  out = tmp_path / "export"
  old, new = _tiny(seed=1), _tiny(seed=2)
  hf.export(old, str(out), max_shard_bytes=40_000)  # sharded, with an index
  written = sorted(os.listdir(out))

  # An export that fails part-way leaves the earlier one as it was, and no
  # partial directory beside it.
  def fail(path):
    raise OSError("disk full")

  monkeypatch.setattr(hf.checkpoint, "write_char_tokenizer", fail)
  with pytest.raises(OSError, match="disk full"):
    hf.export(new, str(out))
  monkeypatch.undo()
  assert sorted(os.listdir(out)) == written and os.listdir(tmp_path) == ["export"]
  # A complete one replaces it whole: no stale index or shard survives.
  assert hf.export(new, str(out))[0] == "model.safetensors"
  assert sorted(os.listdir(out)) == sorted(hf.export(new, str(tmp_path / "fresh")))
  back, _, _ = restore.load(str(out))
  np.testing.assert_array_equal(_array(back.embed), _array(new.embed))
  # A directory holding anything else is refused and left alone.
  (out / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match=r"is no earlier export .*notes\.txt"):
    hf.export(new, str(out))
  assert (out / "notes.txt").read_text() == "mine" and (out / "config.json").exists()


def test_write_run_refuses_an_existing_run(tmp_path, monkeypatch):
  run = tmp_path / "run"
  model = _tiny(seed=1)
  hf.write_run(model, hf.checkpoint.job_config(model.cfg), str(run))
  config = (run / "config.json").read_text()
  with pytest.raises(FileExistsError, match="already holds a run"):
    hf.write_run(_tiny(seed=2), hf.checkpoint.job_config(model.cfg), str(run))
  assert (run / "config.json").read_text() == config

  # A save that fails writes no config.json (the directory is no run).
  def fail(self, *args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(train_checkpoint.Checkpoints, "save", fail)
  with pytest.raises(OSError, match="disk full"):
    hf.write_run(model, hf.checkpoint.job_config(model.cfg), str(tmp_path / "other"))
  assert not (tmp_path / "other" / "config.json").exists()
