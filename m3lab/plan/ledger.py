"""The series' path: from FlagEmbedding's example, out of memory on a T4, to a recipe, one knob a step.

The steps are written down here once, in lesson order: each changes the configuration the step
before it left, so no lesson starts from a baseline of its own. Every notebook predicts the path
up to its lesson and draws it (``plots.ledger``): a bar per step, the predicted peak after it,
coloured by the verdict, against the card's line. A step may change nothing (the knob is kept as it is); the ledger shows
those too, with the lesson's reason.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field

from m3lab.command import Rendering, written_flags
from m3lab.config import M3LAB_M3_MODULE, TrainConfig
from m3lab.errors import ConfigError


@dataclass(frozen=True)
class Step:
    lesson: str  # "01" ... "08": the notebook that takes the step
    knob: str  # what changes, in the flags a FlagEmbedding user types
    changes: dict = field(default_factory=dict)  # TrainConfig fields; empty: kept as it was


def baseline() -> TrainConfig:
    """FlagEmbedding's example as upstream ships it (m3.sh with ds_stage0.json: ZeRO-0, FusedAdam,
    group 8, batch 2, 512-token queries), on one T4, with passages at BGE-M3's 8,192 tokens."""
    return TrainConfig.upstream_example(passage_max_len=8192)


# What m3.sh says and m3lab's baseline does not: two GPUs with negatives_cross_device (here one
# T4, where there is nothing to share), 512-token passages (here BGE-M3's 8,192), 4 epochs on
# FlagEmbedding's example data (here data/train.jsonl, 2 epochs)
ADAPTED = ("one process, not two, so no --negatives_cross_device (one T4 has nothing to share)",
           "--passage_max_len 8192, BGE-M3's long context, not the example's 512",
           "--train_data data/train.jsonl and 2 epochs, not the example data and 4 epochs")


def baseline_json() -> str:
    """Upstream's ds_stage0.json as FlagEmbedding ships it (data/upstream/, source named there)."""
    from m3lab.data.jsonl import REPO_ROOT

    return (REPO_ROOT / "data" / "upstream" / "ds_stage0.json").read_text()


PATH: tuple[Step, ...] = (
    Step("01", "FlagEmbedding's example, 8,192-token passages"),
    Step("02", "--query_max_len 64 --passage_max_len 392", dict(query_max_len=64, passage_max_len=392)),
    Step("03", "--train_group_size 6 --per_device_train_batch_size 1",
         dict(train_group_size=6, per_device_train_batch_size=1)),
    Step("04", "no --deepspeed (HF fp16; --optim adamw_torch_fused)", dict(deepspeed_stage=None, optim="adamw_torch_fused")),
    Step("05", "--gradient_checkpointing kept on"),
    Step("06", "no --fix_encoder (it stops the encoder training)"),
    Step("07", "--optim adamw_bnb_8bit", dict(optim="adamw_bnb_8bit")),
    # not --sub_batch_size: with unified fine-tuning FlagEmbedding 1.4.2 concatenates the chunks' ColBERT
    # vectors, which fails when chunks pad to different lengths (real data; found by running it)
    # 1,024 runs out of memory in the second step: the sparse head's 2.9 GiB request finds the cache
    # cut into gaps (3.8 GiB reserved but unallocated); 768 leaves 2.2 GiB to spare
    Step("07", "--passage_max_len 768 (the room spent on text)", dict(passage_max_len=768)),
    Step("08", "--query_max_len 512 --passage_max_len 8192 (BGE-M3's whole texts)",
         dict(query_max_len=512, passage_max_len=8192)),
    Step("08", "--train_group_size 8", dict(train_group_size=8)),
    Step("08", "m3lab's efficient sparse head", dict(efficient_sparse_head=True)),
    Step("08", "m3lab's gradient cache, one text at a time", dict(grad_cache_chunk_size=1)),
)
LESSONS = tuple(sorted({step.lesson for step in PATH}))


