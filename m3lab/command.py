"""A FlagEmbedding M3 training command, both ways: written from a ``TrainConfig``, and read back.

One table, ``FLAGS``, says for every argument m3lab writes or accepts: its name, the ``TrainConfig``
field it carries, whether it changes GPU memory (the predictor models those; flags that do and are
not in the table are refused), and whether only m3lab's runner knows it. ``render`` writes a command
from the table; ``parse`` reads one with torchrun's own parser and FlagEmbedding's own argument
classes (through HfArgumentParser, so ``--fp16``, ``--fp16 True`` and ``--gradient_checkpointing``
mean what they mean to FlagEmbedding), then maps the values back through the same table. A
DeepSpeed JSON is read by ``m3lab.deepspeed_json``.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

from m3lab.config import (
    FLAGEMBEDDING_M3_MODULE,
    M3LAB_M3_MODULE,
    RESUME_LATEST,
    TrainConfig,
    Trainer,
)
from m3lab.errors import ConfigError

MODULES = (FLAGEMBEDDING_M3_MODULE, M3LAB_M3_MODULE)


class Memory(Enum):
    MODELLED = "changes GPU memory; the predictor models it"
    NONE = "changes no GPU memory"


@dataclass(frozen=True)
class Rendering:
    """What a command names beyond the configuration: where it writes, its JSON, its model."""

    output_dir: str = "./bge-m3-finetuned"
    deepspeed_json_path: str | None = None
    model_path: str | None = None


def _flag(value: bool) -> str:
    return "True" if value else "False"


def _words(config: TrainConfig, name: str) -> list[str] | None:
    """A field's value as the command writes it; None leaves the flag out."""
    value = getattr(config, name)
    if value is None:
        return None
    if isinstance(value, bool):
        return [_flag(value)]
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, float):
        return [f"{value:g}"]
    return [str(value)]


Write = Callable[[TrainConfig, Rendering], "list[str] | None"]


@dataclass(frozen=True)
class Flag:
    """One argument of FlagEmbedding's M3 runner (or HF's TrainingArguments, or m3lab.run_m3's)."""

    name: str
    field: str | None = None  # the TrainConfig field it carries, both ways
    memory: Memory = Memory.MODELLED
    lever: bool = False  # only m3lab.run_m3 knows it
    write: Write | None = None  # its words in a command; default: the field's value; None and no field: not written

    def words(self, config: TrainConfig, rendering: Rendering) -> list[str]:
        if self.write is not None:
            values = self.write(config, rendering)
        elif self.field is not None:
            values = _words(config, self.field)
        else:
            return []
        return [] if values is None else [f"--{self.name}", *values]


def _constant(*values: str) -> Write:
    return lambda config, rendering: list(values)


def _when(condition: Callable[[TrainConfig], bool], name: str) -> Write:
    return lambda config, rendering: _words(config, name) if condition(config) else None


def _model(config: TrainConfig, rendering: Rendering) -> list[str]:
    from m3lab.standin import resolve_model

    return [rendering.model_path or resolve_model(config.model)]


def _lora(config: TrainConfig) -> bool:
    return config.use_lora


def _save(config: TrainConfig, rendering: Rendering) -> list[str]:
    return ["steps"] if config.save_steps else ["no"]


