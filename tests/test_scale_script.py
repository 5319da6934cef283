"""benchmarks/scale.py --compile_only on a tiny catalogue prints the XLA
buffer sizes README quotes (the timed mode is the train step itself, which
tests/test_scale.py checks)."""

import json
import subprocess
import sys

import helpers


def _scale(*args):
  proc = subprocess.run(
      [sys.executable, str(helpers.REPO_ROOT / "benchmarks/scale.py"),
       "--items=1500", "--no_dense", *args], capture_output=True, text=True,
      check=True, timeout=300, env=helpers.device_env(1))
  lines = [json.loads(l) for l in proc.stdout.splitlines()
           if l.startswith("{")]
  assert len(lines) == 1, proc.stdout + proc.stderr[-2000:]
  assert "error" not in lines[0], lines[0]
  return lines[0]


def test_compile_only_reports_xla_buffer_sizes():
  out = _scale("--compile_only")
  assert out["benchmark"] == "scale_memory"
  # The state: U = I = 1500, d = 64, embeddings + two Adam moments at least.
  assert out["xla_argument_gib"] * 2**30 >= 3 * 2 * 1500 * 64 * 4
  assert out["xla_temp_gib"] > 0
  # The step compiles with the memory-optimised scheduler, whose scratch is
  # smaller than under XLA:CPU's default one (85.3 -> 72.0 MB here).
  assert out["xla_temp_gib"] < 0.95 * out["xla_temp_gib_default_scheduler"]
  # The donated state comes back in the same buffers.
  assert out["xla_alias_gib"] > 0.9 * out["xla_output_gib"]
  assert "iter_s_median" not in out
