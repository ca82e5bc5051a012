"""What ``dpmot --help`` teaches: the subcommands in one line each, the shipped configs, example commands.

The shipped configs are found by scanning ``configs/`` (next to the package in a checkout, else in the working
directory); each file's first comment line is its one-line description. The project's LightningModules and
DataModules are imported here so that ``dpmot fit --help`` lists them as known subclasses and short class names
(``--model EDMModule``, ``--model.help EDMModule``, ``--data DigitsDataModule``) resolve.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser

# one line per subcommand in `dpmot --help` (Lightning's docstring first lines are cut off mid-sentence)
SUBCOMMAND_HELP = {
    "fit": "Train a model (resume with --ckpt_path <run>/checkpoints/last.ckpt).",
    "validate": "Run one validation epoch of a checkpoint (--ckpt_path).",
    "test": "Evaluate a checkpoint (--ckpt_path); add a configs/eval/ config for FID, sweeps, benchmarks.",
    "predict": "Sample from a checkpoint (--ckpt_path) and write the samples to the run folder.",
}
# config folders in the order a newcomer meets them; others found under configs/ follow alphabetically
CONFIG_GROUPS = ("", "edm", "aot_edm", "dpm", "dpm_ot", "text2img", "dg", "matching", "eval", "cluster", "loggers")
EXAMPLES = (
    ("dpmot fit --config configs/quickstart.yaml", "train EDM on 8x8 digits on a CPU (minutes)"),
    (
        "dpmot predict --config configs/quickstart.yaml --ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt",
        "write samples into that run's folder",
    ),
    (
        "dpmot test --config configs/quickstart.yaml --config configs/eval/fid_vs_nfe.yaml "
        "--ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt",
        "FID against NFE for that checkpoint",
    ),
    ("dpmot fit --model.help EDMModule", "one model's options (--data.help DigitsDataModule: one DataModule's)"),
)
_DESCRIPTION_CHARS = 76
PROJECT_PACKAGES = ("lightning_dpmot.models", "lightning_dpmot.data")


class HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's formatter that keeps the line breaks of descriptions and epilogs (for the config lists)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


def import_project_classes() -> dict[str, list[type]]:
    """Import the project's LightningModules and DataModules (registering them as subclasses); return them."""
    found: dict[str, list[type]] = {"models": [], "data": []}
    for package, key, base in zip(PROJECT_PACKAGES, found, (L.LightningModule, L.LightningDataModule), strict=True):
        module = importlib.import_module(package)
        for name in getattr(module, "__all__", dir(module)):
            obj = getattr(module, name, None)
            if inspect.isclass(obj) and issubclass(obj, base) and not inspect.isabstract(obj):
                found[key].append(obj)
    return found


def configs_dir() -> Path | None:
    """The shipped ``configs/`` folder: beside the package (a checkout), else in the working directory."""
    for candidate in (Path(__file__).resolve().parents[1] / "configs", Path.cwd() / "configs"):
        if candidate.is_dir():
            return candidate
    return None


def describe_config(path: Path) -> str:
    """The first comment line of a YAML file, cut to one short sentence (``""`` when it has none)."""
    try:
        with path.open(encoding="utf-8") as f:
            first = next((line.strip() for line in f if line.strip()), "")
    except OSError:
        return ""
    if not first.startswith("#"):
        return ""
    text = first.lstrip("#").strip().rstrip(":").strip()
    if len(text) > _DESCRIPTION_CHARS:
        text = text[: _DESCRIPTION_CHARS - 1].rsplit(" ", 1)[0].rstrip(",;:(") + "…"
    return text


def shipped_configs(root: Path | None = None) -> dict[str, list[tuple[Path, str]]]:
    """``{folder: [(path, description), ...]}`` of the YAML files under ``root`` (folder ``""``: top level)."""
    root = configs_dir() if root is None else root
    groups: dict[str, list[tuple[Path, str]]] = {}
    if root is None:
        return groups
    for path in sorted(root.rglob("*.yaml")):
        folder = path.parent.relative_to(root).as_posix()
        groups.setdefault("" if folder == "." else folder, []).append((path, describe_config(path)))
    order = {name: i for i, name in enumerate(CONFIG_GROUPS)}
    return dict(sorted(groups.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))


