r"""Exports a trained run's representations as .npy files plus a manifest.

  python -m mmssl_jax.export --workdir=runs/tiktok --output=runs/tiktok_export

Loads the best-validation checkpoint (`restore.restore_run`;
`--checkpoint=latest|STEP` for another) and writes into `--output`, a new or
empty folder:

  user_embeddings.npy   (n_users, d) float32, the final u* in eval mode
  item_embeddings.npy   (n_items, d) float32, the final i* in eval mode
                        score(u, i) = user_embeddings[u] @ item_embeddings[i],
                        the score training, evaluation and
                        `mmssl_jax.recommend` rank by.
  MMSSL only, per modality m (`model.ForwardOutput`, eval mode):
  feat_user_<m>.npy     (n_users, d) H^m_U, the feature-graph user view
  feat_item_<m>.npy     (n_items, d) H^m_I, the feature-graph item view
  modality_user_<m>.npy (n_users, d) E^m_U, ID embeddings propagated over the
                        modality graph G^m
  modality_item_<m>.npy (n_items, d) E^m_I
  manifest.json         n_users, n_items, dim, modalities, score ("dot"),
                        every file with its shape and dtype, the checkpoint
                        step and epoch, the source workdir, the model name,
                        variant and ablation, the dataset.

With `--new_items=FOLDER` (a run trained with
`--config.model.cold_start=True`; FOLDER holds one `<modality>_feat.npy` per
modality of the run, N rows each, `mmssl_jax.new_items`) also:
  new_item_embeddings.npy (N, d) float32, the new items encoded from their
                        features by the run's inductive item encoder
                        (`model.encode_items`), in the space of
                        item_embeddings: score(u, new item r) =
                        user_embeddings[u] @ new_item_embeddings[r]; row r
                        is the item `mmssl_jax.recommend --new_items` calls
                        n_items + r. manifest.json adds "new_items_folder"
                        and "n_new_items".

  python -m mmssl_jax.export --workdir=runs/tiktok --output=runs/tiktok_export \
      --new_items=new_items

LightGCN runs have only the two final embedding files. The files are written
to a temporary folder that is renamed to `--output` when complete, so an
interrupted export leaves nothing behind. Errors print one line
`error: ...` and exit with status 1, writing nothing (a non-empty
`--output`, a workdir without checkpoints, a dataset that no longer loads:
pass `--data_dir`; with `--new_items` a run without the inductive encoder
or a bad new-items folder, named with the file and first bad row).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from typing import Any, Sequence

from absl import app
from absl import flags
import jax
import numpy as np

from mmssl_jax import model as model_lib
from mmssl_jax.data import print_error
from mmssl_jax.data.dataset import check_output_folder

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
DESCRIPTIONS = {
    "user_embeddings": "final user representations u* (eval mode)",
    "item_embeddings": "final item representations i* (eval mode)",
    "feat_user": "feature-graph user view H^m_U of modality {m}",
    "feat_item": "feature-graph item view H^m_I of modality {m}",
    "modality_user": "user ID view E^m_U over the modality graph of {m}",
    "modality_item": "item ID view E^m_I over the modality graph of {m}",
    "new_item_embeddings": "new items encoded from their features by the "
                           "inductive item encoder (model.encode_items), in "
                           "the space of item_embeddings; row r is new item "
                           "r (id n_items + r in mmssl_jax.recommend)",
}


class ExportError(ValueError):
  """A refused export (output folder in use); a one-line message."""


@functools.partial(jax.jit, static_argnames=("hp",))
def _mmssl_views(state, inputs, is_base, *, hp):
  out = model_lib.forward(state.params, inputs.graph, inputs.features,
                          state.modality_graphs, key=state.rng, train=False,
                          hp=hp, modality_is_base=is_base)
  return out.feat_user, out.feat_item, out.modality_user, out.modality_item


def representations(restored) -> dict[str, np.ndarray]:
  """Name -> host array of everything `export` writes (without `.npy`).

  The final embeddings come from `Run.final_embeddings`, the function
  evaluation and `recommend` use, so scores from the exported arrays are
  those of the model; MMSSL's per-modality views come from `model.forward`
  with train=False.
  """
  run, state, config = restored.run, restored.state, restored.config
  user, item = run.final_embeddings(state)
  out = {"user_embeddings": user, "item_embeddings": item}
  if config.model.name == "mmssl":
    views = _mmssl_views(state, run.inputs, run.modality_is_base(state),
                         hp=model_lib.ModelHParams.from_config(config.model))
    for prefix, view in zip(("feat_user", "feat_item", "modality_user",
                             "modality_item"), views):
      for m in restored.dataset.modalities:
        out[f"{prefix}_{m}"] = view[m]
  return {k: np.asarray(jax.device_get(v)) for k, v in out.items()}


def _description(name: str, modalities: Sequence[str]) -> str:
  if name in DESCRIPTIONS:
    return DESCRIPTIONS[name]
  for m in modalities:
    for prefix in ("feat_user", "feat_item", "modality_user", "modality_item"):
      if name == f"{prefix}_{m}":
        return DESCRIPTIONS[prefix].format(m=m)
  return ""


def build_manifest(restored, arrays: dict[str, np.ndarray], workdir: str,
                   new_items_folder: str | None = None) -> dict[str, Any]:
  config, ds, meta = restored.config, restored.dataset, restored.meta
  modalities = list(ds.modalities) if config.model.name == "mmssl" else []
  best = meta.best or {}
  new = ({"new_items_folder": os.path.abspath(new_items_folder),
          "n_new_items": int(arrays["new_item_embeddings"].shape[0])}
         if new_items_folder is not None else {})
  return {
      "format_version": FORMAT_VERSION,
      "score": "dot",
      "score_definition": "score(u, i) = user_embeddings[u] @ "
                          "item_embeddings[i]; higher ranks first",
      "n_users": int(ds.n_users),
      "n_items": int(ds.n_items),
      "dim": int(arrays["user_embeddings"].shape[1]),
      "modalities": modalities,
      "model": {"name": config.model.name,
                "variant": config.variant,
                "ablation": config.ablation,
                # u* = ū + c Σ_m n(H^m_U) (§2.3 g): what splits an export's
                # vectors into their ID and feature parts.
                **({"model_cat_rate": float(config.model.model_cat_rate)}
                   if config.model.name == "mmssl" else {})},
      "checkpoint": {"step": int(restored.step), "epochs_done": meta.epoch,
                     "best_epoch": best.get("epoch"), "val": best.get("val")},
      "source_workdir": os.path.abspath(workdir),
      "dataset": {"name": ds.name, "source": config.data.source,
                  "dir": (os.path.abspath(config.data.dir)
                          if config.data.source == "folder" else None)},
      **new,
      "files": {f"{name}.npy": {"shape": list(a.shape), "dtype": str(a.dtype),
                                "description": _description(name, modalities)}
                for name, a in arrays.items()},
  }


def check_output_dir(output: str) -> None:
  """Raises unless `output` is absent or an empty folder in an existing one."""
  check_output_folder(output)
  parent = os.path.dirname(os.path.abspath(output))
  if not os.path.isdir(parent):
    raise ExportError(f"--output={output}: folder {parent} does not exist")


def export(restored, output: str, *, workdir: str,
           new_items_folder: str | None = None) -> dict[str, Any]:
  """Writes the arrays and manifest.json into `output`; returns the manifest.

  With `new_items_folder` (`new_items.read_new_items`) also
  new_item_embeddings.npy, the new items encoded by the run's inductive
  item encoder.

  Raises DataError if `output` exists and is not an empty folder, or (with
  `new_items_folder`) for a run without the inductive encoder or a bad
  folder; nothing is written then.
  """
  from mmssl_jax import recommend  # pylint: disable=g-import-not-at-top
  check_output_dir(output)
  new = recommend.load_new_items(restored, new_items_folder)
  arrays = representations(restored)
  if new is not None:
    arrays["new_item_embeddings"] = new
  manifest = build_manifest(restored, arrays, workdir, new_items_folder)
  parent = os.path.dirname(os.path.abspath(output))
  tmp = tempfile.mkdtemp(dir=parent, prefix=".export-")
  try:
    for name, a in arrays.items():
      np.save(os.path.join(tmp, f"{name}.npy"), a, allow_pickle=False)
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
      json.dump(manifest, f, indent=2, sort_keys=False)
      f.write("\n")
    check_output_dir(output)
    os.replace(tmp, output)  # renames over an empty folder, too
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest


# ----------------------------------------------------------------------------
# Command line


def define_flags(flag_values: flags.FlagValues = flags.FLAGS
                 ) -> dict[str, flags.FlagHolder]:
  """Defines the flags on `flag_values` (the global FLAGS only when run as a
  program: no clash with `mmssl_jax.main`'s --workdir on import)."""
  from mmssl_jax import recommend  # pylint: disable=g-import-not-at-top
  return {
      **recommend.define_run_flags(flag_values),
      "output": flags.DEFINE_string(
          "output", None, "Folder to write; must be new or empty.",
          required=True, flag_values=flag_values),
      **recommend.define_new_items_flag(flag_values),
  }


def main(argv: Sequence[str], f: dict[str, flags.FlagHolder]) -> int:
  if len(argv) > 1:
    return print_error(f"unexpected arguments: {' '.join(argv[1:])}")
  from mmssl_jax import new_items  # pylint: disable=g-import-not-at-top
  from mmssl_jax import recommend  # pylint: disable=g-import-not-at-top
  from mmssl_jax import restore  # pylint: disable=g-import-not-at-top
  from mmssl_jax import run as run_lib  # pylint: disable=g-import-not-at-top
  from mmssl_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from mmssl_jax.data import DataError  # pylint: disable=g-import-not-at-top
  workdir, output = f["workdir"].value, f["output"].value
  folder = f["new_items"].value
  try:
    check_output_dir(output)  # before the (slow) restore
    if folder is not None:
      new_items.require_folder(folder)
    which = recommend.parse_checkpoint(f["checkpoint"].value)
    restored = restore.restore_run(workdir, which=which,
                                   data_dir=f["data_dir"].value)
    manifest = export(restored, output, workdir=workdir,
                      new_items_folder=folder)
  except (ExportError, recommend.UserError, DataError, run_lib.ConfigError,
          workdir_lib.ConfigMismatchError, FileNotFoundError,
          FileExistsError, OSError, ValueError) as e:
    return print_error(e)
  for name, info in manifest["files"].items():
    shape = tuple(info["shape"])
    print(f"{os.path.join(output, name)}  {info['dtype']}{shape}")
  print(os.path.join(output, MANIFEST))
  return 0


def run_cli(args: Sequence[str]) -> int:
  """`python -m mmssl_jax.export ARGS` in this process (own FlagValues);
  returns the exit status."""
  fv = flags.FlagValues()
  f = define_flags(fv)
  try:
    rest = fv(["mmssl_jax.export", *args])
  except flags.Error as e:
    return print_error(e)
  return main(rest, f)


if __name__ == "__main__":
  _flags = define_flags()
  app.run(lambda argv: main(argv, _flags))
