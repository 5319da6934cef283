"""Every command in README.md's ```bash blocks runs (or, if it cannot, is checked).

The commands run in a sandbox that looks like a user's working folder:
`<sandbox>/work` is the current folder (with `configs` linked to the
repository's), `data/{tiktok,ml100k}` are tiny synthetic datasets in the
released layout (the default folders of configs/tiktok.py and ml100k.py),
`raw/` holds a tiny raw log for `mmssl_jax.data.prepare`, and `/tmp/...` paths
are moved into the sandbox. So `--workdir=runs/tiktok` and
`--config.data.dir=data/ml100k` are used as written. What is changed, to keep this test short:

* training (`python -m mmssl_jax.main`) runs in this process (the same flag
  parsing, config file and `train.train_and_evaluate`) for 1 epoch, with,
  for folder configs, batch size 64 (the tiny datasets have a few hundred
  interactions);
* `recommend` and `export` run in this process through their `run_cli`;
* the install command (it creates a virtualenv), `pytest` (this is it) and
  `tensorboard` (a server) are checked instead: shell syntax, that the
  modules, extras, paths and flags they name exist (the config file loads
  with the command's flags, `--helpshort` lists them), and that the
  TensorBoard logdir holds event files.

Every other command (`plot`, `prepare`, `convert`, ...) runs as written in a
subprocess. Commands depending on a workdir (recommend, export, plot, a
resume) first run the README command that trains it. A README command this
test does not know fails the test: extend `Sandbox.run` when adding one.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import importlib.util
import io
import json
import os
from pathlib import Path
import re
import shlex
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import numpy as np
import pytest

import helpers
from mmssl_jax import config_lib
from mmssl_jax import export
from mmssl_jax import main as main_lib
from mmssl_jax import recommend
from mmssl_jax import train
from mmssl_jax.data import formats
from mmssl_jax.data import synthetic
from mmssl_jax import workdir as workdir_lib
from mmssl_jax import run as run_lib

README = helpers.REPO_ROOT / "README.md"
TIMEOUT_S = 300
FOLDER_BATCH_SIZE = 64  # the tiny datasets: a few steps per epoch


# ----------------------------------------------------------------------------
# Parsing README


def _blocks(text: str, lang: str) -> list[tuple[str, str]]:
  """(section title, block text) of every ```lang block, in order."""
  out, section = [], ""
  for m in re.finditer(r"^(## [^\n]*)$|^```(\w*)\n(.*?)^```", text,
                       re.M | re.S):
    if m.group(1):
      section = m.group(1)[3:].strip()
    elif m.group(2) == lang:
      out.append((section, m.group(3)))
  return out


def bash_commands(text: str) -> list[tuple[str, str]]:
  """(section, command) for each command of the ```bash blocks (comments and
  blank lines dropped, backslash continuations joined)."""
  out = []
  for section, block in _blocks(text, "bash"):
    joined = re.sub(r"\\\n\s*", " ", block)
    for line in joined.splitlines():
      line = line.strip()
      if line and not line.startswith("#"):
        out.append((section, line))
  return out


COMMANDS = bash_commands(README.read_text(encoding="utf-8"))
IDS = [f"{re.sub(r'[^a-z]+', '_', s.lower()).strip('_')}-{n}"
       for n, (s, _) in enumerate(COMMANDS)]


def _flag(argv: list[str], name: str) -> str | None:
  for a in argv:
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
  return None


def _is_module(argv: list[str], module: str) -> bool:
  return (len(argv) >= 3 and argv[0] in ("python", "python3")
          and argv[1] == "-m" and argv[2] == module)


def _bash_syntax_ok(command: str) -> None:
  proc = subprocess.run(["bash", "-n", "-c", command], capture_output=True,
                        text=True, check=False)
  assert proc.returncode == 0, proc.stderr


def _setup_extras() -> dict[str, list[str]]:
  """setup.py's extras_require: extra name -> requirements."""
  tree = ast.parse((helpers.REPO_ROOT / "setup.py").read_text())
  for node in ast.walk(tree):
    if isinstance(node, ast.keyword) and node.arg == "extras_require":
      return ast.literal_eval(node.value)
  return {}


def _config_field_exists(dotted: str) -> bool:
  node = config_lib.base_config()
  for part in dotted.split("."):
    if part not in node:
      return False
    node = node[part]
  return True


# ----------------------------------------------------------------------------
# The sandbox


def _tiny(modality_dims, *, n_users=60, n_items=100, mean=10, seed=0):
  s = helpers.load_config("test").data.synthetic
  s.n_users, s.n_items, s.seed, s.mean_interactions = (n_users, n_items, seed,
                                                       mean)
  s.modality_dims = dict(modality_dims)
  s.modality_noise = {m: 0.5 for m in modality_dims}
  return synthetic.make_synthetic(s)


