"""Shared pieces of the benchmark scripts: configs with overrides, the
machine, and the output (one JSON line, optionally a file)."""

import ast
import importlib.util
import json
import os
import platform


def emit(record: dict, output: str | None) -> None:
  """Prints `record` as one JSON line and, if `output`, writes it there."""
  print(json.dumps(record))
  if output:
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    with open(output, "w") as f:
      f.write(json.dumps(record, indent=1) + "\n")


def load_config(path: str, arg: str):
  """`get_config(arg)` of the config file at `path` (as config_flags does)."""
  spec = importlib.util.spec_from_file_location("_ablation_config", path)
  if spec is None:
    raise ValueError(f"--config={path}: not a Python file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def parse_value(text: str, current):
  """`text` parsed as a value of the type of the field's `current` value."""
  if isinstance(current, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ValueError(f"{text!r} is not a bool")
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if current is None:
      return text
    raise ValueError(f"{text!r} is not a Python literal") from None
  if isinstance(current, (tuple, list)):
    value = value if isinstance(value, (tuple, list)) else (value,)
    return type(current)(value)
  return value


def apply_overrides(config, overrides) -> None:
  """Sets each `dotted.key=value` of `overrides` on `config` (typed)."""
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep or not key:
      raise ValueError(f"--set {item!r} is not key=value")
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      if part not in node:
        raise ValueError(f"--set {item!r}: the config has no field {key!r}")
      node = node[part]
    if leaf not in node:
      raise ValueError(f"--set {item!r}: the config has no field {key!r}")
    try:
      value = parse_value(text, node[leaf])
    except ValueError as e:
      raise ValueError(f"--set {item!r}: {e}") from None
    with config.unlocked():
      node[leaf] = value


def machine() -> dict:
  """The processor, CPU count, memory and JAX devices of this machine."""
  import jax  # pylint: disable=g-import-not-at-top
  model = ""
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      names = [l.split(":", 1)[1].strip() for l in f
               if l.startswith("model name")]
    model = " ".join(names[0].split()[:2]) if names else ""
  memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  return {"processor": platform.processor() or platform.machine(),
          "cpu_model": model, "cpu_count": os.cpu_count(),
          "memory_gib": round(memory),
          "device": f"{jax.default_backend()} "
                    f"{jax.devices()[0].device_kind} x {jax.device_count()}"}