# In the order the command writes them. Arguments m3lab accepts in a pasted command but never writes
# (they change no memory) follow, without a field.
FLAGS: tuple[Flag, ...] = (
    Flag("model_name_or_path", "model", write=_model),
    Flag("train_data", "train_data", Memory.NONE),
    Flag("train_group_size", "train_group_size"),
    Flag("query_max_len", "query_max_len"),
    Flag("passage_max_len", "passage_max_len"),
    Flag("pad_to_multiple_of", "pad_to_multiple_of"),
    Flag("knowledge_distillation", "knowledge_distillation"),
    Flag("same_dataset_within_batch", "same_dataset_within_batch"),
    Flag("query_instruction_for_retrieval", "query_instruction_for_retrieval", Memory.NONE),
    Flag("output_dir", memory=Memory.NONE, write=lambda config, rendering: [rendering.output_dir]),
    # with it FlagEmbedding's runner refuses an output_dir that holds files unless the command resumes
    # (without it, HF's default, a second run writes over the first without a word)
    Flag("do_train", memory=Memory.NONE, write=_constant("True")),
    Flag("learning_rate", "learning_rate"),
    Flag("per_device_train_batch_size", "per_device_train_batch_size"),
    Flag("gradient_accumulation_steps", "gradient_accumulation_steps"),
    Flag("max_steps", "max_steps", write=_when(lambda c: c.max_steps > 0, "max_steps")),
    Flag("num_train_epochs", "num_train_epochs", Memory.NONE,
         write=_when(lambda c: c.max_steps <= 0, "num_train_epochs")),
    Flag("warmup_steps", "warmup_steps", Memory.NONE,
         write=lambda config, rendering: [str(config.warmup_step_count())]),
    Flag("warmup_ratio", "warmup_ratio", Memory.NONE, write=lambda config, rendering: None),
    Flag("fp16", "fp16"),
    Flag("bf16", "bf16"),
    Flag("gradient_checkpointing", "gradient_checkpointing"),
    # Several processes without DeepSpeed: HF wraps FlagEmbedding's M3 model in DDP and, the model being a
    # plain module (not a PreTrainedModel), asks DDP to find unused parameters; with the default reentrant
    # checkpointing the step then fails ("Expected to mark a variable ready only once": each checkpointed
    # layer's parameters marked twice). Non-reentrant checkpointing runs (found on two CPU processes over
    # gloo; the predictor traces the reentrant kind, which holds about the same).
    Flag("gradient_checkpointing_kwargs", memory=Memory.NONE, write=lambda config, rendering: (
        ['{"use_reentrant": false}'] if config.gradient_checkpointing and config.num_processes > 1
        and config.deepspeed_stage is None else None)),
    Flag("dataloader_drop_last", "dataloader_drop_last"),
    # always written without DeepSpeed: HF Trainer's own default is adamw_torch_fused (transformers >= 4.56)
    Flag("optim", "optim", write=_when(lambda c: c.deepspeed_stage is None, "optim")),
    Flag("sub_batch_size", "sub_batch_size"),
    Flag("deepspeed", write=lambda config, rendering: None if config.deepspeed_stage is None else [
        config.deepspeed_config_file or rendering.deepspeed_json_path or config.deepspeed_file_name]),
    Flag("logging_steps", "logging_steps", Memory.NONE),
    Flag("save_strategy", memory=Memory.NONE, write=_save),
    Flag("save_steps", "save_steps", Memory.NONE),
    Flag("save_total_limit", "save_total_limit", Memory.NONE),
    Flag("seed", "seed", Memory.NONE),
    Flag("report_to", memory=Memory.NONE, write=_constant("none")),
    Flag("negatives_cross_device", "negatives_cross_device"),
    Flag("temperature", "temperature"),
    Flag("sentence_pooling_method", memory=Memory.NONE, write=_constant("cls")),
    Flag("normalize_embeddings", memory=Memory.NONE, write=_constant("True")),
    Flag("kd_loss_type", memory=Memory.NONE, write=_constant("m3_kd_loss")),
    Flag("unified_finetuning", "unified_finetuning"),
    Flag("use_self_distill", "use_self_distill"),
    Flag("self_distill_start_step", "self_distill_start_step"),
    Flag("fix_encoder", "fix_encoder"),
    Flag("resume_from_checkpoint", "resume_from_checkpoint", Memory.NONE),
    # m3lab's levers: only m3lab.run_m3 knows them
    Flag("efficient_sparse_head", "efficient_sparse_head", lever=True,
         write=lambda config, rendering: ["True"] if config.efficient_sparse_head else None),
    Flag("freeze_word_embeddings", "freeze_word_embeddings", lever=True,
         write=lambda config, rendering: ["True"] if config.freeze_word_embeddings else None),
    Flag("grad_cache_chunk_size", "grad_cache_chunk_size", lever=True,
         write=lambda config, rendering: [str(config.grad_cache_chunk_size)] if config.grad_cache_chunk_size else None),
    Flag("grad_cache_chunk_tokens", "grad_cache_chunk_tokens", lever=True,
         write=lambda config, rendering: [str(config.grad_cache_chunk_tokens)] if config.grad_cache_chunk_tokens else None),
    Flag("use_lora", "use_lora", Memory.MODELLED, lever=True,
         write=lambda config, rendering: ["True"] if config.use_lora else None),
    Flag("lora_rank", "lora_rank", Memory.MODELLED, lever=True, write=_when(_lora, "lora_rank")),
    Flag("lora_alpha", "lora_alpha", Memory.MODELLED, lever=True, write=_when(_lora, "lora_alpha")),
    Flag("lora_dropout", "lora_dropout", Memory.MODELLED, lever=True, write=_when(_lora, "lora_dropout")),
    Flag("target_modules", "target_modules", Memory.MODELLED, lever=True, write=_when(_lora, "target_modules")),
    Flag("save_merged_lora_model", "save_merged_lora_model", Memory.NONE, lever=True,
         write=lambda config, rendering: ["True"] if config.save_merged_lora_model else None),
) + tuple(Flag(name, memory=Memory.NONE) for name in (
    # where files go, what is logged or saved, seeds, the learning-rate schedule, data loading and
    # sampling, pooling and loss choices that hold no extra tensors
    "overwrite_output_dir", "cache_dir", "cache_path", "config_name", "tokenizer_name", "token", "trust_remote_code",
    "use_fast_tokenizer", "max_example_num_per_dataset", "query_instruction_format",
    "passage_instruction_for_retrieval", "passage_instruction_format", "shuffle_ratio", "small_threshold",
    "drop_threshold", "lr_scheduler_type", "lr_scheduler_kwargs", "weight_decay", "adam_beta1", "adam_beta2",
    "adam_epsilon", "max_grad_norm", "data_seed", "full_determinism", "tf32", "run_name", "project", "disable_tqdm",
    "log_level", "log_level_replica", "log_on_each_node", "logging_dir", "logging_strategy", "logging_first_step",
    "logging_nan_inf_filter", "save_safetensors", "save_on_each_node", "save_only_model", "push_to_hub",
    "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo", "hub_always_push", "hub_revision",
    "ignore_data_skip", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
    "dataloader_prefetch_factor", "remove_unused_columns", "local_rank", "ddp_timeout",
    "skip_memory_metrics", "include_num_input_tokens_seen", "trackio_space_id",
    # m3lab.run_m3's: where --resume_from_checkpoint latest also looks
    "previous_output_dirs"))
