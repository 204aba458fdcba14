"""The series' one answer per platform: of the runs the lessons find for the learner's data, the one to
run, chosen by a rule stated once; every other run is shown as the flags it changes.

The candidates are lesson 07's answer (FlagEmbedding as it is), lesson 08's (m3lab's levers) and lesson
08's per-length batches (every text whole). Each is described by the same figures: the group, the
passages' length, the share of the data's passage tokens an epoch trains, the memory to spare (GPU and
host, predicted), and the run's time (estimated, a range).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from m3lab import command as commands
from m3lab.config import TrainConfig
from m3lab.gpus import CLOSE_CALL_BYTES, GIB
from m3lab.plan.buckets import MODEL_MAX_LEN, kept
from m3lab.plan.platforms import Platform

# The rule, in the order it decides; the lesson prints it.
RULE = (
    "1. It fits: the predicted GPU verdict leaves at least 0.5 GiB to spare (not a close call), and the host's "
    "RAM holds it.",
    "2. It trains what BGE-M3 trains: the whole encoder and the dense, sparse and ColBERT heads together, with "
    "self-distillation.",
    "3. It ends within one session at the slow estimate where any candidate does (a longer run resumes, but "
    "each session is a wait); otherwise the shortest.",
    "4. Then the most negatives per query (the largest group): the contrastive loss learns from them, and "
    "FlagEmbedding's own example trains with 7 (group 8).",
    "5. Then the most of the data's passage tokens an epoch trains; then the shortest run.",
)
SAME_COMMAND = ("# Every session, the first included, runs this one command from this folder: it goes on from the "
                "newest checkpoint, or starts from the beginning when there is none yet (m3lab's runner: "
                "FlagEmbedding 1.4.2's own cannot resume an M3 checkpoint without DeepSpeed)")
QUALITY_NOTE = ("What the quality evidence says: a real pretrained encoder fine-tuned through the same code on the "
                "series' data got better (lesson 07); nothing here measured a larger group against longer texts, "
                "so rules 4 and 5 are a judgement, not a measurement.")


@dataclass(frozen=True)
class Candidate:
    """One run for the platform and the data, by the figures the rule reads, and what running it takes."""

    name: str
    platform: Platform
    config: TrainConfig
    spare_bytes: int  # the GPU's usable memory minus what the tightest step needs (predicted)
    host_fits: bool
    tokens_kept: float  # of the data's passage tokens (each passage once), the share an epoch trains
    run_seconds: tuple[float, float] | None  # the whole run, estimated (fastest, slowest); None: no estimate
    figures: tuple[str, ...]  # what it costs, each figure labelled
    output_dir: str
    command: str  # the one command for every session: from the newest checkpoint, or from the beginning
    report: object = field(default=None, repr=False, compare=False)  # its tightest step's prediction

    @property
    def title(self) -> str:
        return f"{self.platform.describe()}; {self.name}"

    def write_deepspeed_json(self, folder: str | os.PathLike = ".") -> Path | None:
        """The DeepSpeed JSON the command names, written into ``folder`` (None without DeepSpeed)."""
        from m3lab.plan.recipes import write_deepspeed_json

        return write_deepspeed_json(self.config, folder)

    def instructions(self) -> str:
        """Where the files go, and the one command, to copy."""
        lines = [f"# Before you run it: {self.platform.storage}."] if self.platform.storage else []
        lines += [SAME_COMMAND, self.command]
        if self.config.deepspeed_stage is not None:
            lines += ["", f"# {self.config.deepspeed_file_name} (write it beside the command)",
                      self.config.deepspeed_json().rstrip()]
        return "\n".join(lines)

    @property
    def group(self) -> int:
        return self.config.train_group_size

    @property
    def fits(self) -> bool:
        return self.spare_bytes >= CLOSE_CALL_BYTES and self.host_fits

    @property
    def trains_everything(self) -> bool:
        c = self.config
        return not c.fix_encoder and c.unified_finetuning and c.use_self_distill

    def row(self, session_hours: float | None, chosen: bool) -> str:
        time = "no estimate" if self.run_seconds is None else _hours(self.run_seconds)
        within = "" if not session_hours or self.run_seconds is None else (
            "" if self.run_seconds[1] <= session_hours * 3600 else ", over one session")
        return (f"{self.name:42} {self.group:5d} {self.config.passage_max_len:>7,} {self.tokens_kept:>7.0%} "
                f"{self.spare_bytes / GIB:>7.2f} G  {time}{within}" + ("  <- the answer" if chosen else ""))


def _hours(seconds: tuple[float, float]) -> str:
    from m3lab.plan.sessions import duration_range

    return duration_range(*seconds)


def _trained_share(lines: int, batch: int, processes: int) -> float:
    """The share of the lines an epoch trains: the last short batch is dropped."""
    per_step = batch * processes
    return (lines // per_step) * per_step / max(1, lines)


def from_answer(name: str, answer, lengths: dict[str, int], lines: int) -> Candidate:
    """A candidate from a ``recipes.Answer`` (lesson 07's or 08's); ``lengths``: every passage's tokens."""
    config, report = answer.config, answer.report
    share = _trained_share(lines, config.per_device_train_batch_size, config.num_processes)
    return Candidate(name, answer.platform, config, report.usable_bytes - report.total_bytes,
                     answer.fitted.best.host_fits, kept(lengths, config.passage_max_len) * share,
                     answer.plan.seconds, tuple(answer.figures()), answer.output_dir, answer.resume_command(), report)


