#!/usr/bin/env bash
# MMSSL on a Cloud TPU pod slice: the same command on every host (worker).
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a PROJECT=my-project \
#   CONFIG=configs/sports.py:variant=paper WORKDIR=/mnt/shared/mmssl_sports \
#   DATA_DIR=/mnt/data/sports SYNC=1 launch/tpu_pod.sh [extra --config.* flags]
#
#   DRY_RUN=1 TPU_NAME=... ZONE=... CONFIG=... WORKDIR=... launch/tpu_pod.sh
#       prints every gcloud command instead of running it (no gcloud needed)
#   STOP=1 TPU_NAME=... ZONE=... launch/tpu_pod.sh
#       sends SIGTERM to the run on every worker (checkpoint, exit 143)
#
# Every host runs `python -m mmssl_jax.main --distributed ...` with
# JAX_PLATFORMS=tpu (no TPU backend is an error, not a silent CPU run); with
# no coordinator flags `jax.distributed.initialize()` discovers the pod slice
# from the TPU metadata, so all hosts form one mesh ('data' axis over all
# chips, `config.train.data_parallel=0`). Extra arguments reach every worker
# as given, spaces and quotes included (each is quoted with printf %q).
#
# SYNC=1 first copies the repository to REMOTE_DIR on every worker and
# installs it there (`pip install -e ".[tpu]"`): the working tree's tracked
# and untracked, not git-ignored files are packed into one tarball, copied
# with `gcloud compute tpus tpu-vm scp --worker=all`, unpacked into a fresh
# REMOTE_DIR.sync folder, and only then swapped in for REMOTE_DIR
# (`rm -rf REMOTE_DIR && mv REMOTE_DIR.sync REMOTE_DIR`): syncing again gives
# the same layout, with files deleted here deleted there. Stop a run before
# syncing over it. The data must be on every worker too (or on a shared
# mount).
#
# Workers are started detached (`setsid nohup ... &`): closing or losing the
# ssh connection does not stop them. Worker output goes to
# LOG_DIR/<hostname>.log (appended; LOG_DIR defaults to mmssl_jax_logs in the
# worker's home, on its local disk) and its process id to
# LOG_DIR/<hostname>.pid. The launcher waits START_CHECK_S (10) seconds and
# fails, printing the log's end, if a worker's process has already exited
# with an error. Follow process 0's log with
#   gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 \
#     --command='tail -f mmssl_jax_logs/*.log'
#
# WORKDIR must be a path on a file system every worker mounts at the same
# place (Filestore/NFS, or a bucket through gcsfuse; not a gs:// URL:
# config.json and metrics.jsonl are written with plain file I/O). Checkpoints
# are written collectively by orbax; process 0 alone writes config.json,
# metrics.jsonl and the INFO log (the other workers print only warnings and
# errors). Running the script again resumes from the latest checkpoint. On a
# preemption notice (SIGTERM on any worker; STOP=1 sends one to all) all
# workers stop at the same step, checkpoint and exit 143.
#
# REMOTE_DIR (default mmssl_jax) and LOG_DIR are relative to the worker's
# home directory unless absolute. PYTHON (default python3) is the workers'
# interpreter. The dry run is what is tested (tests/test_launch.py, with a
# stand-in gcloud that runs the remote commands locally); the main path it
# starts is tested with CPU processes (launch/local_multiprocess.sh,
# tests/test_multihost.py).
set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"
: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
if [[ "${STOP:-0}" != 1 ]]; then
  : "${CONFIG:?set CONFIG, e.g. configs/tiktok.py}"
  : "${WORKDIR:?set WORKDIR on a shared mount, e.g. /mnt/shared/run}"
