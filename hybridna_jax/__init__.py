"""HybriDNA in JAX: a hybrid Mamba2 (SSD) + attention DNA language model.

The map, in the order data flows through it:

  core (this package's top level)
    tokenizer        nucleotides and special/task tokens <-> ids
    sections, config typed config sections (one definition per field),
                     architecture vs runtime model fields, `:variant` presets
    sharding         the mesh (data, fsdp, tensor) and logical-axis rules
    ssd, attention   public ops and their kernel tables
    ssd_reference,   XLA references (also the CPU path); the kernels import
    attention_reference  these, never the public ops
    kernel_registry  lazy kernel loading and selection ("auto" by platform)
    kernels/         Pallas SSD (Triton/Mosaic), splash/flash attention, shard_map
    layers/          Mamba2, attention, gated MLP, norms, linear
    model            the hybrid stack, LM head, prefill/decode caches
    restore          run directories and checkpoints -> (model, tokenizer, config)
    generate         jitted cached sampling and beam search
    echo             echo / plain rows and pooling (used by scoring and finetune)
    plotting         headless matplotlib for every report

  data/      FASTA -> token store -> Grain windows -> batches; task files
  train/     optimizer, jitted steps, loop (stages, checkpoints, preemption),
             metrics, FLOPs, Markov baselines
  scoring/   Scorer (likelihoods, positions, embeddings), outputs, evaluation,
             zero-shot variant effects
  finetune/  echo-embedding heads, task data, metrics, the fine-tuning Task
  design/    prompt tokens, design data, generative fine-tuning, sampling,
             design metrics

Applications (scoring, finetune, design) import the core; the core never
imports them. `tests/test_imports.py` fails on any import cycle.
"""
