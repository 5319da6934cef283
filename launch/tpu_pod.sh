#!/usr/bin/env bash
# MMSSL on a Cloud TPU pod slice: the same command on every host (worker).
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a PROJECT=my-project \
#   CONFIG=configs/sports.py:variant=paper WORKDIR=gs://bucket/mmssl_sports \
#   DATA_DIR=/mnt/data/sports launch/tpu_pod.sh [extra --config.* flags]
#
# Every host runs `python -m mmssl_jax.main --distributed ...`; with no
# coordinator flags `jax.distributed.initialize()` discovers the pod slice
# from the TPU metadata, so all hosts form one mesh ('data' axis over all
# chips, `config.train.data_parallel=0`). The repository (and the data, unless
# DATA_DIR is on a shared mount) must be present on every worker; set
# SYNC=1 to copy the working tree there first (gcloud scp). WORKDIR should be
# a path every host can write (GCS or a shared file system); checkpoints are
# written collectively.
#
# Needs `mmssl_jax.main` to accept --distributed (see the sharding notes in
# mmssl_jax/parallel.py). Test the same path on one machine with
# launch/local_multiprocess.sh.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
: "${CONFIG:?set CONFIG, e.g. configs/tiktok.py}"
: "${WORKDIR:?set WORKDIR, e.g. gs://bucket/run}"
PROJECT_FLAG=()
[[ -n "${PROJECT:-}" ]] && PROJECT_FLAG=(--project="$PROJECT")
REMOTE_DIR="${REMOTE_DIR:-~/mmssl_jax}"
PYTHON="${PYTHON:-python3}"

if [[ "${SYNC:-0}" == "1" ]]; then
  gcloud compute tpus tpu-vm scp --recurse --worker=all --zone="$ZONE" \
    "${PROJECT_FLAG[@]}" "$(git rev-parse --show-toplevel)" \
    "$TPU_NAME:$REMOTE_DIR"
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all --zone="$ZONE" \
    "${PROJECT_FLAG[@]}" --command="cd $REMOTE_DIR && $PYTHON -m pip install -q -e . 'jax[tpu]'"
fi

DATA_FLAG=""
[[ -n "${DATA_DIR:-}" ]] && DATA_FLAG="--config.data.dir=$DATA_DIR"
EXTRA="$*"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all --zone="$ZONE" \
  "${PROJECT_FLAG[@]}" --command="cd $REMOTE_DIR && \
  $PYTHON -m mmssl_jax.main --distributed --config=$CONFIG \
    --workdir=$WORKDIR --config.train.data_parallel=0 $DATA_FLAG $EXTRA"
