"""A training command as people write it, read into the ``TrainConfig`` it describes.

``parse_command`` takes ``torchrun ... -m FlagEmbedding.finetune.embedder.encoder_only.m3 ARGS`` (or
``-m m3lab.run_m3``, or ``python -m ...`` for one process): the launcher's options are read by
torchrun's own parser and ARGS by FlagEmbedding's own argument classes through HfArgumentParser,
so ``--fp16``, ``--fp16 True`` and ``--gradient_checkpointing`` mean what they mean to FlagEmbedding.
Flags that change nothing in GPU memory (paths, logging, seeds, schedules) are accepted; flags
that do and that the predictor does not model are refused, all named in one ``ConfigError``.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from m3lab.config import FLAGEMBEDDING_M3_MODULE, M3LAB_M3_MODULE, ConfigError, TrainConfig

# FlagEmbedding / HF argument -> TrainConfig field: what the predictor models
MODELLED = {
    "model_name_or_path": "model", "train_data": "train_data", "train_group_size": "train_group_size",
    "query_max_len": "query_max_len", "passage_max_len": "passage_max_len",
    "pad_to_multiple_of": "pad_to_multiple_of", "knowledge_distillation": "knowledge_distillation",
    "same_dataset_within_batch": "same_dataset_within_batch", "learning_rate": "learning_rate",
    "per_device_train_batch_size": "per_device_train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps", "max_steps": "max_steps",
    "num_train_epochs": "num_train_epochs", "warmup_ratio": "warmup_ratio", "fp16": "fp16", "bf16": "bf16",
    "gradient_checkpointing": "gradient_checkpointing", "optim": "optim", "sub_batch_size": "sub_batch_size",
    "negatives_cross_device": "negatives_cross_device", "temperature": "temperature",
    "unified_finetuning": "unified_finetuning", "use_self_distill": "use_self_distill",
    "self_distill_start_step": "self_distill_start_step", "fix_encoder": "fix_encoder", "seed": "seed",
    "logging_steps": "logging_steps", "dataloader_drop_last": "dataloader_drop_last",
    # m3lab.run_m3's levers
    "efficient_sparse_head": "efficient_sparse_head", "freeze_word_embeddings": "freeze_word_embeddings",
    "grad_cache_chunk_size": "grad_cache_chunk_size",
}
# Accepted as they are: where files go, what is logged or saved, seeds, the learning-rate schedule,
# data loading and sampling, pooling and loss choices that hold no extra tensors.
NO_MEMORY_EFFECT = {
    "output_dir", "overwrite_output_dir", "cache_dir", "cache_path", "config_name", "tokenizer_name", "token",
    "trust_remote_code", "use_fast_tokenizer", "max_example_num_per_dataset", "query_instruction_for_retrieval",
    "query_instruction_format", "passage_instruction_for_retrieval", "passage_instruction_format",
    "shuffle_ratio", "small_threshold", "drop_threshold", "sentence_pooling_method", "normalize_embeddings",
    "kd_loss_type", "warmup_steps", "lr_scheduler_type", "lr_scheduler_kwargs", "weight_decay", "adam_beta1",
    "adam_beta2", "adam_epsilon", "max_grad_norm", "data_seed", "full_determinism", "tf32", "report_to",
    "run_name", "project", "disable_tqdm", "log_level", "log_level_replica", "log_on_each_node", "logging_dir",
    "logging_strategy", "logging_first_step", "logging_nan_inf_filter", "save_strategy", "save_steps",
    "save_total_limit", "save_safetensors", "save_on_each_node", "save_only_model", "push_to_hub", "hub_model_id",
    "hub_strategy", "hub_token", "hub_private_repo", "hub_always_push", "hub_revision", "resume_from_checkpoint",
    "ignore_data_skip", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
    "dataloader_prefetch_factor", "remove_unused_columns", "do_train", "local_rank", "ddp_timeout",
    "skip_memory_metrics", "include_num_input_tokens_seen", "trackio_space_id",
}
# TrainingArguments of transformers 4 that transformers 5 removed; on 5 FlagEmbedding refuses them
# ("Some specified arguments are not used by the HfArgumentParser"), which the prediction says.
GONE_IN_TRANSFORMERS_5 = {"warmup_ratio", "overwrite_output_dir", "logging_dir", "save_safetensors", "no_cuda",
                          "fp16_backend", "half_precision_backend", "per_gpu_train_batch_size", "adafactor",
                          "group_by_length", "use_mps_device", "include_tokens_per_second", "torchdynamo"}
MODULES = (FLAGEMBEDDING_M3_MODULE, M3LAB_M3_MODULE)


@dataclass
class PastedCommand:
    """What a pasted command describes, and what the reading of it adapted or could not check."""

    config: TrainConfig
    notes: list[str] = field(default_factory=list)


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


def _launcher(words: list[str]) -> tuple[int, str, list[str]]:
    """(processes, module, module arguments) of ``torchrun ... -m MODULE`` or ``python -m MODULE``."""
    if not words:
        raise ConfigError(["no command after --; paste your training command, e.g. m3lab predict --gpu t4 -- "
                           f"torchrun --nproc_per_node 1 -m {FLAGEMBEDDING_M3_MODULE} --model_name_or_path ..."])
    program = words[0].rsplit("/", 1)[-1]
    rest = words[1:]
    if program.startswith("python") and rest[:2] == ["-m", "torch.distributed.run"]:
        program, rest = "torchrun", rest[2:]
    if program == "torchrun":
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
        return processes, launch.training_script, list(launch.training_script_args)
    if program.startswith("python") and rest[:1] == ["-m"] and len(rest) > 1:
        return 1, rest[1], rest[2:]
    _refuse(f"{words[0]}: m3lab reads `torchrun ... -m {FLAGEMBEDDING_M3_MODULE} ARGS` or `python -m ... ARGS`.")


def _refuse(problem: str):
    raise ConfigError([problem])


def _argument_parser(module: str):
    from transformers import HfArgumentParser

    from FlagEmbedding.finetune.embedder.encoder_only.m3 import (
        EncoderOnlyEmbedderM3DataArguments, EncoderOnlyEmbedderM3ModelArguments,
        EncoderOnlyEmbedderM3TrainingArguments)
    from m3lab.run_m3 import M3LabArguments

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


def parse_command(command: list[str] | str) -> PastedCommand:
    """The TrainConfig of a pasted M3 training command (see the module's docstring)."""
    import transformers

    processes, module, arguments = _launcher(_tokens(command))
    if module not in MODULES:
        _refuse(f"-m {module}: m3lab predicts FlagEmbedding's M3 trainer; use -m {FLAGEMBEDDING_M3_MODULE} "
                f"(or -m {M3LAB_M3_MODULE} for m3lab's levers).")
    parser = _argument_parser(module)
    namespace, leftover = parser.parse_known_args(arguments)
    notes, problems = [], []
    unknown = _unknown(leftover)
    gone = sorted(set(unknown) & GONE_IN_TRANSFORMERS_5)
    if gone:
        notes.append(f"transformers {transformers.__version__} has no {', '.join('--' + g for g in gone)}: FlagEmbedding "
                     "would stop with \"Some specified arguments are not used by the HfArgumentParser\". Drop them "
                     "(--warmup_steps N replaces --warmup_ratio); predicted as if they were gone.")
    for flag in sorted(set(unknown) - GONE_IN_TRANSFORMERS_5):
        hint = " (an m3lab lever: launch with -m m3lab.run_m3)" if module != M3LAB_M3_MODULE and flag in (
            "efficient_sparse_head", "freeze_word_embeddings", "grad_cache_chunk_size") else ""
        problems.append(f"--{flag}: {module} has no such argument{hint}; FlagEmbedding would refuse it too.")
    values = vars(namespace)
    not_modelled = [f"--{name} {values[name]}" for name in values
                    if name not in MODELLED and name not in NO_MEMORY_EFFECT and name != "deepspeed"
                    and values[name] != parser.get_default(name)]
    if not_modelled:
        problems.append(f"{', '.join(not_modelled)}: changes memory in ways m3lab's predictor does not model; "
                        "remove it to predict the rest.")
    if values.get("model_name_or_path") is None:
        problems.append("--model_name_or_path is missing; FlagEmbedding needs it (e.g. BAAI/bge-m3).")
    if problems:
        raise ConfigError(problems)
    fields = {target: values[name] for name, target in MODELLED.items() if name in values}
    fields.update(num_processes=processes, optim=str(fields["optim"]).split(".")[-1].lower())
    fields["train_data"] = list(fields["train_data"] or [])
    if fields.get("warmup_ratio") is None:  # transformers 5: no --warmup_ratio
        fields["warmup_ratio"] = 0.0
    if "warmup_ratio" in unknown and unknown["warmup_ratio"]:  # gone in transformers 5: kept for the scheduler
        fields["warmup_ratio"] = _number(unknown["warmup_ratio"][0], "--warmup_ratio")
    warmup_steps = values.get("warmup_steps") or 0
    if 0 < warmup_steps < 1:  # transformers 5: a fraction is the ratio
        fields["warmup_ratio"] = float(warmup_steps)
    elif warmup_steps >= 1 and not fields["warmup_ratio"]:
        # TrainConfig keeps a ratio; as one of the run's steps (of 1,000 for an epoch run, as the
        # predictor counts them) it gives DeepSpeed's scheduler the same warmup
        fields["warmup_ratio"] = warmup_steps / (fields["max_steps"] if fields["max_steps"] > 0 else 1000)
    if fields["sub_batch_size"] in (-1,):
        fields["sub_batch_size"] = None  # FlagEmbedding: -1 means "do not split"
    deepspeed = values.get("deepspeed")
    if deepspeed:
        fields.update(deepspeed_fields(deepspeed))
        if fields.pop("json_names_optimizer"):
            if values["optim"] != parser.get_default("optim"):
                notes.append(f"--optim {fields['optim']} is ignored: {deepspeed} names its own optimizer, which HF "
                             "Trainer hands to DeepSpeed instead.")
            fields["optim"] = "adamw_torch"  # unused: DeepSpeed builds the JSON's optimizer
    else:
        fields["deepspeed_stage"] = None
    if fields["negatives_cross_device"] and processes == 1:
        fields["negatives_cross_device"] = False
        notes.append("--negatives_cross_device on one process has no negatives to share (FlagEmbedding gathers from "
                     "a world of one); predicted without it.")
    if fields.get("sub_batch_size") and fields["unified_finetuning"]:
        # found running notebook 07: FlagEmbedding 1.4.2's encode() concatenates the sub-batches' ColBERT
        # vectors, each padded to its own longest text
        notes.append(f"--sub_batch_size {fields['sub_batch_size']} with unified fine-tuning fails in FlagEmbedding 1.4.2 "
                     "as soon as two sub-batches pad to different lengths (\"Sizes of tensors must match\" when it "
                     "concatenates their ColBERT vectors): any data with texts shorter than the max lengths. "
                     "Predicted for full-length batches, where it runs.")
    if fields.get("same_dataset_within_batch") and getattr(namespace, "query_instruction_for_retrieval", None) is None:
        # FlagEmbedding 1.4.2's AbsEmbedderSameDatasetTrainDataset formats every query with the instruction
        # even when there is none: "{}{}".format(None, query)
        notes.append("--same_dataset_within_batch True without --query_instruction_for_retrieval: FlagEmbedding 1.4.2 "
                     "then trains on every query prefixed with the text \"None\" (it formats the missing "
                     "instruction). Add --query_instruction_for_retrieval \"\" or drop --same_dataset_within_batch "
                     "(with one training file it changes nothing). Memory is the same either way.")
    return PastedCommand(TrainConfig(**fields), notes)


def _number(text: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError([f"{flag} {text}: not a number."]) from None


def _elements(value) -> int:
    """A bucket size as DeepSpeed reads it (5e8 is a float in JSON); "auto" and absent: its default."""
    from m3lab.config import REDUCE_BUCKET_SIZE

    try:
        return int(float(value))
    except (TypeError, ValueError):
        return REDUCE_BUCKET_SIZE


def deepspeed_fields(path: str) -> dict:
    """The TrainConfig fields a user's DeepSpeed JSON implies; the predictor reads the file itself."""
    from m3lab.predict.spec import read_deepspeed_json

    ds = read_deepspeed_json(path)
    zero = ds.get("zero_optimization") or {}
    params = (ds.get("optimizer") or {}).get("params") or {}
    return {"deepspeed_config_file": path, "deepspeed_stage": int(zero.get("stage", 0)),
            "offload_optimizer": (zero.get("offload_optimizer") or {}).get("device", "none") == "cpu",
            "torch_adam": bool(params.get("torch_adam", False)),
            "reduce_bucket_size": _elements(zero.get("reduce_bucket_size")),
            "json_names_optimizer": "optimizer" in ds}
