"""Narrow filters for third-party warnings that every documented ``dpmot`` command printed although nothing is wrong.

Warnings our own code caused are fixed where they arise (:class:`~lightning_dpmot.callbacks.EMAHalfLife` outside
fit, :class:`~lightning_dpmot.callbacks.LastCheckpoint` resumed into a new run folder). What is left comes from inside
Lightning or torch and cannot be fixed from here; each filter matches one message (regex), one category and, where
the warning names it, the module that issues it, so any other warning still shows. Why each is harmless is written
next to it. ``install_warning_filters`` is called by the ``dpmot`` CLI before anything runs.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

SUBCOMMANDS = ("fit", "validate", "test", "predict")

#: (message regex, category, issuing-module regex) filtered for every subcommand
ALWAYS: tuple[tuple[str, type[Warning], str], ...] = (
    # Lightning 2.6's own pytree helper (lightning/pytorch/utilities/_pytree.py) builds torch's LeafSpec, which torch
    # >= 2.10 deprecates in favour of TreeSpec.is_leaf(). Both behave the same; only a newer Lightning can change it.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
)

#: filtered for validate/test/predict only: they load the weights of a checkpoint, never the state of its callbacks
EVALUATION_ONLY: tuple[tuple[str, type[Warning], str], ...] = (
    # An evaluation config (e.g. configs/eval/fid_vs_nfe.yaml) replaces the training callbacks (EMA, sample grids,
    # checkpointing) whose state the checkpoint carries. Test and predict use only the checkpoint's weights (the EMA
    # weights are its state_dict), so the callback state is rightly ignored. In fit the warning still shows: a
    # resumed run without its EMA callback would lose the average.
    (r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint", UserWarning, r""),
)


def subcommand_of(args: Iterable[str] | Mapping[str, Any] | None) -> str | None:
    """The ``dpmot`` subcommand in ``args`` (a CLI argument list, a LightningCLI dict, or None for ``sys.argv``)."""
    if args is None:
        args = sys.argv[1:]
    if isinstance(args, Mapping):
        name = args.get("subcommand")
        return name if name in SUBCOMMANDS else next((k for k in args if k in SUBCOMMANDS), None)
    for arg in args:
        if arg in SUBCOMMANDS:
            return arg
        if not str(arg).startswith("-"):
            return None  # the first positional argument decides
    return None


#: Lightning 2.6 advertises its cloud products on every run ("💡 Tip: ... try installing [litlogger] / [litmodels]")
#: through this logger; the tips are not about the run and push the model summary off the screen.
_TIP_LOGGER = "lightning.pytorch.utilities.rank_zero"


class _NoProductTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def install_tip_filter() -> None:
    """Drop Lightning's product tips from its log (once per process)."""
    logger = logging.getLogger(_TIP_LOGGER)
    if not any(isinstance(f, _NoProductTips) for f in logger.filters):
        logger.addFilter(_NoProductTips())


def install_warning_filters(args: Iterable[str] | Mapping[str, Any] | None = None) -> list[str]:
    """Install the filters for the subcommand in ``args`` (see :func:`subcommand_of`); returns the message patterns.

    The filters are appended, after every filter already installed: ``python -W error`` / ``PYTHONWARNINGS=always``
    (or pytest's own filters) still take precedence and show everything.
    """
    install_tip_filter()
    subcommand = subcommand_of(args)
    entries = list(ALWAYS)
    if subcommand in ("validate", "test", "predict"):
        entries += EVALUATION_ONLY
    for message, category, module in entries:
        warnings.filterwarnings("ignore", message=message, category=category, module=module, append=True)
    return [message for message, _, _ in entries]


def is_filtered(message: str, category: type[Warning], module: str, subcommand: str | None) -> bool:
    """Whether :func:`install_warning_filters` silences this warning for ``subcommand`` (for tests and docs)."""
    entries = list(ALWAYS) + (list(EVALUATION_ONLY) if subcommand in ("validate", "test", "predict") else [])
    return any(re.match(m, message) and issubclass(category, c) and re.match(mod, module) for m, c, mod in entries)