BY_NAME = {flag.name: flag for flag in FLAGS}
LEVERS = tuple(flag.name for flag in FLAGS if flag.lever)


@dataclass(frozen=True)
class UpstreamFlagChange:
    """A flag of FlagEmbedding's example (m3.sh) that a newer transformers no longer takes as written."""

    flag: str
    since: str  # the transformers version that changed it
    refused: bool  # True: FlagEmbedding stops at the flag; False: it runs, with a deprecation warning
    instead: str  # what m3lab's commands write instead, and why that is the same run


# m3.sh's training flags against today's transformers (tests/test_traps.py holds each to the installed one)
UPSTREAM_FLAG_CHANGES = (
    UpstreamFlagChange("--overwrite_output_dir", "5.0", True,
                       "left out: the output folder is written as it is (FlagEmbedding refuses a full one only with "
                       "--do_train False)"),
    UpstreamFlagChange("--warmup_ratio 0.1", "5.15", True,
                       "--warmup_steps N, the tenth of the run's steps that HF counted from the ratio (5.0 to 5.14 "
                       "warn that it goes)"),
    UpstreamFlagChange("--gradient_checkpointing", "5.23", False,
                       "--gradient_checkpointing True, which transformers 4.57 to 5.25 all take (5.23 and later warn "
                       "that --activation_checkpointing replaces it in transformers 6)"),
)

# TrainingArguments of transformers 4 that transformers 5 removed; on 5 FlagEmbedding refuses them
# ("Some specified arguments are not used by the HfArgumentParser"), which the reading says.
GONE_IN_TRANSFORMERS_5 = {"warmup_ratio", "overwrite_output_dir", "logging_dir", "save_safetensors", "no_cuda",
                          "fp16_backend", "half_precision_backend", "per_gpu_train_batch_size", "adafactor",
                          "group_by_length", "use_mps_device", "include_tokens_per_second", "torchdynamo"}


# ---- writing ------------------------------------------------------------------------------------
def written_flags(config: TrainConfig, rendering: Rendering = Rendering()) -> dict[str, list[str]]:
    """Each flag the command writes, by name, with its values, in the command's order."""
    if config.trainer != Trainer.FLAGEMBEDDING_M3 or config.attn_implementation != "sdpa":
        raise ConfigError([f"trainer={config.trainer!r}, attn_implementation={config.attn_implementation!r} describe a "
                           "run for the predictor only; FlagEmbedding's runner trains trainer='flagembedding-m3' "
                           "with attn_implementation='sdpa'."])
    return {flag.name: words[1:] for flag in FLAGS if (words := flag.words(config, rendering))}


