"""Shared output of the benchmark scripts: one JSON line, optionally a file."""

import json
import os


def emit(record: dict, output: str | None) -> None:
  """Prints `record` as one JSON line and, if `output`, writes it there."""
  print(json.dumps(record))
  if output:
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    with open(output, "w") as f:
      f.write(json.dumps(record, indent=1) + "\n")
