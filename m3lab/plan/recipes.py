"""The answer per platform: what to run on free Colab and on Kaggle for the learner's data, and what
it costs.

An ``Answer`` is ``m3lab fit`` on the data for a platform (FlagEmbedding as it is, or with m3lab's
levers), made into a run: the data's path as the learner's working directory sees it, the warm-up
counted on the data, checkpoints in the folder that outlives a session, the DeepSpeed JSON (if any)
written beside the command under the name it uses. Its card gives the GPU peak and what the step
needs of the card, the host RAM (predicted), the step and training time (estimated, a range), the
sessions it takes, and the command that goes on from the last checkpoint.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from m3lab import command as commands
from m3lab.config import TrainConfig
from m3lab.gpus import CLOSE_CALL_BYTES, GIB
from m3lab.plan import sessions
from m3lab.plan.fit import FitResult, fit
from m3lab.plan.platforms import GB, PLATFORMS, Platform
from m3lab.predict import steptime

EPOCHS = 2  # the series' fine-tuning runs; FlagEmbedding's m3.sh trains 4 on its example data
RESUME_NOTE = ("# When a session ends before the run does, in the next one: the same run, going on from the newest "
               "checkpoint (from the beginning if there is none yet), on m3lab's runner: FlagEmbedding 1.4.2's own "
               "cannot resume an M3 checkpoint without DeepSpeed")


def as_seen_from_here(path: str | os.PathLike) -> str:
    """A data path as this working directory sees it: an absolute path as given; a relative one
    (the series' data/train.jsonl is found in the repository) relative to here."""
    from m3lab.data.jsonl import resolve_data_path

    if os.path.isabs(path):
        return str(path)
    return os.path.relpath(resolve_data_path(path))


def write_deepspeed_json(config: TrainConfig, folder: str | os.PathLike = ".") -> Path | None:
    """The DeepSpeed JSON ``config``'s command names, written into ``folder`` (None without DeepSpeed)."""
    from m3lab.io import write_text_atomic

    if config.deepspeed_stage is None:
        return None
    path = Path(folder) / config.deepspeed_file_name
    write_text_atomic(path, config.deepspeed_json())
    return path


@dataclass
class Answer:
    """One platform's run for the data, and what it costs."""

    fitted: FitResult
    config: TrainConfig  # the fitted configuration with the data, epochs, warm-up and checkpoints
    platform: Platform
    output_dir: str
    plan: sessions.SessionPlan

    @property
    def report(self):
        return self.fitted.best.report

    @property
    def title(self) -> str:
        how = ("FlagEmbedding as it is" if self.fitted.stock else "LoRA, with m3lab's levers" if self.fitted.lora
               else "with m3lab's levers")
        return f"{self.platform.describe()}; {how}"

    @property
    def rendering(self) -> commands.Rendering:
        return commands.Rendering(output_dir=self.output_dir)

    def command(self) -> str:
        return commands.format_command(commands.render(self.config, self.rendering))

    def resume_command(self) -> str:
        return commands.resume_command(self.config, self.rendering, self.platform.previous_output_dirs)

    def write_deepspeed_json(self, folder: str | os.PathLike = ".") -> Path | None:
        return write_deepspeed_json(self.config, folder)

    def what_trains(self) -> str:
        if not self.config.use_lora:
            return "every parameter trained"
        model = self.report.per_rank[0].model_state_bytes
        return (f"a rank-{self.config.lora_rank} LoRA adapter on the encoder and the sparse and ColBERT heads trained "
                f"({model.trainable_params / 1e6:.1f}M of {model.params / 1e6:.0f}M parameters), the encoder's own "
                "weights frozen")

    def figures(self) -> list[str]:
        """What the run costs, every figure labelled predicted or estimated."""
        config, report, platform = self.config, self.report, self.platform
        host = (f" of the {platform.host_ram_bytes / GB:.1f} GB ({platform.host_ram_bytes / GIB:.2f} GiB) "
                f"{platform.name} has" if platform.host_ram_bytes else " (the host's RAM was not given: not checked)")
        return [
            f"{self.fitted.best.setting}; train_group_size {config.train_group_size}, query_max_len "
            f"{config.query_max_len}, passage_max_len {config.passage_max_len}, per GPU batch "
            f"{config.per_device_train_batch_size}, {config.num_processes} GPU(s); {self.what_trains()}",
            *([cut] if (cut := self.fitted.cut()) else []),
            f"GPU, {report.provenance}: peak {report.peak_allocated_bytes / GIB:.2f} GiB, needs "
            f"{report.total_bytes / GIB:.2f} GiB of {report.usable_bytes / GIB:.2f}: {report.short_verdict}",
            f"host, predicted: {report.host.total_bytes / GIB:.2f} GiB" + host,
            f"step time: {steptime.describe(report, lines=self.fitted.lines)}",
            *self.plan.describe(),
        ]

    def card(self) -> str:
        """The title, the figures, then ``instructions()``."""
        return "\n".join([f"## {self.title}", *self.figures(), "", self.instructions()])

    def instructions(self) -> str:
        """Where the files go, the command, its JSON and its resume command."""
        lines = []
        if self.platform.storage:
            lines.append(f"# Before you run it: {self.platform.storage}.")
        lines += ["# Run it from this folder (the data's path is as it sees it):", self.command()]
        if self.config.deepspeed_stage is not None:
            lines += ["", f"# {self.config.deepspeed_file_name} (write it beside the command)",
                      self.config.deepspeed_json().rstrip()]
        if self.plan.sessions > 1 or self.platform.session_hours is not None:
            lines += ["", RESUME_NOTE, self.resume_command()]
        if not self.config.uses_m3lab_levers:  # m3lab's runner writes them itself
            lines += ["", "# When it has finished: the folder made loadable by sentence-transformers too "
                          "(FlagEmbedding's own runner writes no module files; without them it pools otherwise)",
                      f"python -m m3lab.train.saved_model {shlex.quote(self.output_dir)}"]
        return "\n".join(lines)


def answer(fitted: FitResult, records: int, output_dir: str | None = None, epochs: float = EPOCHS) -> Answer:
    """The run ``fitted`` chose, for ``records`` lines of the data it was fitted on."""
    best = fitted.best
    config = best.config.replace(train_data=[as_seen_from_here(p) for p in best.config.train_data],
                                 num_train_epochs=epochs, max_steps=-1)
    time = steptime.step_time(best.report, lines=fitted.lines)
    plan = sessions.plan(config, best.report, records, fitted.platform, time)
    config = config.replace(warmup_steps=config.warmup_steps_for(plan.steps), save_steps=plan.save_steps,
                            save_total_limit=sessions.KEEP_CHECKPOINTS)
    return Answer(fitted, config, fitted.platform, output_dir or fitted.platform.output_dir, plan)


def answer_for(platform: str, stock: bool, data=None, output_dir: str | None = None, log=lambda line: None,
               margin_gib: float = CLOSE_CALL_BYTES / GIB, lora: bool = False) -> Answer | None:
    """``m3lab fit --platform PLATFORM [--stock | --lora] --data DATA``, made into a run (None: nothing fits)."""
    from m3lab.config import DEFAULT_TRAIN_DATA
    from m3lab.data.jsonl import load_jsonl

    data = [str(d) for d in ([data] if isinstance(data, (str, os.PathLike)) else data or [DEFAULT_TRAIN_DATA])]
    fitted = fit(data, platform=platform, margin_gib=margin_gib, stock=stock, log=log, lora=lora)
    if fitted.best is None:
        return None
    return answer(fitted, len(load_jsonl(data)), output_dir)


def answers(stock: bool, data=None, lora: bool = False) -> dict[str, Answer | None]:
    """One answer per platform (free Colab, Kaggle) for ``data`` (default: the series' training file)."""
    return {key: answer_for(key, stock, data, lora=lora) for key in PLATFORMS}
