"""Writes tests/data/legacy_run: a tiny run made by the code before the architecture change.

Run from the repository root: python tests/data/make_legacy_run.py
"""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")
from flax import nnx

from hybridna_jax import restore, tokenizer
from hybridna_jax.config import base_config, load_config
from hybridna_jax.data import fasta, prepare
from hybridna_jax.train import loop

root = tempfile.mkdtemp()
((_, tokens),) = fasta.read_fasta("tests/data/lambda_virus.fa")
seq = tokenizer.decode(tokens)
path = os.path.join(root, "l.fa")
fasta.write_fasta(path, [("lambda_a", seq[:40000]), ("lambda_b", seq[40000:])])
data = base_config().data
data.fasta_globs = (path,)
data.store_dir = os.path.join(root, "store")
data.source_from = "record"
data.split.val_records = ("lambda_b",)
prepare.prepare_store(data, log=lambda *a, **k: None)
cfg = load_config("configs/tiny.py")
cfg.model.n_layers, cfg.model.attn_period, cfg.model.attn_offset = 2, 2, 1
cfg.data = data
cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.num_devices = 2, 2, 2, 0
t = cfg.train
t.stages = ((64, 2, 4),)
t.warmup_steps = 1
t.log_every = 1
t.eval_every = 0
t.checkpoint_every = 2
t.keep_best = False
t.plot = False
t.async_checkpoints = False
work = os.path.join(root, "run")
loop.train(cfg, work)
out = "tests/data/legacy_run"
shutil.rmtree(out, ignore_errors=True)
os.makedirs(out)
shutil.copy(os.path.join(work, "config.json"), out)
shutil.copytree(os.path.join(work, "checkpoints"), os.path.join(out, "checkpoints"))
model, tok, config = restore.load(out)
ids = np.asarray(
  tok.encode("ACGTTGCAAGGCTTAACGGATCCATGCAAATTTGGGCCCAGTACGATCGATCGTAGCTAGCTAGGATC"), np.int32
)[None]
logits = np.asarray(nnx.jit(lambda m, x: m(x).logits)(model, ids))
np.savez(os.path.join(out, "expected_logits.npz"), tokens=ids, logits=logits)
print(logits.shape, logits[0, :2, :6])
