"""Lightning's model summary without the ``FLOPs`` column when no FLOPs were measured.

Lightning 2.6 added a ``FLOPs`` column and a ``Total FLOPs`` line to :class:`~lightning.pytorch.callbacks.ModelSummary`,
but measures FLOPs only for a module with an ``example_input_array``; the project's modules have none (their inputs
are a noisy image, a noise level and conditions), so every run printed a column of zeros. :class:`CompactModelSummary`
prints the same table without that column and line when the total is 0 (rich tables when ``rich`` is installed,
Lightning's plain table otherwise), and keeps them when FLOPs were measured.
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import (
    _format_summary_table,
    get_formatted_model_size,
    get_human_readable_count,
)
from typing_extensions import override

#: Lightning's own summary logger: it has Lightning's INFO handler, so the plain table prints where Lightning's would
log = logging.getLogger("lightning.pytorch.callbacks.model_summary")

FLOPS_COLUMN = "FLOPs"


class CompactModelSummary(ModelSummary):
    """:class:`~lightning.pytorch.callbacks.ModelSummary` that leaves out FLOPs when none were measured.

    Args:
        max_depth: depth of the layer summary (0 disables it, as in ModelSummary).
        rich: draw with rich (default: when rich is installed).
        **summarize_kwargs: passed on like ModelSummary's (e.g. ``header_style`` for rich).
    """

    def __init__(self, max_depth: int = 1, rich: bool | None = None, **summarize_kwargs: Any) -> None:
        if rich is None:
            from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

            rich = bool(_RICH_AVAILABLE)
        super().__init__(max_depth, rich=rich, **summarize_kwargs)

    @staticmethod
    @override
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        show_flops = total_flops > 0
        if not show_flops:
            summary_data = [(name, values) for name, values in summary_data if name != FLOPS_COLUMN]
        if summarize_kwargs.pop("rich", False):
            _print_rich(
                summary_data,
                total_parameters,
                trainable_parameters,
                model_size,
                total_training_modes,
                total_flops if show_flops else None,
                summarize_kwargs.get("header_style", "bold magenta"),
            )
            return
        table = _format_summary_table(
            total_parameters, trainable_parameters, model_size, total_training_modes, total_flops, *summary_data
        )
        if not show_flops:
            table = "\n".join(line for line in table.splitlines() if not line.endswith("Total Flops"))
        log.info("\n" + table)


def _print_rich(
    summary_data: list[tuple[str, list[str]]],
    total_parameters: int,
    trainable_parameters: int,
    model_size: float,
    total_training_modes: dict[str, int],
    total_flops: int | None,
    header_style: str,
) -> None:
    """The table and totals as RichModelSummary draws them, with exactly the columns in ``summary_data``."""
    from rich import get_console
    from rich.table import Table

    right = {"Params", "Params per Device", FLOPS_COLUMN, "In sizes", "Out sizes"}
    table = Table(header_style=header_style)
    for name, _ in summary_data:
        table.add_column(name, justify="right" if name in right else "left", style="dim" if name == " " else None)
    for row in zip(*(values for _, values in summary_data), strict=True):
        table.add_row(*row)
    console = get_console()
    console.print(table)
    grid = Table.grid(expand=True)
    grid.add_column()
    totals = [
        ("Trainable params", get_human_readable_count(int(trainable_parameters))),
        ("Non-trainable params", get_human_readable_count(int(total_parameters - trainable_parameters))),
        ("Total params", get_human_readable_count(int(total_parameters))),
        ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
        ("Modules in train mode", str(total_training_modes["train"])),
        ("Modules in eval mode", str(total_training_modes["eval"])),
    ]
    if total_flops is not None:
        totals.append(("Total FLOPs", get_human_readable_count(total_flops)))
    for label, value in totals:
        grid.add_row(f"[bold]{label}[/]: {value}")
    console.print(grid)