def arguments(config: TrainConfig, rendering: Rendering = Rendering()) -> list[str]:
    """The arguments after ``-m FlagEmbedding.finetune.embedder.encoder_only.m3`` (or m3lab.run_m3)."""
    return [word for name, values in written_flags(config, rendering).items() for word in (f"--{name}", *values)]


def render(config: TrainConfig, rendering: Rendering = Rendering(), module: str = FLAGEMBEDDING_M3_MODULE) -> list[str]:
    """The torchrun command line as a list of words (m3lab's runner when an m3lab lever is on)."""
    if config.uses_m3lab_levers and module == FLAGEMBEDDING_M3_MODULE:
        module = M3LAB_M3_MODULE
    return ["torchrun", "--standalone", "--nproc_per_node", str(config.num_processes), "-m", module,
            *arguments(config, rendering)]


def shell_command(config: TrainConfig, rendering: Rendering = Rendering()) -> str:
    """The command as you would type it: one option per line, quoted where the shell needs it."""
    return format_command(render(config, rendering))


def resume_command(config: TrainConfig, rendering: Rendering = Rendering(),
                   previous_output_dirs: tuple[str, ...] = ()) -> str:
    """The same command with m3lab's runner, going on from the newest checkpoint it finds in the
    output folder or under ``previous_output_dirs`` (``m3lab.train.resume``), or from the beginning
    when there is none yet: FlagEmbedding 1.4.2's own runner cannot resume its M3 checkpoints without
    DeepSpeed (``m3lab.train.runner.resuming`` says why)."""
    extra = ["--resume_from_checkpoint", RESUME_LATEST]
    if previous_output_dirs:
        extra += ["--previous_output_dirs", *previous_output_dirs]
    return format_command(render(config, rendering, M3LAB_M3_MODULE) + extra)


def format_command(argv: list[str], env: dict[str, str] | None = None) -> str:
    """``argv`` as a shell command: the launcher on the first line, then one option per line."""
    lines: list[list[str]] = []
    current = [f"{key}={shlex.quote(value)}" for key, value in (env or {}).items()]
    after_module = False
    for arg in argv:
        if current and (arg == "-m" or (after_module and arg.startswith("--"))):
            lines.append(current)
            current = []
        after_module = after_module or arg == "-m"
        current.append(shlex.quote(arg))
    lines.append(current)
    return " \\\n    ".join(" ".join(line) for line in lines)


# ---- reading --------------------------------------------------------------------------------------
@dataclass
class PastedCommand:
    """What a pasted command describes, and what the reading of it adapted or could not check."""

    config: TrainConfig
    notes: list[str] = field(default_factory=list)


def _refuse(problem: str):
    raise ConfigError([problem])


def _tokens(command: list[str] | str) -> list[str]:
    """The command's words: a list as a shell passes it, or one string as copied from a script."""
    if isinstance(command, str) or len(command) == 1:
        text = command if isinstance(command, str) else command[0]
        command = shlex.split(text.replace("\\\n", " "))
    # blank words are line breaks and stray spaces; an empty word is a value ("" as an instruction)
    words = [word for word in command if word == "" or word.strip()]
    while words and "=" in words[0] and not words[0].startswith("-"):
        words.pop(0)  # FOO=bar environment assignments before the launcher
    return words


@dataclass(frozen=True)
class Launch:
    """``torchrun ... -m MODULE ARGS`` or ``python -m MODULE ARGS``, taken apart."""

    processes: int
    module: str
    arguments: list[str]


def _launch(words: list[str]) -> Launch:
    if not words:
        _refuse("no command after --; paste your training command, e.g. m3lab predict --gpu t4 -- "
                f"torchrun --nproc_per_node 1 -m {FLAGEMBEDDING_M3_MODULE} --model_name_or_path ...")
    program, rest = words[0].rsplit("/", 1)[-1], words[1:]
    if program.startswith("python") and rest[:2] == ["-m", "torch.distributed.run"]:
        program, rest = "torchrun", rest[2:]
    if program == "torchrun":
        return _torchrun(rest)
    if program.startswith("python") and rest[:1] == ["-m"] and len(rest) > 1:
        return Launch(1, rest[1], rest[2:])
    _refuse(f"{words[0]}: m3lab reads `torchrun ... -m {FLAGEMBEDDING_M3_MODULE} ARGS` or `python -m ... ARGS`.")


