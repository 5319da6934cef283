#!/usr/bin/env bash
# N CPU processes on this machine, joined by jax.distributed over loopback.
#
#   # a full training run (2 processes x 2 CPU devices = one 4-device mesh):
#   launch/local_multiprocess.sh -m mmssl_jax.main --config=configs/test.py \
#       --config.train.data_parallel=0 --workdir=/tmp/mmssl_mp
#
# Each process i runs `$PYTHON "$@" --coordinator_address=127.0.0.1:$PORT
# --num_processes=$NUM_PROCESSES --process_id=$i` with
# XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS, so the
# mesh spans NUM_PROCESSES * DEVICES_PER_PROCESS CPU devices; cross-process
# collectives use gloo (`multihost.initialize`). A main run equals
# a one-process run on as many devices (tests/test_multihost.py runs it
# through this script); process 0 writes the workdir's files and log, and
# re-running the command resumes.
# Output of process i goes to $LOG_DIR/process_i.log; process 0's is printed
# at the end. SIGTERM/SIGINT to this script are passed on to every process
# (they agree on a step, checkpoint together and exit 143/130). The script
# exits with the first non-zero status of a process (0 if all succeed); once
# one has failed, the others get GRACE seconds to finish, then are killed.
# Do not set JAX_COMPILATION_CACHE_DIR for these CPU processes: with jax
# 0.10.2 their first step hung when it came from the persistent cache.
set -euo pipefail

NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-2}"
PORT="${PORT:-$((20000 + RANDOM % 20000))}"
PYTHON="${PYTHON:-python}"
LOG_DIR="${LOG_DIR:-$(mktemp -d -t mmssl_mp.XXXXXX)}"
TIMEOUT="${TIMEOUT:-600}"
GRACE="${GRACE:-30}"
mkdir -p "$LOG_DIR"

if [[ $# -eq 0 ]]; then
  sed -n '2,22p' "$0"
  exit 2
fi

pids=()
# `timeout` forwards TERM/INT to its python process; it also leads a process
# group of its own, so KILL goes to the group (timeout and python).
forward() {
  for pid in "${pids[@]}"; do
    [[ -n "$pid" ]] && kill -s "$1" "$pid" 2>/dev/null || true
  done
}
kill_all() {
  for pid in "${pids[@]}"; do
    [[ -n "$pid" ]] && kill -s KILL -- "-$pid" 2>/dev/null || true
  done
}
trap kill_all EXIT
trap 'forward TERM' TERM
trap 'forward INT' INT

for ((i = 0; i < NUM_PROCESSES; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS} ${XLA_FLAGS_EXTRA:-}" \
  JAX_PLATFORMS=cpu \
    timeout "$TIMEOUT" "$PYTHON" "$@" \
      --coordinator_address="127.0.0.1:${PORT}" \
      --num_processes="$NUM_PROCESSES" --process_id="$i" \
      >"$LOG_DIR/process_$i.log" 2>&1 &
  pids+=("$!")
done

status=0
failed_at=0
while :; do
  running=0
  for i in "${!pids[@]}"; do
    pid="${pids[$i]}"
    [[ -z "$pid" ]] && continue
    if kill -0 "$pid" 2>/dev/null; then
      running=1
      continue
    fi
    rc=0
    wait "$pid" || rc=$?
    pids[$i]=""
    if ((rc != 0)); then
      echo "process $i exited with status $rc; log: $LOG_DIR/process_$i.log" >&2
      tail -n 20 "$LOG_DIR/process_$i.log" >&2
      if ((status == 0)); then
        status=$rc
        failed_at=$SECONDS
      fi
    fi
  done
  ((running)) || break
  if ((status != 0 && SECONDS - failed_at > GRACE)); then
    echo "killing the processes still running ${GRACE}s after a failure" >&2
    kill_all
  fi
  sleep 1
done
trap - EXIT
cat "$LOG_DIR/process_0.log"
exit "$status"
