#!/usr/bin/env bash
# N CPU processes on this machine, joined by jax.distributed over loopback.
#
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=2 launch/local_multiprocess.sh \
#       launch/distributed_step.py --config=configs/test.py --steps=1
#   # once mmssl_jax.main takes the distributed flags (see README):
#   launch/local_multiprocess.sh -m mmssl_jax.main \
#       --config=configs/test.py --workdir=/tmp/mmssl_mp
#
# Each process i runs `$PYTHON "$@" --coordinator_address=127.0.0.1:$PORT
# --num_processes=$NUM_PROCESSES --process_id=$i` with
# XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS, so the
# mesh spans NUM_PROCESSES * DEVICES_PER_PROCESS CPU devices; cross-process
# collectives use gloo (`parallel.initialize_distributed`). Output of process
# i goes to $LOG_DIR/process_i.log (process 0's is also printed). The script
# exits non-zero if any process fails, and stops the others then.
set -euo pipefail

NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-2}"
PORT="${PORT:-$((20000 + RANDOM % 20000))}"
PYTHON="${PYTHON:-python}"
LOG_DIR="${LOG_DIR:-$(mktemp -d -t mmssl_mp.XXXXXX)}"
TIMEOUT="${TIMEOUT:-600}"
mkdir -p "$LOG_DIR"

if [[ $# -eq 0 ]]; then
  sed -n '2,17p' "$0"
  exit 2
fi

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

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
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; log: $LOG_DIR/process_$i.log" >&2
    tail -n 20 "$LOG_DIR/process_$i.log" >&2
    status=1
  fi
done
pids=()
cat "$LOG_DIR/process_0.log"
exit "$status"
