#!/usr/bin/env bash
# The main job on a fresh machine (CPU: 9-14 minutes on 2 cores, 7-11 of them
# training, with the machine's load, plus the first download of the genomes):
#   1. set up a virtual environment with the pinned requirements;
#   2. fetch real genomes from Debian packages and prepare a token store
#      (E. coli, H. pylori, K. pneumoniae, S. aureus, V. cholerae strains and
#      the lambda phage; one strain per species held out for validation);
#   3. train the demo HybriDNA (8 layers, 7 Mamba2 : 1 attention) through two
#      context stages, with checkpoints, and print validation bits per
#      nucleotide next to order-k Markov baselines;
#   4. evaluate the trained model on the held-out strains with sliding
#      windows (bits/nt, perplexity, accuracy per record and overall);
#   5. score zero-shot variant effects in a held-out genome: nonsense vs
#      synonymous SNVs in its long ORFs, plus malformed records that are
#      reported and skipped (scripts/make_variant_demo.py);
#   6. generate: sample continuations of a held-out gene's start with the
#      cached, jitted decoder, with a summary of the samples.
# Outputs go to $RUN (default runs/demo): checkpoints/, metrics.jsonl,
# tensorboard/, loss_curves.png, baseline_report.json, eval/, scores/,
# samples.fasta (+ .summary.*). Re-running resumes from the last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
RUN=${RUN:-runs/demo}
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
fi
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q -r requirements.txt -e .
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
source scripts/cpu_allocator.sh

# Debian package lists may be missing on a fresh machine.
if ! apt-cache show ragout-examples >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq; else sudo apt-get update -qq; fi
fi
PYTHON="$PY" bash scripts/fetch_example_genomes.sh

CONFIG=${CONFIG:-configs/demo.py}
HELD_OUT_GENOME=data_cache/genomes/E_coli__MG1655-K12.fasta.gz

echo "== 1/4 training ($CONFIG) -> $RUN"
"$PY" launch/train.py --config="$CONFIG" --workdir="$RUN"

echo "== 2/4 evaluation on the held-out strains -> $RUN/eval"
"$PY" launch/eval.py --workdir="$RUN" --config="$CONFIG"

echo "== 3/4 zero-shot variant effects in a held-out genome -> $RUN/scores"
"$PY" scripts/make_variant_demo.py write --genome="$HELD_OUT_GENOME" \
    --out="$RUN/variants.csv"
"$PY" launch/score.py --workdir="$RUN" --config="$CONFIG" --mode=variants \
    --variants="$RUN/variants.csv" --reference="$HELD_OUT_GENOME" --overwrite
"$PY" scripts/make_variant_demo.py summarize --tsv="$RUN/scores/variants.tsv"

echo "== 4/4 generation: continuations of a held-out gene's first 120 nt"
PREFIX=$("$PY" -c "
from hybridna_jax import tokenizer
from hybridna_jax.data import fasta
print(tokenizer.decode(fasta.read_fasta('$HELD_OUT_GENOME')[0][1][336:456]))")
"$PY" launch/generate.py --mode=sample --workdir="$RUN" --prefix="$PREFIX" \
    --num_samples=16 --batch_size=16 --length=400 --temperature=0.9 \
    --output="$RUN/samples.fasta" --overwrite

echo "== done: $RUN/loss_curves.png, baseline_report.json, eval/, scores/, samples.fasta"
