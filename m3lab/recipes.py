"""A recipe per platform: free Colab and Kaggle, each with FlagEmbedding as it is and with m3lab's levers.

A recipe is ``m3lab fit`` on the data for that platform (``--platform colab-t4 --stock``, ...): its
card is what a learner copies (the command, the DeepSpeed JSON it names) and what it costs: the GPU
peak and total and the host RAM (predicted), and the time of one step (estimated, m3lab.steptime).
"""

from __future__ import annotations

from dataclasses import dataclass

from m3lab import steptime
from m3lab.fit import FitResult, fit
from m3lab.gpus import CLOSE_CALL_BYTES, GIB
from m3lab.platforms import GB, PLATFORMS


@dataclass
class Recipe:
    fitted: FitResult

    @property
    def stock(self) -> bool:
        return self.fitted.stock

    @property
    def title(self) -> str:
        how = "FlagEmbedding as it is" if self.stock else "with m3lab's levers"
        return f"{self.fitted.platform.describe()}; {how}"

    def figures(self) -> str:
        """What the recipe costs, every figure labelled predicted or estimated."""
        best = self.fitted.best
        if best is None:
            return "nothing fits (predicted)"
        config, report = best.config, best.report
        platform = self.fitted.platform
        return "\n".join([
            f"{best.setting}; train_group_size {config.train_group_size}, query_max_len {config.query_max_len}, "
            f"passage_max_len {config.passage_max_len}, per GPU batch {config.per_device_train_batch_size}, "
            f"{config.num_processes} GPU(s); every parameter trained",
            f"GPU, {report.provenance}: peak {report.peak_allocated_bytes / GIB:.2f} GiB, "
            f"needs {report.total_bytes / GIB:.2f} GiB of {report.usable_bytes / GIB:.2f}: {report.short_verdict}",
            f"host, predicted: {report.host.total_bytes / GIB:.2f} GiB" + (
                f" of the {platform.host_ram_bytes / GB:.1f} GB ({platform.host_ram_bytes / GIB:.2f} GiB) "
                f"{platform.name} has" if platform.host_ram_bytes else " (the host's RAM was not given: not checked)"),
            f"time: {steptime.describe(report)}",
        ])

    def card(self) -> str:
        """The title, the figures, the command and the JSON it names, to copy."""
        lines = [f"## {self.title}", self.figures()]
        best = self.fitted.best
        if best is not None:
            lines += ["", best.config.shell_command()]
            if best.config.deepspeed_stage is not None:
                lines += ["", f"# {best.config.deepspeed_file_name} (write it beside the command)",
                          best.config.deepspeed_json().rstrip()]
        return "\n".join(lines)


def recipe(platform: str, stock: bool, data=None, margin_gib: float = CLOSE_CALL_BYTES / GIB) -> Recipe:
    """``m3lab fit --platform PLATFORM [--stock]`` on ``data`` (default: the lessons' training file)."""
    from m3lab.config import DEFAULT_TRAIN_DATA

    return Recipe(fit(data or DEFAULT_TRAIN_DATA, platform=platform, margin_gib=margin_gib, stock=stock,
                      log=lambda line: None))


def recipes(stock: bool, data=None) -> dict[str, Recipe]:
    """One recipe per platform (free Colab, Kaggle)."""
    return {key: recipe(key, stock, data) for key in PLATFORMS}
