"""Checks and config-tree helpers of the CLI: YAML syntax, writable folders, flags given on the command line, and
comparing a config's model with the hyperparameters stored in a checkpoint."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace


def _plain(value: Any) -> Any:
    """Namespaces to dicts, tuples to lists (for comparing config values with checkpoint hyperparameters)."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{class_path, init_args}`` trees to dotted keys without ``init_args`` (``net.model_channels``)."""
    out: dict[str, Any] = {}
    if isinstance(tree, Mapping) and "class_path" in tree:
        out[f"{prefix}class_path"] = tree["class_path"]
        items: dict[str, Any] = {**(tree.get("init_args") or {}), **(tree.get("dict_kwargs") or {})}
    elif isinstance(tree, Mapping):
        items = dict(tree)
    else:
        out[prefix.rstrip(".")] = tree
        return out
    for key, value in items.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _set_in_hparams(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``dotted`` (keys without ``init_args``) inside a checkpoint's hyperparameter tree."""
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node[part]
        if isinstance(node, dict) and "class_path" in node:
            node = node.setdefault("init_args", {})
    node[parts[-1]] = value


def _same_class(a: Any, b: Any) -> bool:
    if a == b:
        return True
    try:
        from jsonargparse._util import import_object  # noqa: PLC0415

        return import_object(a) is import_object(b)
    except Exception:  # noqa: BLE001 - unresolvable names are simply different
        return str(a).rsplit(".", 1)[-1] == str(b).rsplit(".", 1)[-1]


def _short(class_path: Any) -> str:
    return str(class_path).rsplit(".", 1)[-1]


def explicit_model_keys(argv: Iterable[str]) -> set[str]:
    """Model keys given as command-line flags (``--model.init_args.sigma_data`` → ``sigma_data``; ``""`` = all)."""
    keys = set()
    for token in argv:
        if not isinstance(token, str) or not (token == "--model" or token.startswith(("--model.", "--model="))):
            continue
        path = token[2:].split("=", 1)[0].split(".")[1:]
        keys.add(".".join(p for p in path if p not in ("init_args", "dict_kwargs", "class_path")))
    return keys


def _is_explicit(key: str, explicit: set[str]) -> bool:
    return any(e == "" or key == e or key.startswith(e + ".") for e in explicit)


def _say(message: str) -> None:
    if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
        print(f"dpmot: {message}", file=sys.stderr)


def check_config_files(argv: Iterable[str]) -> None:
    """Parse every ``--config`` YAML file once so that a syntax error names the file, line and column."""
    argv = list(argv)
    files = []
    for i, token in enumerate(argv):
        if token in ("-c", "--config") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif isinstance(token, str) and token.startswith("--config="):
            files.append(token.split("=", 1)[1])
    for name in files:
        path = Path(name)
        if not path.is_file():
            continue  # jsonargparse reports missing files (or the value is inline YAML)
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"config file {path}: YAML syntax error{where}: {problem}") from err


def check_writable(path: str | os.PathLike[str], what: str) -> None:
    """Raise if ``path`` (or the nearest existing folder above it, where it would be created) is not writable."""
    target = Path(path).expanduser().absolute()
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"{what} {target} cannot be created: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {target} is not writable (no write permission on {probe})")


def upgraded_hparams(class_path: str, hparams: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's hyperparameters in the current form of ``class_path`` (its ``upgrade_hparams`` static method
    renames keys written by older versions, e.g. SemiDiscreteOTModule's flat solver settings); unchanged otherwise."""
    module_name, _, name = str(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return hparams  # reported by the class check that follows
    upgrade = getattr(cls, "upgrade_hparams", None)
    return dict(upgrade(hparams)) if callable(upgrade) else hparams