def _shown(path: Path) -> str:
    try:
        return os.path.relpath(path) if Path(os.path.relpath(path)).parts[0] != ".." else str(path)
    except ValueError:  # another drive (Windows)
        return str(path)


def main_epilog(root: Path | None = None) -> str:
    """The text after ``dpmot --help``'s options: configs by folder, the project's classes, examples."""
    lines = ["configs (dpmot <subcommand> --config <file> [--config <file> ...]; later files and flags win):"]
    groups = shipped_configs(root)
    width = max((len(_shown(p)) for files in groups.values() for p, _ in files), default=0)
    for folder, files in groups.items():
        lines.append(f"  {folder or 'top level'}:")
        lines.extend(f"    {_shown(p):<{width}}  {d}".rstrip() for p, d in files)
    if not groups:
        lines.append("  (no configs/ folder found next to the package or in the working directory)")
    classes = import_project_classes()
    lines.append("")
    for label, key in (("models (--model NAME)", "models"), ("DataModules (--data NAME)", "data")):
        names = ", ".join(c.__name__ for c in classes[key])
        lines.extend(textwrap.wrap(names, 110, initial_indent=f"{label}: ", subsequent_indent="  "))
    lines.append("")
    lines.append("examples:")
    for command, what in EXAMPLES:
        lines.append(f"  {command}")
        lines.append(f"      {what}")
    lines.append("")
    lines.append("Outputs of a run go to its logger's folder (runs/<name>/version_N); evaluating a checkpoint writes")
    lines.append("into the training run's folder (<run>/test-<time>/, <run>/predict-<time>/).")
    return "\n".join(lines) + "\n"


def add_subcommands(cli: Any, parser: Any, **kwargs: Any) -> None:
    """LightningCLI's ``_add_subcommands`` with :data:`SUBCOMMAND_HELP` as the one-line help of each subcommand."""
    from lightning.pytorch.cli import _get_short_description  # noqa: PLC0415

    cli._subcommand_parsers = {}
    parser_subcommands = parser.add_subcommands()
    trainer_class = cli.trainer_class
    for subcommand in cli.subcommands():
        fn = getattr(trainer_class, subcommand)
        description = SUBCOMMAND_HELP.get(subcommand) or _get_short_description(fn)
        subparser_kwargs = dict(kwargs.get(subcommand, {}))
        subparser_kwargs.setdefault("description", description)
        subcommand_parser = cli._prepare_subcommand_parser(trainer_class, subcommand, **subparser_kwargs)
        cli._subcommand_parsers[subcommand] = subcommand_parser
        parser_subcommands.add_subcommand(subcommand, subcommand_parser, help=description)


def did_you_mean(message: str, options: Any) -> str:
    """`` (did you mean --trainer.max_steps?)`` for the unrecognized flags of ``message`` that are near an option."""
    found = re.search(r"unrecognized arguments: (.*)", message)
    if not found:
        return ""
    names = [t.split("=", 1)[0] for t in found.group(1).split() if t.startswith("--")]
    close = [m for n in names for m in difflib.get_close_matches(n, list(options), n=1, cutoff=0.8)]
    return f" (did you mean {', '.join(close)}?)" if close else ""


class DPMOTArgumentParser(LightningArgumentParser):
    """Parse errors in a few lines (``dpmot: error: ...`` and a hint) instead of a 60-line usage block."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Print ``dpmot: error: <message>`` (with ``did you mean`` for a near-miss flag) and exit 2."""
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        hint = did_you_mean(message, parser._option_string_actions)
        sys.stderr.write(f"dpmot: error: {message.rstrip()}{hint}\n")
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"tip: {prog} --help lists every option\n")
        self.exit(2)