def _torchrun(rest: list[str]) -> Launch:
    """The launcher's options, read by torchrun's own parser."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.error = lambda message: _refuse(f"torchrun: {message}")  # a sentence, not argparse's exit
    launch = parser.parse_args(rest)
    if not launch.module:
        _refuse(f"torchrun runs the script {launch.training_script}; m3lab predicts FlagEmbedding's M3 trainer, "
                f"launched with -m {FLAGEMBEDDING_M3_MODULE} (or -m {M3LAB_M3_MODULE}).")
    if str(launch.nnodes) not in ("1", "1:1"):
        _refuse(f"torchrun --nnodes {launch.nnodes}: m3lab predicts one machine; give --nnodes 1.")
    try:
        processes = int(launch.nproc_per_node)
    except ValueError:
        _refuse(f"torchrun --nproc_per_node {launch.nproc_per_node}: give the number of GPUs (1 on a T4).")
    return Launch(processes, launch.training_script, list(launch.training_script_args))


def _argument_parser(module: str):
    """FlagEmbedding's own argument classes (with m3lab.run_m3's for m3lab's runner)."""
    from FlagEmbedding.finetune.embedder.encoder_only.m3 import (
        EncoderOnlyEmbedderM3DataArguments,
        EncoderOnlyEmbedderM3ModelArguments,
        EncoderOnlyEmbedderM3TrainingArguments,
    )
    from transformers import HfArgumentParser

    from m3lab.config import M3LabArguments

    classes = [EncoderOnlyEmbedderM3ModelArguments, EncoderOnlyEmbedderM3DataArguments,
               EncoderOnlyEmbedderM3TrainingArguments]
    parser = HfArgumentParser([*classes, M3LabArguments] if module == M3LAB_M3_MODULE else classes)
    parser.error = lambda message: _refuse(f"{module}: {message}")
    return parser


def _unknown(leftover: list[str]) -> dict[str, list[str]]:
    """Flags argparse did not know, each with the values that follow it."""
    flags: dict[str, list[str]] = {}
    current = None
    for word in leftover:
        if word.startswith("--"):
            current = word[2:].split("=", 1)[0]
            flags[current] = []
        elif current is not None:
            flags[current].append(word)
        else:
            flags[word] = []
    return flags


def _problems(module: str, values: dict, unknown: dict[str, list[str]], parser) -> list[str]:
    """Flags FlagEmbedding does not know, and flags that change memory in ways m3lab does not model."""
    problems = []
    for name in sorted(set(unknown) - GONE_IN_TRANSFORMERS_5):
        hint = " (an m3lab lever: launch with -m m3lab.run_m3)" if module != M3LAB_M3_MODULE and name in LEVERS else ""
        problems.append(f"--{name}: {module} has no such argument{hint}; FlagEmbedding would refuse it too.")
    not_modelled = [f"--{name} {value}" for name, value in values.items()
                    if name not in BY_NAME and value != parser.get_default(name)]
    if not_modelled:
        problems.append(f"{', '.join(not_modelled)}: changes memory in ways m3lab's predictor does not model; "
                        "remove it to predict the rest.")
    if values.get("model_name_or_path") is None:
        problems.append("--model_name_or_path is missing; FlagEmbedding needs it (e.g. BAAI/bge-m3).")
    return problems


def _fields(values: dict, unknown: dict[str, list[str]]) -> dict:
    """The TrainConfig fields the values carry, as they are."""
    fields = {flag.field: values[flag.name] for flag in FLAGS if flag.field is not None and flag.name in values}
    fields["optim"] = str(fields["optim"]).split(".")[-1].lower()  # HF's OptimizerNames enum
    fields["train_data"] = list(fields["train_data"] or [])
    if fields.get("sub_batch_size") == -1:
        fields["sub_batch_size"] = None  # FlagEmbedding: -1 means "do not split"
    if unknown.get("warmup_ratio"):  # gone in transformers 5: still what the command asks
        fields["warmup_ratio"] = _number(unknown["warmup_ratio"][0], "--warmup_ratio")
    warmup_steps = fields.get("warmup_steps") or 0
    if 0 < warmup_steps < 1:  # transformers 5: a fraction is the ratio
        fields.update(warmup_ratio=float(warmup_steps), warmup_steps=None)
    else:
        fields["warmup_steps"] = int(warmup_steps) if warmup_steps or not fields.get("warmup_ratio") else None
    fields["warmup_ratio"] = fields.get("warmup_ratio") or 0.0
    strategy = values.get("save_strategy")
    if getattr(strategy, "value", strategy) != "steps":  # HF saves every save_steps only with "steps", its default
        fields["save_steps"] = None
    return fields


