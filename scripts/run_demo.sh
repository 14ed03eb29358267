#!/usr/bin/env bash
# The main job on a fresh machine (CPU, ~10 minutes on 2 cores):
#   1. set up a virtual environment with the pinned requirements;
#   2. fetch real genomes from Debian packages and prepare a token store
#      (E. coli, H. pylori, K. pneumoniae, S. aureus, V. cholerae strains and
#      the lambda phage; one strain per species held out for validation);
#   3. train the demo HybriDNA (8 layers, 7 Mamba2 : 1 attention) through two
#      context stages, with checkpoints, and print validation bits per
#      nucleotide next to order-k Markov baselines.
# Outputs go to $RUN (default runs/demo): checkpoints/, metrics.jsonl,
# tensorboard/, loss_curves.png, baseline_report.json.
# Re-running resumes from the last checkpoint.
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

# Debian package lists may be missing on a fresh machine.
if ! apt-cache show ragout-examples >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq; else sudo apt-get update -qq; fi
fi
PYTHON="$PY" bash scripts/fetch_example_genomes.sh

echo "== training (configs/demo.py) -> $RUN"
"$PY" launch/train.py --config=configs/demo.py --workdir="$RUN"
echo "== done: see $RUN/loss_curves.png and $RUN/baseline_report.json"
