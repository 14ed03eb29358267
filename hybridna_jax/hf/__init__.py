"""Hugging Face interop: load HF-format checkpoints (transformers' Bamba
names, the HybriDNA release's Jamba-style names) without torch, and export
ours for transformers' BambaForCausalLM. See checkpoint.py and naming.py."""

from hybridna_jax.hf.checkpoint import (
  HFCheckpointError,
  check_export_dir,
  check_safetensors,
  export,
  is_hf_dir,
  load,
  read_files,
  write_run,
)
from hybridna_jax.hf.naming import BAMBA, FAMILIES, HYBRIDNA_JAMBA
from hybridna_jax.hf.vocab import VocabTokenizer, read_vocab

__all__ = [
  "BAMBA",
  "FAMILIES",
  "HFCheckpointError",
  "HYBRIDNA_JAMBA",
  "VocabTokenizer",
  "check_export_dir",
  "check_safetensors",
  "export",
  "is_hf_dir",
  "load",
  "read_files",
  "read_vocab",
  "write_run",
]