def _walk(upto: str = "08") -> list[tuple[Step, TrainConfig]]:
    """Each step up to lesson ``upto`` (included), with the configuration after it."""
    if upto not in LESSONS:
        raise ValueError(f"lesson {upto!r}: the path's lessons are {', '.join(LESSONS)}")
    config, walked = baseline(), []
    for step in PATH:
        if step.lesson > upto:
            break
        config = config.replace(**step.changes)
        walked.append((step, config))
    return walked


def path(upto: str = "08") -> dict[str, TrainConfig]:
    """The configuration after each step up to lesson ``upto`` (included), labelled "NN: knob"."""
    return {f"{step.lesson}: {step.knob}": config for step, config in _walk(upto)}


def before(lesson: str) -> TrainConfig:
    """Where lesson ``lesson`` starts: the configuration the lessons before it left."""
    configs = [config for step, config in _walk() if step.lesson < lesson]
    return configs[-1] if configs else baseline()


def after(lesson: str) -> TrainConfig:
    """Where lesson ``lesson`` leaves the run."""
    return list(path(lesson).values())[-1]


def predict_path(upto: str = "08", gpu: str = "t4") -> dict:
    """``path(upto)``, each step predicted for ``gpu`` ({label: MemoryReport})."""
    from m3lab.predict import predict

    return {label: predict(config, gpu) for label, config in path(upto).items()}


def changed_flags(config: TrainConfig, previous: TrainConfig) -> list[str]:
    """The command-line words that differ from ``previous``'s command: what to change in a copied
    command. DeepSpeed's JSON is named by file, as the command names it, and when both commands
    have one, what differs inside it beyond what its ZeRO stage changes."""
    old, new = written_flags(previous, Rendering("OUT")), written_flags(config, Rendering("OUT"))
    launcher = [f"--nproc_per_node {config.num_processes}"] if config.num_processes != previous.num_processes else []
    module = [f"-m {M3LAB_M3_MODULE}"] if config.uses_m3lab_levers and not previous.uses_m3lab_levers else []
    inside = []
    if config.deepspeed_stage is not None and previous.deepspeed_stage is not None:
        # against the JSON the previous run would have had at this stage: the new file name says the stage
        try:
            reference = previous.replace(deepspeed_stage=config.deepspeed_stage)
        except ConfigError:  # a combination the stage refuses: compare with the previous JSON as it was
            reference = previous
        inside = _json_changes(reference.deepspeed_config(), config.deepspeed_config())
    # each value as a shell reads it back (a JSON value, an empty instruction): the words paste as they are
    changed = [" ".join([f"--{name}", *map(shlex.quote, values)]) for name, values in new.items() if old.get(name) != values]
    return launcher + module + changed + [f"(remove --{name})" for name in sorted(old.keys() - new.keys())] + (
        [f"({config.deepspeed_file_name}: {', '.join(inside)})"] if inside else [])


def _json_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key.path: value`` for each entry of ``new`` that differs from ``old`` (nested dicts walked)."""
    changes = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += _json_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {json.dumps(b) if key in new else '(removed)'}")
    return changes


def lesson_changes(lesson: str) -> list[str]:
    """What lesson ``lesson`` changes on the path, as lines: the step, then the flags to change in
    the command the lessons before it left (the whole baseline command is printed once, in 01)."""
    lines, previous = [], before(lesson)
    for step, config in _walk(lesson):
        if step.lesson != lesson:
            continue
        flags = changed_flags(config, previous)
        # the flags the knob's own words do not already say ("no --deepspeed" says "(remove --deepspeed)")
        unsaid = [flag for flag in flags if flag not in step.knob
                  and not ((gone := re.fullmatch(r"\(remove (--\w+)\)", flag)) and f"no {gone.group(1)}" in step.knob)]
        if not flags:
            lines.append(f"{step.lesson}: {step.knob}: " + ("the baseline" if config == baseline() else "nothing changes"))
        else:
            lines.append(f"{step.lesson}: {step.knob}" + (f"; with it: {' '.join(unsaid)}" if unsaid else ""))
        previous = config
    return lines