def _number(text: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError([f"{flag} {text}: not a number."]) from None


def _deepspeed_fields(path: str, optim_given: bool, notes: list[str], optim: str) -> dict:
    """The run's DeepSpeed settings, from its JSON."""
    from m3lab import deepspeed_json

    ds = deepspeed_json.read(path)
    fields = {"deepspeed_config_file": path, "deepspeed_stage": ds.stage, "offload_optimizer": ds.offload_optimizer,
              "torch_adam": ds.torch_adam, "reduce_bucket_size": ds.reduce_bucket_size}
    if ds.names_optimizer:
        if optim_given:
            notes.append(f"--optim {optim} is ignored: {path} names its own optimizer, which HF Trainer hands to "
                         "DeepSpeed instead.")
        fields["optim"] = "adamw_torch"  # unused: DeepSpeed builds the JSON's optimizer
    return fields


def _notes(fields: dict, values: dict, processes: int) -> list[str]:
    """What the reading adapted, and what FlagEmbedding does with the command that a learner should know."""
    notes = []
    if fields["negatives_cross_device"] and processes == 1:
        fields["negatives_cross_device"] = False
        notes.append("--negatives_cross_device on one process has no negatives to share (FlagEmbedding gathers from "
                     "a world of one); predicted without it.")
    if fields.get("sub_batch_size") and fields["unified_finetuning"]:
        # FlagEmbedding 1.4.2's encode() concatenates the sub-batches' ColBERT vectors, each padded to its
        # own longest text (lesson 07 runs it)
        notes.append(f"--sub_batch_size {fields['sub_batch_size']} with unified fine-tuning fails in FlagEmbedding 1.4.2 "
                     "as soon as two sub-batches pad to different lengths (\"Sizes of tensors must match\" when it "
                     "concatenates their ColBERT vectors): any data with texts shorter than the max lengths. "
                     "Predicted for full-length batches, where it runs.")
    if fields.get("same_dataset_within_batch") and values.get("query_instruction_for_retrieval") is None:
        # FlagEmbedding 1.4.2's AbsEmbedderSameDatasetTrainDataset formats every query with the instruction
        # even when there is none: "{}{}".format(None, query)
        notes.append("--same_dataset_within_batch True without --query_instruction_for_retrieval: FlagEmbedding 1.4.2 "
                     "then trains on every query prefixed with the text \"None\" (it formats the missing "
                     "instruction). Add --query_instruction_for_retrieval \"\" or drop --same_dataset_within_batch "
                     "(with one training file it changes nothing). Memory is the same either way.")
    return notes


def parse(command: list[str] | str) -> PastedCommand:
    """The TrainConfig of a pasted M3 training command (see the module's docstring)."""
    import transformers

    launch = _launch(_tokens(command))
    if launch.module not in MODULES:
        _refuse(f"-m {launch.module}: m3lab predicts FlagEmbedding's M3 trainer; use -m {FLAGEMBEDDING_M3_MODULE} "
                f"(or -m {M3LAB_M3_MODULE} for m3lab's levers).")
    parser = _argument_parser(launch.module)
    namespace, leftover = parser.parse_known_args(launch.arguments)
    values, unknown = vars(namespace), _unknown(leftover)
    problems = _problems(launch.module, values, unknown, parser)
    if problems:
        raise ConfigError(problems)
    notes = []
    gone = sorted(set(unknown) & GONE_IN_TRANSFORMERS_5)
    if gone:
        notes.append(f"transformers {transformers.__version__} has no {', '.join('--' + g for g in gone)}: FlagEmbedding "
                     "would stop with \"Some specified arguments are not used by the HfArgumentParser\". Drop them "
                     "(--warmup_steps N replaces --warmup_ratio); predicted as if they were gone.")
    fields = _fields(values, unknown)
    fields["num_processes"] = launch.processes
    if values.get("deepspeed"):
        fields.update(_deepspeed_fields(values["deepspeed"], values["optim"] != parser.get_default("optim"), notes,
                                        fields["optim"]))
    else:
        fields["deepspeed_stage"] = None
    notes += _notes(fields, values, launch.processes)
    return PastedCommand(TrainConfig(**fields), notes)