def _write_raw(folder: Path) -> None:
  """raw/ratings.csv, raw/items.txt, raw/image.npy, raw/text.npy."""
  ds = _tiny({"image": 8, "text": 6}, n_users=80, n_items=120, mean=20,
             seed=1)
  folder.mkdir(parents=True)
  rows = ["user,item,timestamp"]
  for split in (ds.train, ds.val, ds.test):
    rows += [f"u{u},i{i},{1000 + n}" for n, (u, i) in enumerate(
        zip(split.users.tolist(), split.items.tolist()))]
  (folder / "ratings.csv").write_text("\n".join(rows) + "\n")
  (folder / "items.txt").write_text(
      "\n".join(f"i{i}" for i in range(ds.n_items)) + "\n")
  for m, feats in ds.modalities.items():
    np.save(folder / f"{m}.npy", feats)


class Sandbox:
  """Runs README commands in `<root>/work`; remembers what it trained."""

  def __init__(self, root: Path):
    self.root = root
    self.work = root / "work"
    self.tmp = root / "tmp"
    self.work.mkdir(parents=True)
    self.tmp.mkdir()
    (self.work / "configs").symlink_to(helpers.REPO_ROOT / "configs")
    data = self.work / "data"
    # TikTok with audio and image features, ML-100K with text and genre.
    formats.write_mmssl(_tiny({"image": 10, "audio": 6}), data / "tiktok")
    formats.write_mmssl(_tiny({"text": 9, "genre": 5}), data / "ml100k")
    _write_raw(self.work / "raw")
    # Features of 4 items the TikTok run has never seen (recommend/export
    # --new_items).
    (self.work / "new_items").mkdir()
    rng = np.random.default_rng(2)
    for m, dim in (("image", 10), ("audio", 6)):
      np.save(self.work / "new_items" / f"{m}_feat.npy",
              rng.normal(size=(4, dim)).astype(np.float32))
    (self.work / "users.txt").write_text("3\n17\n42\n")
    self.done: dict[int, object] = {}  # command index -> result

  # -- helpers --------------------------------------------------------------

  def argv(self, command: str) -> list[str]:
    """shlex-split with /tmp/... moved into the sandbox."""
    command = re.sub(r"(?<![\w.])/tmp/", f"{self.tmp}/", command)
    return shlex.split(command)

  @contextlib.contextmanager
  def cwd(self):
    old = os.getcwd()
    os.chdir(self.work)
    try:
      yield
    finally:
      os.chdir(old)

  def path(self, relative: str) -> Path:
    p = Path(relative)
    return p if p.is_absolute() else self.work / p

  def training_command(self, workdir: str) -> int:
    """Index of the first README command that trains `workdir`."""
    for n, (_, command) in enumerate(COMMANDS):
      argv = self.argv(command)
      if _is_module(argv, "mmssl_jax.main") and "&&" not in command and (
          _flag(argv, "workdir") == workdir):
        return n
    raise AssertionError(f"no README command trains --workdir={workdir}")

  def producing_command(self, output: str) -> int:
    """Index of the first README command writing `--output=output`."""
    for n, (_, command) in enumerate(COMMANDS):
      if f"--output={output}" in command:
        return n
    raise AssertionError(f"no README command writes {output}")

  def ensure_trained(self, workdir: str) -> Path:
    n = self.training_command(workdir)
    if n not in self.done:
      self.run(n)
    path = self.path(workdir)
    assert workdir_lib.checkpoint_steps(str(path)), path
    return path

  # -- commands ---------------------------------------------------------------

  def run(self, n: int):
    if n in self.done:
      return self.done[n]
    _, command = COMMANDS[n]
    _bash_syntax_ok(command)
    if "&&" in command:
      result = self.check_chain(command)
    else:
      argv = self.argv(command)
      if _is_module(argv, "mmssl_jax.main"):
        result = self.train(argv)
      elif _is_module(argv, "mmssl_jax.recommend"):
        result = self.recommend(argv)
      elif _is_module(argv, "mmssl_jax.export"):
        result = self.export(argv)
      elif _is_module(argv, "pytest"):
        result = self.check_pytest(argv)
      elif argv[0] == "tensorboard":
        result = self.check_tensorboard(argv)
      elif argv[0] in ("python", "python3"):
        result = self.run_subprocess(argv)
      else:
        raise AssertionError(f"README command not handled by this test: "
                             f"{command}")
    self.done[n] = result
    return result

  def check_chain(self, command: str):
    """The install line: venv, activate, pip install -e ".[extra]", then a
    command; checked, not run."""
    for part in command.split("&&"):
      argv = self.argv(part)
      if _is_module(argv, "venv"):
        assert importlib.util.find_spec("venv") is not None
      elif argv[0] in (".", "source"):
        assert argv[1].endswith("/bin/activate"), part
      elif argv[0] == "pip" and argv[1] == "install":
        target = argv[-1]
        m = re.fullmatch(r"\.(?:\[([\w,]+)\])?", target)
        assert m and "-e" in argv, part
        assert (helpers.REPO_ROOT / "setup.py").exists()
        extras = set((m.group(1) or "").split(",")) - {""}
        assert extras <= set(_setup_extras()), (extras, _setup_extras())
      elif _is_module(argv, "mmssl_jax.main"):
        config, workdir = self.parse_main(argv[3:])
        assert workdir and config.train.epochs >= 1
        proc = subprocess.run(
            [sys.executable, "-m", "mmssl_jax.main", "--helpshort"],
            capture_output=True, text=True, timeout=TIMEOUT_S,
            cwd=helpers.REPO_ROOT, check=False)
        # absl prints the help and exits with status 1 (absl-py 2.x).
        assert proc.returncode in (0, 1), proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        for a in argv[3:]:
          assert a[2:].split("=")[0] in proc.stdout, (a, proc.stdout)
      else:
        raise AssertionError(f"README install line part not handled: {part}")
    return "checked"

  def check_pytest(self, argv: list[str]):
    assert importlib.util.find_spec("pytest") is not None
    args = argv[3:]
    if "-n" in args:  # pytest-xdist's worker count, from the test extra
      assert importlib.util.find_spec("xdist") is not None
      assert any(r.startswith("pytest-xdist") for r in _setup_extras()["test"])
    for flag in ("-n", "--dist"):  # flags with a value: drop both
      if flag in args:
        del args[args.index(flag):args.index(flag) + 2]
    for a in args:
      if not a.startswith("-"):
        assert (helpers.REPO_ROOT / a).exists(), a
    return "checked"

  def check_tensorboard(self, argv: list[str]):
    logdir = _flag(argv, "logdir")
    assert logdir, argv
    assert "tensorboard" in _setup_extras()
    # The README trains a run with train.tensorboard=True under this logdir.
    trained = [n for n, (_, c) in enumerate(COMMANDS)
               if "--config.train.tensorboard=True" in c]
    assert trained, "no README command writes TensorBoard events"
    for n in trained:
      self.run(n)
    assert list(self.path(logdir).rglob("events.out.tfevents.*"))
    return "checked"

  def parse_main(self, args: list[str]):
    """(config, workdir) as `mmssl_jax.main` parses its flags."""
    for a in args:  # only flags that mmssl_jax.main defines
      name = a[2:].split("=", 1)[0].split(".", 1)[0]
      assert name in main_lib.FLAGS, a
    argv = ["mmssl_jax.main", *args]
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "", flag_values=fv)
    # config_flags finds the --config.x=... overrides in sys_argv.
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv,
                                    lock_config=True, sys_argv=argv)
    with self.cwd():
      fv(argv)
      return fv.config, fv.workdir

  def train(self, argv: list[str]):
    args = [a for a in argv[3:] if not a.startswith("--config.train.epochs=")]
    for a in args:
      m = re.match(r"--config\.([\w.]+)=", a)
      if m and not _config_field_exists(m.group(1)):
        pytest.fail(f"README names config field {m.group(1)}, which "
                    "config_lib.base_config() does not have")
    args.append("--config.train.epochs=1")
    data_dir = _flag(args, "config.data.dir")
    if data_dir is not None and not self.path(data_dir).exists():
      self.run(self.producing_command(data_dir))  # made by an earlier command
    if self.parse_main(args)[0].data.source == "folder":
      args.append(f"--config.train.batch_size={FOLDER_BATCH_SIZE}")
    config, workdir = self.parse_main(args)
    path = self.path(workdir)
    before = workdir_lib.read_records(
        str(path / workdir_lib.METRICS_FILE))
    complete = bool(before) and before[-1].get("final")
    with self.cwd():
      result = train.train_and_evaluate(config, workdir)
    records = workdir_lib.read_records(str(path / workdir_lib.METRICS_FILE))
    assert records[-1]["final"] is True and result["final"] is True
    if complete:  # re-running a finished run returns it, trains nothing
      assert records == before
    assert workdir_lib.checkpoint_steps(str(path))
    return result

  def recommend(self, argv: list[str]):
    self.ensure_trained(_flag(argv, "workdir"))
    out = io.StringIO()
    with self.cwd():
      status = recommend.run_cli(argv[3:], stdout=out)
    assert status == 0
    k = int(_flag(argv, "k") or 20)
    output = _flag(argv, "output")
    if output is not None:
      text = self.path(output).read_text()
      assert out.getvalue() == ""
    else:
      text = out.getvalue()
    fmt = recommend.resolve_format(_flag(argv, "format"), output)
    users = (None if "--all-users" in argv else
             recommend.parse_user_ids(_flag(argv, "users") or self.path(
                 _flag(argv, "users-file")).read_text()))
    if fmt == "table":
      rows = [line.split() for line in text.splitlines()[1:]]
      got = [int(r[0]) for r in rows[::k]]
    elif fmt == "json":
      objs = [json.loads(line) for line in text.splitlines()]
      assert all(len(o["items"]) == k for o in objs)
      got = [o["user"] for o in objs]
    else:
      rows = list(csv.DictReader(io.StringIO(text)))
      got = [int(r["user"]) for r in rows[::k]]
    if users is None:
      config = workdir_lib.load_config_json(str(self.path(_flag(
          argv, "workdir")) / workdir_lib.CONFIG_FILE))
      with self.cwd():
        n_users = run_lib.load_dataset(config.data).n_users
      assert got == list(range(n_users))
    else:
      assert got == users
    return text

  def export(self, argv: list[str]):
    self.ensure_trained(_flag(argv, "workdir"))
    with self.cwd():
      status = export.run_cli(argv[3:])
    assert status == 0
    output = self.path(_flag(argv, "output"))
    manifest = json.loads((output / export.MANIFEST).read_text())
    for name, info in manifest["files"].items():
      assert list(np.load(output / name).shape) == info["shape"]
    return manifest

  def run_subprocess(self, argv: list[str]):
    for name in ("workdir",):
      for workdir in (_flag(argv, name) or "").split(","):
        if workdir:
          self.ensure_trained(workdir)
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    proc = subprocess.run(argv, cwd=self.work, capture_output=True, text=True,
                          env=env, timeout=TIMEOUT_S, check=False)
    assert proc.returncode == 0, (argv, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    output = _flag(argv, "output")
    if output is not None:
      assert any(self.path(output).iterdir()), output
    if _is_module(argv, "mmssl_jax.data.prepare") or _is_module(
        argv, "mmssl_jax.data.convert"):
      ds = formats.load_folder(self.path(output))  # a loadable dataset
      assert ds.n_users > 0 and ds.modalities
    return proc


@pytest.fixture(scope="module", name="sandbox")
def sandbox_fixture(tmp_path_factory):
  return Sandbox(tmp_path_factory.mktemp("readme"))


# ----------------------------------------------------------------------------
# Tests


def test_readme_has_the_sections_and_commands():
  text = README.read_text(encoding="utf-8")
  for title in ("Recommend and export", "Curves", "Preparing a dataset",
                "Checkpoints, resume and preemption"):
    assert f"\n## {title}\n" in text
  modules = {shlex.split(c)[2] for _, c in COMMANDS
             if c.startswith("python -m ")}
  assert {"mmssl_jax.main", "mmssl_jax.recommend", "mmssl_jax.export",
          "mmssl_jax.plot", "mmssl_jax.data.prepare"} <= modules
  for module in modules:
    assert importlib.util.find_spec(module) is not None, module


@pytest.mark.parametrize("n", range(len(COMMANDS)), ids=IDS)
def test_readme_command(sandbox, n):
  sandbox.run(n)


def test_readme_python_block(sandbox):
  blocks = _blocks(README.read_text(encoding="utf-8"), "python")
  assert blocks
  for _, code in blocks:
    for workdir in set(re.findall(r'restore_best\("([^"]+)"\)', code)):
      sandbox.ensure_trained(workdir)
    for folder in set(re.findall(r'np.load\("([^"]+)/[^/"]+"\)', code)):
      if not (sandbox.work / folder).exists():
        sandbox.run(sandbox.producing_command(folder))
    namespace: dict = {}
    with sandbox.cwd():
      code_object = compile(code, str(README), "exec")
      exec(code_object, namespace)  # pylint: disable=exec-used
    if "item_ids" in namespace:
      assert namespace["item_ids"].shape == namespace["scores"].shape


def test_a_command_naming_an_unknown_config_field_fails(sandbox):
  """A README command with a config field that does not exist fails the
  test (it is never skipped)."""
  argv = shlex.split("python -m mmssl_jax.main --config=configs/test.py "
                     "--config.train.no_such_field=1 --workdir=runs/x")
  with pytest.raises(pytest.fail.Exception, match="train.no_such_field"):
    sandbox.train(argv)