fi
GCLOUD_FLAGS=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && GCLOUD_FLAGS+=(--project="$PROJECT")
REMOTE_DIR="${REMOTE_DIR:-mmssl_jax}"
REMOTE_DIR="${REMOTE_DIR#\~/}"  # ~/x -> x: relative to the home directory
LOG_DIR="${LOG_DIR:-mmssl_jax_logs}"
LOG_DIR="${LOG_DIR#\~/}"
PYTHON="${PYTHON:-python3}"
START_CHECK_S="${START_CHECK_S:-10}"
if ! [[ "$START_CHECK_S" =~ ^[0-9]+$ ]]; then
  echo "error: START_CHECK_S is '$START_CHECK_S', not a number of seconds" >&2
  exit 2
fi

# run CMD...: run it, or print it (quoted, one line) in a dry run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}
# on_workers COMMAND: run the shell COMMAND on every worker.
on_workers() {
  [[ "$DRY_RUN" == 1 ]] && echo "# on every worker: $1"
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all \
    "${GCLOUD_FLAGS[@]}" --command="$1"
}

q_remote=$(printf '%q' "$REMOTE_DIR")
q_logs=$(printf '%q' "$LOG_DIR")
q_python=$(printf '%q' "$PYTHON")

if [[ "${STOP:-0}" == 1 ]]; then
  on_workers "pid=\$(cat $q_logs/\$(hostname).pid) && kill -TERM \"\$pid\" && echo \"\$(hostname): sent SIGTERM to \$pid\""
  exit 0
fi

if [[ "${SYNC:-0}" == 1 ]]; then
  REPO="${REPO:-$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)}"
  tarball_name="$(basename "$REMOTE_DIR").sync.tar.gz"
  q_tarball=$(printf '%q' "$tarball_name")
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "# pack the tracked and untracked, not ignored files of $REPO into $tarball_name"
    tarball="$tarball_name"
  else
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    tarball="$tmp/$tarball_name"
    (
      cd "$REPO"
      git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do
            if [[ -e "$f" || -L "$f" ]]; then printf '%s\0' "$f"; fi
          done \
        | tar -czf "$tarball" --null -T -
    )
  fi
  # The tarball lands in the home directory, is unpacked into a fresh
  # folder, and that folder replaces REMOTE_DIR.
  run gcloud compute tpus tpu-vm scp --worker=all "${GCLOUD_FLAGS[@]}" \
    "$tarball" "$TPU_NAME:$tarball_name"
  on_workers "set -e; t=$q_remote; rm -rf \"\$t.sync\"; mkdir -p \"\$t.sync\"; tar -xzf $q_tarball -C \"\$t.sync\"; rm -f $q_tarball; rm -rf \"\$t\"; mv \"\$t.sync\" \"\$t\"; cd \"\$t\"; $q_python -m pip install -q -e '.[tpu]'"
fi

ARGS=(-m mmssl_jax.main --distributed --config="$CONFIG" --workdir="$WORKDIR"
  --config.train.data_parallel=0)
[[ -n "${DATA_DIR:-}" ]] && ARGS+=(--config.data.dir="$DATA_DIR")
ARGS+=("$@")
q_args=$(printf '%q ' "${ARGS[@]}")
on_workers "set -e; mkdir -p $q_logs; log=\$(cd $q_logs && pwd)/\$(hostname).log; cd $q_remote; echo \"== \$(date -u +%FT%TZ) start\" >> \"\$log\"; JAX_PLATFORMS=tpu setsid nohup $q_python $q_args< /dev/null >> \"\$log\" 2>&1 & pid=\$!; echo \"\$pid\" > \"\${log%.log}.pid\"; echo \"\$(hostname): started process \$pid, log \$log\"; sleep $START_CHECK_S; if ! kill -0 \"\$pid\" 2>/dev/null; then rc=0; wait \"\$pid\" || rc=\$?; echo \"\$(hostname): process \$pid exited with status \$rc:\"; tail -n 20 \"\$log\"; exit \"\$rc\"; fi"
if [[ "$DRY_RUN" != 1 ]]; then
  echo "started on every worker of $TPU_NAME; follow process 0 with:"
  echo "  $(printf '%q ' gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=0 \
    "${GCLOUD_FLAGS[@]}" --command="tail -f $q_logs/*.log")"
fi