def from_buckets(name: str, plan, folder: str, costs) -> Candidate:
    """A candidate from a ``buckets.BucketPlan`` whose files go to ``folder``; ``costs``: its
    ``buckets.epoch_costs`` (the per-length row is the last)."""
    held = [b for b in plan.buckets if b.batch]
    tightest = max((b.report for b in held), key=lambda r: r.total_bytes)
    host = plan.platform.host_ram_bytes
    host_fits = host is None or max(b.report.host.total_bytes for b in held) <= host
    per_length = costs[-1]
    epochs = plan.base.num_train_epochs
    seconds = None if per_length.seconds is None else tuple(s * epochs for s in per_length.seconds)
    figures = (f"{plan.base.train_group_size} per group, every passage up to {plan.cut or MODEL_MAX_LEN:,} tokens, in "
               f"{len(held)} files (written into {folder}), batches per GPU from {held[0].batch} down to {held[-1].batch}",
               f"GPU, {tightest.provenance}, the tightest file: peak {tightest.peak_allocated_bytes / GIB:.2f} GiB, "
               f"needs {tightest.total_bytes / GIB:.2f} GiB of {tightest.usable_bytes / GIB:.2f}: {tightest.short_verdict}",
               f"{plan.epoch_steps()} steps an epoch, {plan.lines_left_out()} lines left out of each",
               "two epochs, estimated: " + ("no estimate" if seconds is None else _hours(seconds)))
    return Candidate(name, plan.platform, plan.config(folder), tightest.usable_bytes - tightest.total_bytes, host_fits,
                     per_length.tokens_kept, seconds, figures, plan.platform.output_dir, plan.resume_command(folder),
                     tightest)


@dataclass(frozen=True)
class Choice:
    """The answer for one platform, and the runs it was chosen among."""

    platform: Platform
    chosen: Candidate
    candidates: tuple[Candidate, ...]

    def table(self) -> str:
        header = (f"{'candidate':42} {'group':>5} {'passage':>7} {'trained':>7} {'spare':>9}  two epochs, estimated")
        lines = [header, "-" * len(header)]
        lines += [c.row(self.platform.session_hours, c is self.chosen) for c in self.candidates]
        lines.append(f"passage: the longest passage, in tokens; trained: the share of the data's passage tokens an "
                     f"epoch trains; spare: GiB left on the GPU, {self.chosen_report_provenance()}")
        return "\n".join(lines)

    def chosen_report_provenance(self) -> str:
        return f"predicted for {self.platform.gpu.name}"

    def card(self) -> str:
        """The answer in full: its title, its figures, then its instructions."""
        return "\n".join([f"## {self.chosen.title}", *self.chosen.figures, "", self.chosen.instructions()])

    def changes(self, other: Candidate) -> list[str]:
        """What ``other`` changes against the answer, flag by flag (its data and output folders aside)."""
        return changes(self.chosen.config, other.config)

    def others(self) -> str:
        """Every other candidate as what it changes: its figures and its flags, not a command."""
        blocks = []
        for other in self.candidates:
            if other is self.chosen:
                continue
            why = "does not fit with room to spare" if not other.fits else (
                "trains less of BGE-M3" if not other.trains_everything else "comes later by the rule")
            blocks.append(f"# {other.name} ({why}), against the answer:\n" + "\n".join(
                f"  {line}" for line in self.changes(other)))
        return "\n\n".join(blocks)


IGNORED = {"output_dir", "save_strategy", "save_steps", "warmup_steps", "save_total_limit"}


def changes(base: TrainConfig, other: TrainConfig) -> list[str]:
    """The flags ``other``'s command writes differently from ``base``'s, as ``--flag base -> other``
    (the output folder, and the checkpoint and warm-up counts that follow the run's steps, aside)."""
    mine, theirs = commands.written_flags(base), commands.written_flags(other)
    lines = []
    for name in list(mine) + [n for n in theirs if n not in mine]:
        if name in IGNORED or mine.get(name) == theirs.get(name):
            continue
        before = " ".join(map(shlex.quote, mine[name])) if name in mine else "(not given)"
        after = " ".join(map(shlex.quote, theirs[name])) if name in theirs else "(not given)"
        lines.append(f"--{name}: {before} -> {after}")
    if base.uses_m3lab_levers != other.uses_m3lab_levers:
        runner = {True: commands.M3LAB_M3_MODULE, False: commands.FLAGEMBEDDING_M3_MODULE}
        lines.insert(0, f"-m {runner[base.uses_m3lab_levers]} -> -m {runner[other.uses_m3lab_levers]}")
    return lines


def choose(platform: Platform, candidates: list[Candidate]) -> Choice:
    """The candidate the rule picks (``RULE``). Raises ValueError when none fits and trains everything."""
    eligible = [c for c in candidates if c.fits and c.trains_everything]
    if not eligible:
        raise ValueError(f"no run for {platform.describe()} fits with room to spare and trains all of BGE-M3")
    limit = platform.session_hours * 3600 if platform.session_hours else None
    slow = {id(c): c.run_seconds[1] if c.run_seconds else float("inf") for c in eligible}
    within = [c for c in eligible if limit is None or slow[id(c)] <= limit]
    pool = within or [min(eligible, key=lambda c: slow[id(c)])]
    best = max(pool, key=lambda c: (c.group, round(c.tokens_kept, 3), -slow[id(c)]))
    return Choice(platform, best, tuple(candidates))
