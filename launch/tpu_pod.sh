#!/usr/bin/env bash
# MMSSL on a Cloud TPU pod slice: the same command on every host (worker).
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a PROJECT=my-project \
#   CONFIG=configs/sports.py:variant=paper WORKDIR=/mnt/shared/mmssl_sports \
#   DATA_DIR=/mnt/data/sports launch/tpu_pod.sh [extra --config.* flags]
#
# Every host runs `python -m mmssl_jax.main --distributed ...`; with no
# coordinator flags `jax.distributed.initialize()` discovers the pod slice
# from the TPU metadata, so all hosts form one mesh ('data' axis over all
# chips, `config.train.data_parallel=0`). The repository (and the data, unless
# DATA_DIR is on a shared mount) must be present on every worker; set SYNC=1
# to copy the working tree there first (gcloud scp).
#
# WORKDIR must be a path on a file system every worker mounts at the same
# place (Filestore/NFS, or a bucket through gcsfuse; not a gs:// URL:
# config.json and metrics.jsonl are written with plain file I/O). Checkpoints
# are written collectively by orbax; process 0 alone writes config.json,
# metrics.jsonl and the INFO log (the other workers print only warnings and
# errors). Running the script again resumes from the latest checkpoint. On a
# preemption notice (SIGTERM on any worker) all workers stop at the same
# step, checkpoint and exit 143.
#
# Untested here (no TPU pod): the same main path is tested with CPU
# processes by tests/test_multihost.py (launch/local_multiprocess.sh).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
: "${CONFIG:?set CONFIG, e.g. configs/tiktok.py}"
: "${WORKDIR:?set WORKDIR on a shared mount, e.g. /mnt/shared/run}"
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
