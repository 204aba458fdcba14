"""The training configuration: FlagEmbedding M3's knobs as one typed object, checked before launch.

From a ``TrainConfig`` m3lab renders the exact ``torchrun -m FlagEmbedding...m3`` command line and
the DeepSpeed JSON it names; both print as they are and can be copied into a project.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from m3lab.deepspeed_json import REDUCE_BUCKET_SIZE
from m3lab.errors import ConfigError
from m3lab.standin import REAL_MODEL, STANDIN

FLAGEMBEDDING_M3_MODULE = "FlagEmbedding.finetune.embedder.encoder_only.m3"
# FlagEmbedding's runner with m3lab's additions (the efficient sparse head); same arguments plus m3lab's
M3LAB_M3_MODULE = "m3lab.run_m3"
# Relative, as people type it: printed commands must run from a checkout on any machine (m3lab.train.launch
# resolves it against the repository when it launches a run)
DEFAULT_TRAIN_DATA = "data/train.jsonl"
# FlagEmbedding's ds_stage1.json uses this bucket. With contiguous_gradients (DeepSpeed's default)
# ZeRO 1/2 allocates a gradient buffer of this many elements: ~0.93 GiB in fp16, whatever the model.
# HF Trainer's --optim values m3lab models (m3lab.predict traces each)
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "adamw_bnb_8bit")


class Trainer(StrEnum):
    """Which trainer a run describes."""

    FLAGEMBEDDING_M3 = "flagembedding-m3"  # FlagEmbedding's M3 runner: what m3lab trains and renders
    HF = "hf"  # plain HF Trainer fine-tuning a sequence classifier (for the predictor only)


class Precision(StrEnum):
    """The weights' and activations' dtype as a run trains (fp16/bf16: mixed precision)."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


TRAINERS = tuple(trainer.value for trainer in Trainer)


# The XLM-R layers' projections LoRA wraps, matched by peft as name suffixes: attention's query, key, value
# and output (``attention.output.dense``), the feed-forward's two (``intermediate.dense``, ``output.dense``).
# A bare "dense" would also catch ``pooler.dense``, which BGE-M3's vectors never pass through.
LORA_TARGETS = ("query", "key", "value", "intermediate.dense", "output.dense")
# FlagEmbedding's defaults for its decoder-only --lora_rank, --lora_alpha, --lora_dropout
LORA_RANK, LORA_ALPHA, LORA_DROPOUT = 64, 16.0, 0.1

# m3lab.run_m3's --resume_from_checkpoint value for the newest checkpoint it finds (m3lab.train.resume)
RESUME_LATEST = "latest"


# m3lab's own levers as the arguments ``-m m3lab.run_m3`` takes beside FlagEmbedding's (HfArgumentParser)
@dataclass
class M3LabArguments:
    efficient_sparse_head: bool = field(default=False, metadata={
        "help": "m3lab.train.sparse_head: the sparse embedding in O(batch x vocab) memory instead of O(batch x seq x vocab)"})
    freeze_word_embeddings: bool = field(default=False, metadata={
        "help": "keep the word-embedding matrix fixed (no gradient, no optimizer state for it)"})
    grad_cache_chunk_tokens: int = field(default=0, metadata={
        "help": "m3lab.train.grad_cache: chunks of about N tokens instead of N texts (texts per chunk: N // the "
                "batch's padded length, at least 1), so short and long batches alike fill the chunk (0: off)"})
    grad_cache_chunk_size: int = field(default=0, metadata={
        "help": "m3lab.train.grad_cache: encode N texts at a time and cache the loss's gradients (0: off)"})
    use_lora: bool = field(default=False, metadata={
        "help": "m3lab.train.lora: train a low-rank adapter on the encoder instead of its weights; the sparse and "
                "ColBERT heads train in full (FlagEmbedding's decoder-only flag names)"})
    lora_rank: int = field(default=LORA_RANK, metadata={"help": "the adapter's rank (FlagEmbedding's default)"})
    lora_alpha: float = field(default=LORA_ALPHA, metadata={"help": "the adapter's scale numerator: updates x alpha / rank"})
    lora_dropout: float = field(default=LORA_DROPOUT, metadata={"help": "dropout on the adapter's input"})
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS), metadata={
        "help": "the encoder's layers the adapter wraps, as name suffixes (default: attention and feed-forward)"})
    save_merged_lora_model: bool = field(default=False, metadata={
        "help": "at the end, also write OUTPUT_DIR/merged_model: the adapter folded into the encoder, with both heads"})
    previous_output_dirs: list[str] = field(default_factory=list, metadata={
        "help": "with --resume_from_checkpoint latest, also look for the output folder's checkpoints in a folder "
                "of the same name under these (Kaggle: /kaggle/input, where a saved version's output comes back)"})

    @property
    def levers(self) -> "M3LabArguments":
        """These arguments but where the next checkpoint is looked for: what changes the model or its step."""
        return dataclasses.replace(self, previous_output_dirs=[])


