#!/usr/bin/env bash
# Runs a HybriDNA-JAX job on every worker of a Cloud TPU VM pod slice.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a \
#   launch/tpu_pod.sh --config=configs/hybridna_300m.py --workdir=/mnt/shared/runs/300m
#
# Every worker runs launch/train.py (or LAUNCH=launch/finetune.py or
# launch/generate.py, the other multi-host programs) with the same arguments;
# jax.distributed.initialize() finds the pod's coordinator by itself
# (--distributed=on). The repository must be at $REPO_DIR on every
# worker (e.g. after `launch/tpu_pod.sh --setup`), and --workdir must be on
# storage that all workers see (Filestore/NFS or a GCS FUSE mount): process
# 0 writes metrics and config, every process writes its own checkpoint shards
# (no data-iterator state: a step's batch is a function of the seed and the
# step). Every worker loads only the rows (and, with
# --config.mesh.context spanning workers, the sequence slices) its chips hold.
# The mesh is (data, fsdp, context, tensor), tensor innermost (neighbouring
# chips); e.g. the 131k stage (4 rows) of the 7B on a v5p-128 (64 chips):
#   --config.mesh.fsdp=4 --config.mesh.context=4 --config.mesh.tensor=4
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
REPO_DIR=${REPO_DIR:-'~/hybridna-jax'}
REPO_URL=${REPO_URL:-$(git config --get remote.origin.url || true)}
LAUNCH=${LAUNCH:-launch/train.py}
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"
}
if [ "${1:-}" = "--setup" ]; then
  ssh_all "set -e; [ -d $REPO_DIR ] || git clone $REPO_URL $REPO_DIR; cd $REPO_DIR && git pull --ff-only && \
    python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt -e . && \
    .venv/bin/pip install -q 'jax[tpu]==$(grep '^jax==' requirements.txt | cut -d= -f3)'"
  exit 0
fi
args=$(printf ' %q' "$@")
ssh_all "cd $REPO_DIR && .venv/bin/python $LAUNCH --distributed=on$args 2>&1 | tee -a /tmp/hybridna_$(date +%Y%m%d).log"
