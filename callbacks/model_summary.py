"""Lightning's model summary without its FLOPs, which read 0 for every dfl model."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class ModelSummary(LightningModelSummary):
    """The layer table and parameter counts at fit start; the FLOPs column and total only when Lightning counted some.

    Lightning counts FLOPs only by running ``example_input_array``, which dfl's systems do not define
    (the input length is the data's), so its summary always ended in a meaningless "Total FLOPs: 0".

    Args:
        max_depth: Depth of nested modules listed; 0 turns the summary off.
    """

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **summarize_kwargs) -> None:  # fmt: skip
        if not total_flops:
            summary_data = [column for column in summary_data if column[0] != "FLOPs"]
        table = _format_summary_table(
            total_parameters, trainable_parameters, model_size, total_training_modes, total_flops, *summary_data
        )
        if not total_flops:
            table = "\n".join(line for line in table.splitlines() if not line.rstrip().endswith("Total Flops"))
        rank_zero_info("\n" + table)