@dataclass(frozen=True)
class Hardware:
    """What the launch will run on, as far as the configuration checks care."""

    device: str = "cpu"  # "cpu" or "cuda"
    gpu_name: str | None = None
    gpu_count: int = 0
    supports_bf16: bool = False

    @classmethod
    def detect(cls) -> "Hardware":
        import torch

        if not torch.cuda.is_available():
            return cls()
        return cls("cuda", torch.cuda.get_device_name(0), torch.cuda.device_count(), torch.cuda.is_bf16_supported())


@dataclass
class TrainConfig:
    """FlagEmbedding M3 fine-tuning arguments, named as FlagEmbedding names them."""

    model: str = REAL_MODEL  # a hub id, a local folder, or "tiny-bge-m3" for the offline stand-in
    train_data: list[str] = field(default_factory=lambda: [DEFAULT_TRAIN_DATA])
    train_group_size: int = 8
    query_max_len: int = 512
    passage_max_len: int = 512
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-5
    max_steps: int = -1  # > 0 overrides num_train_epochs
    num_train_epochs: float = 1.0
    warmup_ratio: float = 0.1  # of the run's optimizer steps, where warmup_steps is not given
    warmup_steps: int | None = None  # as given; None: warmup_ratio of the steps the data makes
    fp16: bool = False
    bf16: bool = False
    gradient_checkpointing: bool = False
    deepspeed_stage: int | None = 0  # None: no DeepSpeed (plain HF Trainer / DDP)
    offload_optimizer: bool = False
    reduce_bucket_size: int = REDUCE_BUCKET_SIZE  # elements; ZeRO 1/2 gradient bucket
    deepspeed_config_file: str | None = None  # your own JSON instead of the rendered one
    fix_encoder: bool = False
    negatives_cross_device: bool = False
    same_dataset_within_batch: bool = False
    query_instruction_for_retrieval: str | None = None  # put before every query (None: nothing)
    unified_finetuning: bool = True
    use_self_distill: bool = False
    self_distill_start_step: int = 0
    knowledge_distillation: bool = False
    temperature: float = 0.02
    pad_to_multiple_of: int | None = None
    efficient_sparse_head: bool = False  # m3lab.train.sparse_head: O(batch x vocab) instead of O(batch x seq x vocab)
    freeze_word_embeddings: bool = False  # keep the 250,002 x 1024 word-embedding matrix fixed
    grad_cache_chunk_size: int = 0  # m3lab.train.grad_cache: encode this many texts at a time (0: off)
    grad_cache_chunk_tokens: int = 0  # m3lab.train.grad_cache: or about this many tokens at a time (0: off)
    use_lora: bool = False  # m3lab.train.lora: a low-rank adapter on the encoder; sparse and ColBERT heads in full
    lora_rank: int = LORA_RANK
    lora_alpha: float = LORA_ALPHA
    lora_dropout: float = LORA_DROPOUT
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    save_merged_lora_model: bool = False  # also write OUTPUT_DIR/merged_model at the end
    optim: str = "adamw_torch"  # HF Trainer's --optim, used without DeepSpeed (e.g. adamw_bnb_8bit)
    sub_batch_size: int | None = None  # FlagEmbedding's --sub_batch_size: encode N texts at a time (None: all)
    torch_adam: bool = True  # the rendered JSON's AdamW: torch's (True) or DeepSpeed's CUDA FusedAdam (False)
    # "flagembedding-m3", or "hf": plain HF Trainer fine-tuning a sequence classifier on texts of
    # seq_len tokens (for the predictor only; m3lab renders no command for it)
    trainer: str = "flagembedding-m3"
    seq_len: int = 512
    # how transformers runs attention; FlagEmbedding's runner has no option and gets "sdpa" (the
    # predictor can compare "eager", which keeps the (L x L) scores)
    attn_implementation: str = "sdpa"
    num_processes: int = 1
    seed: int = 42
    logging_steps: int = 1
    dataloader_drop_last: bool = True
    save_steps: int | None = None  # a checkpoint every this many steps (None: none)
    save_total_limit: int | None = None  # the checkpoints kept (None: all)
    resume_from_checkpoint: str | None = None  # a checkpoint folder to go on from

    # ---- presets -------------------------------------------------------------------------
    @classmethod
    def upstream_example(cls, **changes) -> "TrainConfig":
        """FlagEmbedding's own M3 example (examples/finetune/embedder/encoder_only/m3.sh) on one GPU,
        with its ds_stage0.json: DeepSpeed's FusedAdam (no ``torch_adam``). Adapted: one process
        instead of two, so no ``negatives_cross_device`` (nothing to share on one)."""
        return cls(**{**dict(
            train_group_size=8, query_max_len=512, passage_max_len=512, per_device_train_batch_size=2,
            fp16=True, gradient_checkpointing=True, deepspeed_stage=0, torch_adam=False, num_train_epochs=2,
            unified_finetuning=True, use_self_distill=True, self_distill_start_step=0,
            pad_to_multiple_of=8,  # m3.sh leaves same_dataset_within_batch at FlagEmbedding's False
        ), **changes})

    @classmethod
    def common_t4_advice(cls, **changes) -> "TrainConfig":
        """The advice usually given for a T4 (see FlagEmbedding issue #1218 and the README)."""
        return cls(**{**dict(
            train_group_size=6, query_max_len=64, passage_max_len=392, per_device_train_batch_size=1,
            fp16=True, gradient_checkpointing=True, deepspeed_stage=1, negatives_cross_device=False,
            unified_finetuning=True, use_self_distill=True,
        ), **changes})

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    # ---- checks --------------------------------------------------------------------------
    def problems(self, hardware: Hardware | None = None) -> list[str]:
        """Every reason this configuration would fail or silently not do what it says; with
        ``hardware``, also what would stop it when launched there."""
        found = (self._count_problems() + self._training_problems() + self._deepspeed_problems()
                 + self._lever_problems() + self._predictor_problems())
        if hardware is not None:
            found += self._launch_problems() + self._hardware_problems(hardware)
        return found

    def _count_problems(self) -> list[str]:
        found = []
        for name in ("query_max_len", "passage_max_len", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "num_processes", "logging_steps"):
            if getattr(self, name) < 1:
                found.append(f"{name} is {getattr(self, name)}; it must be at least 1.")
        if self.train_group_size < 1 and self.trainer == Trainer.FLAGEMBEDDING_M3:
            found.append(f"train_group_size is {self.train_group_size}; FlagEmbedding trains each query against one "
                         "positive and train_group_size - 1 negatives, so it must be at least 1.")
        elif self.train_group_size == 1 and self.trainer == Trainer.FLAGEMBEDDING_M3 and self.texts_contrasted() < 2:
            found.append("train_group_size is 1 (no negatives of its own) with one query per step on one process: "
                         "FlagEmbedding would contrast each query's positive with nothing. Raise "
                         "per_device_train_batch_size (the other queries' passages are then its negatives, as in "
                         "BGE-M3's unsupervised stage), or give train_group_size 2 or more.")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            found.append("Set max_steps > 0 or num_train_epochs > 0: as given, nothing would train.")
        if self.learning_rate <= 0:
            found.append(f"learning_rate is {self.learning_rate}; it must be positive.")
        for name in ("save_steps", "save_total_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                found.append(f"{name} is {getattr(self, name)}; give 1 or more, or None.")
        return found

    def texts_contrasted(self) -> int:
        """The queries whose passages each query is scored against in a step: its own batch's, and every
        process's with negatives_cross_device."""
        return self.per_device_train_batch_size * (self.num_processes if self.negatives_cross_device else 1)

    def _training_problems(self) -> list[str]:
        found = []
        if self.fp16 and self.bf16:
            found.append("fp16 and bf16 are both on; choose one (a T4 can only do fp16).")
        if self.fix_encoder and not self.unified_finetuning:
            found.append("fix_encoder freezes everything but colbert_linear and sparse_linear, and with "
                         "unified_finetuning off those heads do not exist: nothing would train. Turn "
                         "unified_finetuning on, or fix_encoder off.")
        if self.use_self_distill and not self.unified_finetuning:
            found.append("use_self_distill needs unified_finetuning (it distils the dense/sparse/ColBERT "
                         "ensemble); turn unified_finetuning on or use_self_distill off.")
        if self.negatives_cross_device and self.num_processes == 1:
            found.append("negatives_cross_device shares negatives between processes, and with "
                         "num_processes=1 there are none to share: it has no effect. Turn it off, or "
                         "run 2+ processes.")
        if self.sub_batch_size is not None and self.sub_batch_size < 1:
            found.append(f"sub_batch_size is {self.sub_batch_size}; give the texts encoded at a time (1 or more), or "
                         "None to encode each batch at once.")
        if self.optim not in OPTIMIZERS:
            found.append(f"optim is {self.optim!r}; m3lab knows {', '.join(OPTIMIZERS)}.")
        elif self.optim != "adamw_torch" and self.deepspeed_stage is not None:
            found.append(f"optim={self.optim} is HF Trainer's choice, and with DeepSpeed the optimizer is the one "
                         "the DeepSpeed JSON names (HF ignores --optim). Set deepspeed_stage=None to use it "
                         "(fp16 then runs through HF's mixed precision).")
        return found

    def _deepspeed_problems(self) -> list[str]:
        found = []
        if self.deepspeed_stage is not None and self.deepspeed_stage not in (0, 1, 2):
            found.append(f"deepspeed_stage is {self.deepspeed_stage}; m3lab renders stages 0, 1 and 2 "
                         "(or None for no DeepSpeed).")
        if self.deepspeed_stage == 2 and self.gradient_checkpointing:
            found.append("ZeRO-2 with gradient_checkpointing fails in DeepSpeed with FlagEmbedding's M3 "
                         "trainer (\"Gradient computed twice for this partition\"): the model encodes queries "
                         "and passages in two passes, and reentrant checkpointing then fires each gradient "
                         "hook twice. Use deepspeed_stage=1, or turn gradient_checkpointing off.")
        if self.offload_optimizer and (self.deepspeed_stage or 0) < 1:
            found.append("offload_optimizer needs DeepSpeed ZeRO stage 1 or 2; set deepspeed_stage=1 or 2.")
        if self.deepspeed_config_file is not None:
            if self.deepspeed_stage is None:
                found.append("deepspeed_config_file is set but deepspeed_stage is None; set the stage "
                             "your JSON uses.")
            else:
                found += self._deepspeed_file_problems(Path(self.deepspeed_config_file))
        return found

    def _lever_problems(self) -> list[str]:
        found = []
        if self.freeze_word_embeddings and self.fix_encoder:
            found.append("freeze_word_embeddings has no effect with fix_encoder, which freezes the whole encoder "
                         "already; turn one of them off.")
        if self.grad_cache_chunk_size < 0:
            found.append(f"grad_cache_chunk_size is {self.grad_cache_chunk_size}; give the texts per chunk "
                         "(1 or more), or 0 to turn gradient caching off.")
        if self.grad_cache_chunk_tokens < 0:
            found.append(f"grad_cache_chunk_tokens is {self.grad_cache_chunk_tokens}; give the tokens per chunk "
                         "(e.g. 8192), or 0 to turn gradient caching off.")
        if self.grad_cache_chunk_size and self.grad_cache_chunk_tokens:
            found.append("grad_cache_chunk_size and grad_cache_chunk_tokens both size the gradient cache's chunks; "
                         "give one: texts per chunk, or tokens per chunk.")
        if self.uses_grad_cache and self.deepspeed_stage == 2:
            found.append("the gradient cache with ZeRO-2 fails in DeepSpeed (\"Gradient computed twice for this "
                         "partition\"): gradient caching back-propagates once per chunk, and ZeRO-2 reduces each "
                         "gradient the first time it arrives. Use deepspeed_stage=1 or 0, or no DeepSpeed.")
        found += self._lora_problems()
        if self.sub_batch_size is not None and self.uses_grad_cache:
            found.append("sub_batch_size and the gradient cache both split the batch; gradient caching replaces "
                         "FlagEmbedding's encoding loop, so sub_batch_size would be ignored. Use one of them.")
        return found

    def _lora_problems(self) -> list[str]:
        if not self.use_lora:
            return ["save_merged_lora_model merges a LoRA adapter, and use_lora is off: there is none. Turn use_lora "
                    "on, or save_merged_lora_model off."] if self.save_merged_lora_model else []
        found = []
        if self.fix_encoder:
            found.append("use_lora trains an adapter on the encoder, and fix_encoder freezes the encoder: the adapter "
                         "would not train. Turn one of them off.")
        if self.freeze_word_embeddings:
            found.append("freeze_word_embeddings has no effect with use_lora, which keeps every encoder weight fixed "
                         "already; turn freeze_word_embeddings off.")
        if self.lora_rank < 1:
            found.append(f"lora_rank is {self.lora_rank}; give the adapter's rank, 1 or more (FlagEmbedding's "
                         f"default is {LORA_RANK}).")
        if not 0 <= self.lora_dropout < 1:
            found.append(f"lora_dropout is {self.lora_dropout}; give a probability from 0 up to (not including) 1.")
        if not self.target_modules:
            found.append("target_modules is empty; name the encoder layers the adapter wraps (e.g. query key value).")
        return found

    def _predictor_problems(self) -> list[str]:
        found = []
        if self.trainer not in TRAINERS:
            found.append(f"trainer is {self.trainer!r}; m3lab knows {', '.join(TRAINERS)}.")
        if self.seq_len < 1:
            found.append(f"seq_len is {self.seq_len}; it must be at least 1.")
        return found

    def _launch_problems(self) -> list[str]:
        """What FlagEmbedding would run without a word, but wrongly."""
        found = []
        if self.same_dataset_within_batch and self.query_instruction_for_retrieval is None:
            found.append("same_dataset_within_batch with no query_instruction_for_retrieval: FlagEmbedding 1.4.2's "
                         "same-dataset path then formats the missing instruction into every query, which trains as "
                         "\"None\" + query (lesson 03 shows it). Set query_instruction_for_retrieval=\"\" (or your "
                         "instruction), or turn same_dataset_within_batch off.")
        return found

    def check(self, hardware: Hardware | None = None) -> None:
        """Raise ConfigError listing every problem, or return quietly."""
        found = self.problems(hardware)
        if found:
            raise ConfigError(found)

    def _hardware_problems(self, hw: Hardware) -> list[str]:
        found = []
        if hw.device == "cpu":
            if self.fp16 or (self.bf16 and self.deepspeed_stage is not None):
                found.append("fp16 mixed precision (and bf16 under DeepSpeed) needs a CUDA GPU, and this machine "
                             "has none; set fp16=False (bf16 runs on a CPU through HF's autocast, without "
                             "DeepSpeed) for a CPU run.")
        else:
            if self.bf16 and not hw.supports_bf16:
                found.append(f"bf16 is on but {hw.gpu_name} has no bf16 (a T4 is sm75); use fp16=True instead.")
            if self.num_processes > hw.gpu_count:
                found.append(f"num_processes is {self.num_processes} but this machine has {hw.gpu_count} "
                             f"GPU(s); lower num_processes to {hw.gpu_count}.")
        return found

    def _deepspeed_file_problems(self, path: Path) -> list[str]:
        """Where the user's DeepSpeed JSON and this configuration disagree (``m3lab.deepspeed_json``
        reads the file and says what DeepSpeed itself would refuse)."""
        from m3lab import deepspeed_json

        try:
            ds = deepspeed_json.read(path)
        except ConfigError as error:
            return error.problems
        found = []
        for key, value in self._batch_figures().items():
            given = ds.settings.get(key, "auto")
            if given != "auto" and given != value:
                found.append(f"{path}: {key} is {given} but this configuration gives {value}; write "
                             f'"auto" or {value}.')
        if ds.stage != self.deepspeed_stage:
            found.append(f"{path}: zero_optimization.stage is {ds.stage} but deepspeed_stage is "
                         f"{self.deepspeed_stage}; make them agree.")
        for precision in ("fp16", "bf16"):
            enabled = (ds.settings.get(precision) or {}).get("enabled", False)
            if enabled not in ("auto", getattr(self, precision)):
                found.append(f"{path}: {precision}.enabled is {enabled} but {precision}={getattr(self, precision)}; "
                             'write "auto" or make them agree.')
        return found

    def _batch_figures(self) -> dict[str, int]:
        return {
            "train_micro_batch_size_per_gpu": self.per_device_train_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "train_batch_size": self.per_device_train_batch_size * self.gradient_accumulation_steps
            * self.num_processes,
        }

    # ---- rendering ------------------------------------------------------------------------
    def deepspeed_config(self) -> dict | None:
        """The DeepSpeed JSON for this configuration (None without DeepSpeed).

        Batch figures are written out, not "auto", and train_batch_size is left for DeepSpeed to
        compute (micro x accumulation x processes): on multi-process CPU runs HF fills "auto" and
        checks an explicit figure with a world size of 1, and either way the launch fails.
        """
        if self.deepspeed_stage is None:
            return None
        zero: dict = {"stage": self.deepspeed_stage}
        if self.deepspeed_stage >= 1:
            zero.update(reduce_bucket_size=self.reduce_bucket_size, allgather_bucket_size=self.reduce_bucket_size,
                        overlap_comm=False, contiguous_gradients=True)
        if self.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        figures = self._batch_figures()
        return {
            "train_micro_batch_size_per_gpu": figures["train_micro_batch_size_per_gpu"],
            "gradient_accumulation_steps": figures["gradient_accumulation_steps"],
            "zero_optimization": zero,
            "fp16": {"enabled": self.fp16, "loss_scale": 0, "loss_scale_window": 1000,
                     "initial_scale_power": 12, "hysteresis": 2, "min_loss_scale": 1},
            "bf16": {"enabled": self.bf16},
            # torch_adam: PyTorch's AdamW; without it DeepSpeed builds its CUDA FusedAdam (upstream's ds_stage0.json)
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                      "weight_decay": "auto",
                                                      **({"torch_adam": True} if self.torch_adam else {})}},
            # An offloaded optimizer is an ordinary torch AdamW on the CPU; DeepSpeed's compiled
            # CPUAdam is faster but needs a build step that Colab does not always survive.
            **({"zero_force_ds_cpu_optimizer": False} if self.offload_optimizer else {}),
            "gradient_clipping": "auto",
            "steps_per_print": 100,
            "wall_clock_breakdown": False,
        }

    @property
    def deepspeed_file_name(self) -> str | None:
        """The name the printed command gives the DeepSpeed JSON (written beside it), None without DeepSpeed."""
        return None if self.deepspeed_stage is None else f"ds_stage{self.deepspeed_stage}.json"

    def deepspeed_json(self) -> str | None:
        ds = self.deepspeed_config()
        return None if ds is None else json.dumps(ds, indent=2) + "\n"

    def steps_per_epoch(self, records: int) -> int:
        """Optimizer steps in an epoch of ``records`` training lines (FlagEmbedding drops the last short batch)."""
        per_step = self.per_device_train_batch_size * self.num_processes * self.gradient_accumulation_steps
        return max(1, records // per_step)

    def optimizer_steps(self, records: int) -> int:
        """The run's optimizer steps over ``records`` lines: ``max_steps`` where set, else its epochs."""
        return self.max_steps if self.max_steps > 0 else math.ceil(self.steps_per_epoch(records) * self.num_train_epochs)

    def warmup_steps_for(self, optimizer_steps: int) -> int:
        """The warm-up rule, the one every command and plan uses: ``warmup_steps`` as given, else
        ``warmup_ratio`` of the run's optimizer steps, rounded up as HF Trainer derives it."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return math.ceil(self.warmup_ratio * optimizer_steps)

    def warmup_step_count(self) -> int:
        """The warm-up steps of this run (``warmup_steps_for``), its epochs counted on ``train_data``
        where it has no ``max_steps``. Commands say ``--warmup_steps N``: transformers 5 dropped
        ``--warmup_ratio`` (there a float ``--warmup_steps`` below 1 is the ratio, which transformers 4
        refuses), and a whole number means the same on both."""
        if self.warmup_steps is not None or self.warmup_ratio == 0 or self.max_steps > 0:
            return self.warmup_steps_for(self.max_steps)
        from m3lab.data.jsonl import resolve_data_path

        records = 0
        for name in self.train_data:
            path = resolve_data_path(name)
            files = sorted(path.glob("*.json*")) if path.is_dir() else [path]
            if not all(f.is_file() for f in files) or not files:
                raise ValueError(f"--train_data {name}: not found, so the warmup steps of an epoch-long run cannot "
                                 "be counted; set max_steps, or warmup_ratio=0, or point train_data at the files.")
            records += sum(1 for f in files for line in f.open(encoding="utf-8") if line.strip())
        return self.warmup_steps_for(math.ceil(self.steps_per_epoch(records) * self.num_train_epochs))

    @property
    def uses_m3lab_levers(self) -> bool:
        """Whether the run needs m3lab.run_m3 (FlagEmbedding's runner does not know these arguments)."""
        return bool(self.efficient_sparse_head or self.freeze_word_embeddings or self.uses_grad_cache or self.use_lora)

    @property
    def uses_grad_cache(self) -> bool:
        return bool(self.grad_cache_chunk_size or self.grad_cache_chunk_tokens)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


__all__ = ["TrainConfig", "ConfigError", "Hardware", "FLAGEMBEDDING_M3_MODULE", "STANDIN",
           "REAL_MODEL"]
