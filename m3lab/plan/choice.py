"""The series' one answer per platform: of the runs the lessons find for the learner's data, the one to
run, chosen by a rule stated once; every other run is shown as the flags it changes.

The candidates are lesson 07's answer (FlagEmbedding as it is), lesson 08's (m3lab's levers) and lesson
08's per-length batches (every text whole). Each is described by the same figures: the group, the
passages' length, the share of the data's passage tokens an epoch trains, the memory to spare (GPU and
host, predicted), and the run's time (estimated, a range).
"""

from __future__ import annotations

from dataclasses import dataclass

from m3lab import command as commands
from m3lab.config import TrainConfig
from m3lab.gpus import CLOSE_CALL_BYTES, GIB
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
QUALITY_NOTE = ("What the quality evidence says: a real pretrained encoder fine-tuned through the same code on the "
                "series' data got better (lesson 07); nothing here measured a larger group against longer texts, "
                "so rules 4 and 5 are a judgement, not a measurement.")


@dataclass(frozen=True)
class Candidate:
    """One run for the platform and the data, by the figures the rule reads."""

    name: str
    config: TrainConfig
    spare_bytes: int  # the GPU's usable memory minus what the tightest step needs (predicted)
    host_fits: bool
    tokens_kept: float  # of the data's passage tokens (each passage once), the share an epoch trains
    run_seconds: tuple[float, float] | None  # the whole run, estimated (fastest, slowest); None: no estimate
    instructions: str  # the files, the command and its resume command, to copy

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
    low, high = (s / 60 for s in seconds)
    if high < 90:
        return f"{low:.0f} to {high:.0f} min"
    return f"{low / 60:.1f} to {high / 60:.1f} h"


def _trained_share(lines: int, batch: int, processes: int) -> float:
    """The share of the lines an epoch trains: the last short batch is dropped."""
    per_step = batch * processes
    return (lines // per_step) * per_step / max(1, lines)


def kept(lengths: dict[str, int], max_len: int) -> float:
    """The share of the passages' tokens (each passage once) that ``max_len`` keeps."""
    return sum(min(n, max_len) for n in lengths.values()) / max(1, sum(lengths.values()))


def from_answer(name: str, answer, lengths: dict[str, int], lines: int) -> Candidate:
    """A candidate from a ``recipes.Answer`` (lesson 07's or 08's); ``lengths``: every passage's tokens."""
    config, report = answer.config, answer.report
    share = _trained_share(lines, config.per_device_train_batch_size, config.num_processes)
    return Candidate(name, config, report.usable_bytes - report.total_bytes,
                     answer.fitted.best.host_fits, kept(lengths, config.passage_max_len) * share,
                     answer.plan.seconds, answer.instructions())


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
    return Candidate(name, plan.config(folder), tightest.usable_bytes - tightest.total_bytes, host_fits,
                     per_length.tokens_kept, seconds, plan.instructions(folder))


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


IGNORED = {"train_data", "output_dir", "save_steps", "warmup_steps", "save_total_limit"}


def changes(base: TrainConfig, other: TrainConfig) -> list[str]:
    """The flags ``other``'s command writes differently from ``base``'s, as ``--flag base -> other``
    (the data, the output folder, and the checkpoint and warm-up counts that follow the data, aside)."""
    mine, theirs = commands.written_flags(base), commands.written_flags(other)
    lines = []
    for name in list(mine) + [n for n in theirs if n not in mine]:
        if name in IGNORED or mine.get(name) == theirs.get(name):
            continue
        before = " ".join(mine[name]) if name in mine else "(not given)"
        after = " ".join(theirs[name]) if name in theirs else "(not given)"
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
