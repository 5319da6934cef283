"""Property-based tests of the dataset loaders (hypothesis).

* Any valid dataset written with `formats.write_mmssl` / `write_mmrec` (or as
  pickled scipy matrices) loads back identical: sizes, every split, and the
  features bit for bit.
* Any prefix of a valid train.json, and any single-byte corruption of a
  feature file, either loads or raises a one-line DataError naming the file;
  no other exception escapes the loader, including a NUL byte in the .npy
  header (numpy's header parser raises SyntaxError/TokenError there).
"""

from pathlib import Path
import json
import pickle
import tempfile

from hypothesis import assume, given, settings, strategies as st
from hypothesis.extra import numpy as hnp
import numpy as np
import pytest
import scipy.sparse as sp

from mmssl_jax.data import DataError, Dataset, Split
from mmssl_jax.data import formats

SETTINGS = settings(max_examples=30, deadline=None)
MODALITY_NAMES = ("audio", "image", "text.v2", "visual-1")


@st.composite
def datasets(draw, require_last_user=False):
  """A valid Dataset: each (user, item) pair is in at most one split, every
  split is non-empty, 1-2 modalities of finite float32 features."""
  n_users = draw(st.integers(1, 7))
  n_items = draw(st.integers(3, 9))
  labels = np.array(draw(st.lists(st.integers(0, 3),
                                  min_size=n_users * n_items,
                                  max_size=n_users * n_items)),
                    np.int64).reshape(n_users, n_items)
  # A user with every item in train leaves no negative item to sample.
  assume(((labels == 1).sum(axis=1) < n_items).all())
  splits = []
  for label in (1, 2, 3):  # 0: no interaction
    users, items = np.nonzero(labels == label)
    assume(users.size > 0)
    splits.append(Split(users, items))
  if require_last_user:  # MMRec files only list users with interactions
    assume((labels[-1] > 0).any())
  names = draw(st.lists(st.sampled_from(MODALITY_NAMES), min_size=1,
                        max_size=2, unique=True))
  modalities = {}
  for m in sorted(names):
    dim = draw(st.integers(1, 3))
    modalities[m] = draw(hnp.arrays(
        np.float32, (n_items, dim),
        elements=st.floats(-1e6, 1e6, width=32, allow_subnormal=False)))
  return Dataset("random", n_users, n_items, *splits, modalities=modalities)


def assert_same(loaded: Dataset, ds: Dataset) -> None:
  assert (loaded.n_users, loaded.n_items) == (ds.n_users, ds.n_items)
  for name in ("train", "val", "test"):
    a, b = getattr(loaded, name), getattr(ds, name)
    order = np.lexsort((b.items, b.users))
    np.testing.assert_array_equal(a.users, b.users[order])
    np.testing.assert_array_equal(a.items, b.items[order])
  assert list(loaded.modalities) == list(ds.modalities)
  for m, feat in ds.modalities.items():
    assert loaded.modalities[m].dtype == np.float32
    np.testing.assert_array_equal(loaded.modalities[m], feat)


@SETTINGS
@given(datasets())
def test_mmssl_round_trip(ds):
  with tempfile.TemporaryDirectory() as tmp:
    folder = formats.write_mmssl(ds, Path(tmp) / "d")
    assert formats.detect_format(folder) == "mmssl"
    assert_same(formats.load_folder(folder), ds)


@SETTINGS
@given(datasets(require_last_user=True))
def test_mmrec_round_trip(ds):
  with tempfile.TemporaryDirectory() as tmp:
    folder = formats.write_mmrec(ds, Path(tmp) / "d")
    assert formats.detect_format(folder) == "mmrec"
    assert_same(formats.load_folder(folder), ds)


@SETTINGS
@given(datasets())
def test_pickle_round_trip(ds):
  with tempfile.TemporaryDirectory() as tmp:
    folder = Path(tmp)
    for split, name in zip((ds.train, ds.val, ds.test), formats.PICKLE_FILES):
      mat = sp.coo_matrix((np.ones(len(split)), (split.users, split.items)),
                          shape=(ds.n_users, ds.n_items))
      with open(folder / name, "wb") as f:
        pickle.dump(mat, f)
    for m, feat in ds.modalities.items():
      np.save(folder / f"{m}_feat.npy", feat)
    assert formats.detect_format(folder) == "pickle"
    assert_same(formats.load_folder(folder), ds)


def _loads_or_names(folder: Path, file: Path) -> None:
  try:
    formats.load_folder(folder)
  except DataError as e:
    message = str(e)
    assert "\n" not in message
    assert str(file) in message, message


@SETTINGS
@given(datasets(), st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_train_json_never_escapes_as_another_error(ds, fraction):
  with tempfile.TemporaryDirectory() as tmp:
    folder = formats.write_mmssl(ds, Path(tmp) / "d")
    path = folder / "train.json"
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * fraction)])
    _loads_or_names(folder, path)


def _corrupt_feature_byte(ds, where, value, header: bool):
  with tempfile.TemporaryDirectory() as tmp:
    folder = formats.write_mmssl(ds, Path(tmp) / "d")
    path = folder / f"{next(iter(ds.modalities))}_feat.npy"
    data = bytearray(path.read_bytes())
    # .npy v1: 10 bytes of magic/version/length, then the padded header.
    header_end = 10 + int.from_bytes(data[8:10], "little")
    span = header_end if header else len(data) - header_end
    data[where % span + (0 if header else header_end)] = value
    path.write_bytes(bytes(data))
    _loads_or_names(folder, path)


@SETTINGS
@given(datasets(), st.integers(0, 10**6), st.integers(0, 255))
def test_corrupted_feature_data_byte_never_escapes_as_another_error(
    ds, where, value):
  _corrupt_feature_byte(ds, where, value, header=False)


def test_nul_byte_in_feature_header_is_a_data_error(tmp_path):
  folder = tmp_path / "d"
  folder.mkdir()
  for name, obj in (("train", {"0": [0], "1": [1]}), ("val", {"0": [1]}),
                    ("test", {"1": [0]})):
    (folder / f"{name}.json").write_text(json.dumps(obj))
  path = folder / "image_feat.npy"
  np.save(path, np.ones((3, 2), np.float32))
  data = bytearray(path.read_bytes())
  data[10] = 0  # the header dict's opening brace
  path.write_bytes(bytes(data))
  _loads_or_names(folder, path)
