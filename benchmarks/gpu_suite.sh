#!/usr/bin/env bash
# Per-epoch training time of MMSSL on TikTok and Amazon-Sports on one GPU,
# for comparison with the released PyTorch code, whose training log reports
# 30 s per TikTok epoch on the authors' GPU (187 s per Amazon-Sports epoch).
#
#   bash benchmarks/gpu_suite.sh --prepare             # once, with PyPI access
#   bash benchmarks/gpu_suite.sh [RESULTS_DIR]         # the suite (default: $OUT)
#   bash benchmarks/gpu_suite.sh --dry-run RESULTS_DIR # on the CPU, small
#
# --prepare fills .gpu_suite/ (git-ignored): the wheels of the two
# pure-Python dependencies a bare JAX GPU image lacks (jraph, ml_collections)
# and a copy of the two dataset folders (from GPU_SUITE_DATA, default
# $MMSSL_DATA, else data/). Copy the checkout with .gpu_suite/ to the GPU machine and
# run the suite there with a wall-clock limit of about 360 s: its runs stop
# themselves within GPU_SUITE_BUDGET_S (300 s) of wall time, and installing
# from the wheels takes a few seconds.
#
# Runs, in order (each in its own process, under its own `timeout`, so one
# failing or slow run leaves the others; a failure is a JSON line with
# "error"):
#   env                   nvidia-smi, python, jax devices
#   tiktok_dense          configs/tiktok.py, the released dense critic
#   tiktok_lowrank_fused  critic.kind=lowrank, train.generator_block=4096
#   sports_lowrank_fused  configs/sports.py on amazon_sports with SYNTHETIC
#                         image 4096 / text 1024 features (the folder has
#                         none; seeded N(0,1), stated in the JSON), low-rank
#                         critic, fused generator
#   sports_dense          the same with the dense critic: only when named in
#                         GPU_SUITE_ONLY (it needs about 180 s more)
# Each times --iters steps after compilation, then one full epoch (cut short
# at its time slot: "epoch_complete": false, epoch_s extrapolated), then one
# validation pass; the JSON has device_kind and device_peak_gib.
#
# Files written to RESULTS_DIR: gpu_suite.json (one object: machine, jax
# version, date, and one entry per run with its "status": ok, failed,
# timeout or skipped), gpu_suite.jsonl (the raw JSON lines), gpu_suite.log
# (every command's output), env.txt (nvidia-smi). A summary table is printed
# last. The exit status is 0 only when the environment check and every run
# succeeded (1 otherwise, after the summary).
#
# Environment:
#   PYTHON=python3          the interpreter (the GPU image's python3 holds jax)
#   GPU_SUITE_DRY=1         CPU dry run, as --dry-run: 2 iterations, batch
#                           128, short epochs, JAX_PLATFORMS=cpu; otherwise
#                           JAX_PLATFORMS=cuda (no GPU backend is an error)
#   GPU_SUITE_ONLY=a,b      run only these labels (env is always run)
#   GPU_SUITE_BUDGET_S=300  wall-time budget of the whole suite
#   GPU_SUITE_DATA=DIR      folder holding tiktok/ and amazon_sports/
#                           (default: .gpu_suite/data, else $MMSSL_DATA,
#                           else data/)
set -euo pipefail
abspath() { [[ "$1" == /* ]] && echo "$1" || echo "$PWD/$1"; }
DRY=${GPU_SUITE_DRY:-0}
PREPARE=0
RESULTS_ARG=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --prepare) PREPARE=1 ;;
    -h | --help) sed -n '2,49p' "$0"; exit 0 ;;
    -*) echo "error: unknown option $arg (see --help)" >&2; exit 2 ;;
    *)
      if [[ -n "$RESULTS_ARG" ]]; then
        echo "error: one RESULTS_DIR only (got $RESULTS_ARG and $arg)" >&2
        exit 2
      fi
      RESULTS_ARG=$(abspath "$arg")
      ;;
  esac
done
if [[ -n "${GPU_SUITE_DATA:-}" ]]; then GPU_SUITE_DATA=$(abspath "$GPU_SUITE_DATA"); fi
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
CACHE=.gpu_suite

prepare() {
  mkdir -p "$CACHE/whl" "$CACHE/data"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_17_x86_64 --platform any \
    -d "$CACHE/whl" "jraph==0.0.6.dev0" "ml_collections==1.1.0"
  local d src=${GPU_SUITE_DATA:-${MMSSL_DATA:-data}}
  for d in tiktok amazon_sports; do
    mkdir -p "$CACHE/data/$d"
    cp "$src/$d"/{train,val,test}.json "$CACHE/data/$d/"
    if compgen -G "$src/$d/*_feat.npy" >/dev/null; then
      cp "$src/$d"/*_feat.npy "$CACHE/data/$d/"
    fi
  done
  chmod -R u+w "$CACHE"
  du -sh "$CACHE"/*
  echo "prepared $CACHE/: copy it to the GPU machine with the checkout"
}

if ((PREPARE)); then
  prepare
  exit 0
fi

RESULTS=${RESULTS_ARG:-${OUT:-}}
if [[ -z "$RESULTS" ]]; then
  echo "usage: $0 [--dry-run] RESULTS_DIR (or set OUT); $0 --prepare" >&2
  exit 2
fi
mkdir -p "$RESULTS"
JSONL=$RESULTS/gpu_suite.jsonl
JSON=$RESULTS/gpu_suite.json
LOG=$RESULTS/gpu_suite.log
: >"$JSONL"
: >"$LOG"
rm -f "$JSON"
BUDGET=${GPU_SUITE_BUDGET_S:-300}
ONLY=${GPU_SUITE_ONLY:-}
SUITE_START=$SECONDS
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

if [[ -n "${GPU_SUITE_DATA:-}" ]]; then
  DATA=$GPU_SUITE_DATA
elif [[ -d $CACHE/data ]]; then
  DATA=$CACHE/data
else
  DATA=${MMSSL_DATA:-data}
fi

# --- install: the repo on PYTHONPATH; jraph / ml_collections from wheels.
if ! "$PY" -c "import jraph, ml_collections" >/dev/null 2>&1; then
  if compgen -G "$CACHE/whl/*.whl" >/dev/null; then
    SITE=${TMPDIR:-/tmp}/gpu_suite_site
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$SITE" "$CACHE"/whl/*.whl >>"$LOG" 2>&1; then
      export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
      # Both are pure Python: importable from the wheel files themselves.
      echo "pip install of $CACHE/whl failed; importing from the wheels" >>"$LOG"
      for whl in "$REPO/$CACHE"/whl/*.whl; do
        export PYTHONPATH="$whl${PYTHONPATH:+:$PYTHONPATH}"
      done
    fi
  else
    echo "jraph/ml_collections missing and no $CACHE/whl: pip install -e ." \
      | tee -a "$LOG"
    "$PY" -m pip install -q --retries 0 --timeout 10 -e . >>"$LOG" 2>&1 || true
  fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [[ "$DRY" == 1 ]]; then
  export JAX_PLATFORMS=cpu
  export GPU_SUITE_DRY=1
  # Cheaper CPU compilation (tests/helpers.py FAST_XLA_FLAGS).
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
else
  # CUDA or nothing: a machine without a working GPU backend fails the env
  # check instead of timing the CPU.
  export JAX_PLATFORMS=cuda
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/gpu_suite_jax_cache}
fi

# error_json LABEL RC TIMEOUT MESSAGE [PARTIAL_JSON]: one JSON line for a
# failed run, keeping the numbers of its last "partial" line if it printed
# one; its "status" is skipped (budget used up), timeout or failed.
error_json() {
  "$PY" - "$@" <<'EOF'
import json, sys
label, rc, timeout, message = sys.argv[1:5]
rec = {"benchmark": "env" if label == "env" else "train_speed", "label": label}
if len(sys.argv) > 5 and sys.argv[5]:
  try:
    rec.update(json.loads(sys.argv[5]))
  except ValueError:
    pass
rec.pop("partial", None)
status = ("skipped" if message.startswith("skipped") else
          "timeout" if int(rc) in (124, 137) else "failed")
rec.update(error=message, rc=int(rc), timeout_s=int(timeout), status=status)
print(json.dumps(rec))
EOF
}

# --- env
{
  echo "== env"
  date -u +%FT%TZ
  if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "no nvidia-smi"; fi
} >"$RESULTS/env.txt" 2>&1 || true
cat "$RESULTS/env.txt" >>"$LOG"
if ! timeout 60 "$PY" - "$DRY" >"$TMP/env.json" 2>>"$LOG" <<'EOF'
import json, os, platform, subprocess, sys
import jax
rec = {"benchmark": "env", "dry_run": sys.argv[1] == "1",
       "hostname": platform.node(), "python": platform.python_version(),
       "jax": jax.__version__, "jax_platforms": os.environ.get("JAX_PLATFORMS")}
try:
  d = jax.devices()
  rec.update(backend=jax.default_backend(), device_kind=d[0].device_kind,
             devices=[str(x) for x in d])
except Exception as e:  # pylint: disable=broad-except
  rec["error"] = (f"no {rec['jax_platforms']} backend: jax.devices() raised "
                  f"{type(e).__name__}: {e}".strip())
try:
  rec["nvidia_smi"] = subprocess.run(
      ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,"
       "clocks.sm,clocks.max.sm", "--format=csv,noheader"],
      capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError):
  pass
try:
  import mmssl_jax, jraph, ml_collections  # noqa: F401
  rec["imports_ok"] = True
except ImportError as e:
  rec["imports_ok"] = False
  rec["import_error"] = str(e)
try:
  rec["git_commit"] = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
      timeout=10).stdout.strip() or None
except (OSError, subprocess.SubprocessError):
  pass
print(json.dumps(rec))
EOF
then
  error_json env 1 60 "$(tail -n 1 "$LOG")" >"$TMP/env.json"
fi
cat "$TMP/env.json" | tee -a "$JSONL"
BACKEND=$("$PY" -c 'import json,sys; print(json.load(sys.stdin).get("backend",""))' \
  <"$TMP/env.json" 2>/dev/null || true)
ENV_OK=1
if [[ -z "$BACKEND" ]]; then
  ENV_OK=0
elif [[ "$DRY" != 1 && "$BACKEND" != gpu ]]; then
  echo "error: jax backend is '$BACKEND', not gpu; --dry-run for a CPU dry run" \
    | tee -a "$LOG" >&2
  ENV_OK=0
fi
if ((!ENV_OK)); then
  echo "error: the environment check failed (see $LOG); no runs" >&2
fi

# --- runs: LABEL TIMEOUT_S ARGS...
# No --split (the step timed again without the critic): a second compilation
# the budget has no room for.
if [[ "$DRY" == 1 ]]; then
  ITERS=(--iters=2)
  EPOCH=(--full_epoch --max_epoch_s=3)
  EXTRA=(--config.train.batch_size=128)
else
  ITERS=(--iters=10)
  EPOCH=(--full_epoch)
  EXTRA=()
fi
TIKTOK=(--config=configs/tiktok.py --config.data.dir="$DATA/tiktok")
SPORTS=(--config=configs/sports.py --config.data.dir="$DATA/amazon_sports"
        --synthetic_features=image:4096,text:1024 --synthetic_seed=0)
LOWRANK=(--config.critic.kind=lowrank --config.train.generator_block=4096)

# run_one LABEL SLOT_S ARGS...: one train_speed.py run in its time slot
# (cut to what is left of the budget). OPTIONAL=1 before it: only when
# named in GPU_SUITE_ONLY.
run_one() {
  local label=$1 slot=$2
  shift 2
  if [[ -n "$ONLY" && ",$ONLY," != *",$label,"* ]]; then
    return 0
  fi
  if [[ "${OPTIONAL:-0}" == 1 && ",$ONLY," != *",$label,"* ]]; then
    echo "== $label skipped (only when named in GPU_SUITE_ONLY)" >>"$LOG"
    return 0
  fi
  if ((!ENV_OK)); then
    return 0
  fi
  local left=$((BUDGET - (SECONDS - SUITE_START)))
  if ((slot > left)); then slot=$left; fi
  if ((slot < 20)); then
    error_json "$label" 124 "$slot" "skipped: suite budget ${BUDGET}s used up" \
      | tee -a "$JSONL"
    return 0
  fi
  # The epoch stops early enough to leave time for the validation pass.
  local deadline=$((slot * 3 / 4))
  echo "== $label (timeout ${slot}s): $*" >>"$LOG"
  local rc=0
  timeout --kill-after=10 "$slot" "$PY" benchmarks/train_speed.py \
    --label="$label" --progress --deadline_s="$deadline" "$@" "${EXTRA[@]}" \
    >"$TMP/out" 2>"$TMP/err" || rc=$?
  cat "$TMP/out" "$TMP/err" >>"$LOG"
  local line
  line=$(grep '^{' "$TMP/out" | tail -n 1 || true)
  if ((rc == 0)) && [[ -n "$line" && "$line" != *'"partial": true'* ]]; then
    echo "$line" | "$PY" -c 'import json, sys
rec = json.loads(sys.stdin.read())
rec["status"] = "ok"
print(json.dumps(rec))' | tee -a "$JSONL"
  else
    local msg last
    # The exception line of a traceback (JAX prints a note after it), else
    # an "error: ..." line, else the last line.
    last=$(grep -E '^([A-Za-z_][A-Za-z0-9_.]*(Error|Exception|Interrupt|Exit)|error)\b' \
      "$TMP/err" | tail -n 1 || true)
    [[ -n "$last" ]] || last=$(grep -v '^[[:space:]]*$' "$TMP/err" | tail -n 1 || true)
    if ((rc == 124 || rc == 137)); then
      msg="timed out after ${slot}s; last output: ${last:-none}"
    else
      msg=${last:-"exit status $rc, no JSON line"}
    fi
    error_json "$label" "$rc" "$slot" "$msg" "$line" | tee -a "$JSONL"
  fi
}

# The TikTok figures first: they matter most. Slots add up to 280 s; the
# env check takes the rest of the 300 s default budget.
run_one tiktok_dense 110 "${TIKTOK[@]}" "${ITERS[@]}" "${EPOCH[@]}" --nosplit
run_one tiktok_lowrank_fused 90 "${TIKTOK[@]}" "${LOWRANK[@]}" "${ITERS[@]}" \
  "${EPOCH[@]}" --nosplit
run_one sports_lowrank_fused 80 "${SPORTS[@]}" "${LOWRANK[@]}" "${ITERS[@]}" \
  "${EPOCH[@]}" --nosplit
OPTIONAL=1 run_one sports_dense 180 "${SPORTS[@]}" --iters=5 "${EPOCH[@]}" \
  --nosplit

# --- summary: gpu_suite.json, the table; exit 1 if anything failed.
WALL=$((SECONDS - SUITE_START))
echo "suite wall time: $WALL s; results: $JSON"
rc=0
"$PY" - "$JSONL" "$JSON" "$BUDGET" "$WALL" "$ENV_OK" <<'EOF' || rc=$?
import datetime, json, sys
jsonl, out, budget, wall, env_ok = sys.argv[1:6]
# s/epoch of the released PyTorch code on the authors' GPU (its training log).
RELEASED = {"tiktok": 30, "amazon_sports": 187}
rows = [json.loads(l) for l in open(jsonl) if l.strip()]
env = next((r for r in rows if r.get("benchmark") == "env"), {})
runs = [r for r in rows if r.get("benchmark") == "train_speed"]
for r in runs:
  r.setdefault("status", "failed" if "error" in r else "ok")
env_ok = env_ok == "1"
failed = [r.get("label", "?") for r in runs if r["status"] != "ok"]
machine = {k: env.get(k) for k in (
    "hostname", "backend", "device_kind", "devices", "nvidia_smi", "python",
    "jax_platforms", "git_commit", "imports_ok")}
if not env_ok:
  machine["error"] = env.get("error") or (
      f"jax backend is {env.get('backend')!r}, not gpu")
summary = {
    "benchmark": "gpu_suite",
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"),
    "jax": env.get("jax"), "dry_run": bool(env.get("dry_run")),
    "machine": machine, "budget_s": int(budget), "wall_s": int(wall),
    "status": "ok" if env_ok and not failed else "failed",
    "failed_runs": failed if env_ok else ["env"] + failed,
    "runs": runs,
}
with open(out, "w") as f:
  json.dump(summary, f, indent=1)
  f.write("\n")

print(f"device: {env.get('device_kind')} ({env.get('backend')}), "
      f"jax {env.get('jax')}" + (" DRY RUN" if env.get("dry_run") else "")
      + ("" if env_ok else f"; env error: {machine['error']}"))
head = ("run", "compile s", "s/iter", "epoch s", "steps", "released s",
        "ratio", "peak GiB")
fmt = "{:<22}{:>10}{:>9}{:>9}{:>10}{:>11}{:>7}{:>9}"
print(fmt.format(*head))
for r in runs:
  r = dict(r)
  if "iter_s_median" not in r:
    print(f"{r['label']:<22}{r['status']}: {r.get('error', '?')[:90]}")
    continue
  if r["status"] != "ok":
    print(f"{r['label']:<22}{r['status']} (numbers so far below): "
          f"{r.get('error', '?')[:60]}")
  ep = r.get("epoch_s")
  if ep is None:
    ep = r.get("epoch_s_estimate") or (
        r["iter_s_median"] * r["steps_per_epoch"])
    r["epoch_complete"], r["epoch_steps_done"] = False, 0
  steps = f"{r.get('epoch_steps_done')}/{r.get('steps_per_epoch')}"
  rel = RELEASED.get(r.get("dataset"))
  ratio = f"{ep / rel:.3f}" if ep and rel else "-"
  peak = r.get("device_peak_gib")
  print(fmt.format(r.get("label", "?"), f"{r['compile_s']:.1f}",
                   f"{r['iter_s_median']:.4f}",
                   f"{ep:.2f}" + ("" if r.get("epoch_complete") else "*"),
                   steps, rel or "-", ratio,
                   "-" if peak is None else f"{peak:.2f}"))
print("* epoch not run to the end (time slot): extrapolated from the steps "
      "done (0: from s/iter). Sports features are synthetic (image 4096, "
      "text 1024). released: the PyTorch code on the authors' GPU.")
if summary["status"] != "ok":
  print(f"FAILED: {', '.join(summary['failed_runs'])}")
  sys.exit(1)
EOF
exit "$rc"
