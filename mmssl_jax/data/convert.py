"""Converts a dataset folder to the MMSSL JSON or the MMRec .inter layout.

  python -m mmssl_jax.data.convert --input=DIR --output=DIR --to=mmssl|mmrec

The input is loaded and validated exactly as training would load it
(`formats.load_folder`), so a successful conversion also checks the data. Bad
data prints `error: <message>` on one line and exits with status 1.
"""

from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags

from mmssl_jax.data import formats
from mmssl_jax.data.dataset import DataError, print_error

_INPUT = flags.DEFINE_string("input", None, "Dataset folder to read.",
                             required=True)
_OUTPUT = flags.DEFINE_string("output", None,
                              "Folder to write; must be new or empty.",
                              required=True)
_TO = flags.DEFINE_enum("to", None, ["mmssl", "mmrec"], "Output format.",
                        required=True)
_FORMAT = flags.DEFINE_enum("format", "auto", list(formats.FORMATS),
                            "Input format ('auto' detects it).")
_MODALITIES = flags.DEFINE_list(
    "modalities", [], "Modalities to carry over (default: every *_feat.npy).")


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  write = formats.write_mmssl if _TO.value == "mmssl" else formats.write_mmrec
  try:
    ds = formats.load_folder(_INPUT.value, format=_FORMAT.value,
                             modalities=_MODALITIES.value)
    write(ds, _OUTPUT.value)
  except DataError as e:
    return print_error(e)
  print(ds.summary())
  return 0


if __name__ == "__main__":
  app.run(main)
