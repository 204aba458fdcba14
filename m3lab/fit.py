"""``m3lab fit``: the best FlagEmbedding M3 configuration that a GPU holds, found with the predictor.

The data decides the lengths: the smallest query_max_len and passage_max_len that keep 95% of the
data's tokens (passages counted once each). The encoder stays trainable (no fix_encoder, no frozen
word embeddings): freezing is a lever for smaller cards, not a way to fit. Then, among the memory
settings below, from the fastest to the most frugal, the largest train_group_size whose predicted
total (peak + allocator cache + CUDA context) leaves ``margin`` of the card free wins; a faster
setting wins a tie. Every figure is predicted, and said to be.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from m3lab.config import TrainConfig
from m3lab.gpus import GIB, gpu_profile
from m3lab.standin import REAL_MODEL

# (what to call it, TrainConfig changes), fastest first: each later one saves memory and costs time
MEMORY_SETTINGS: tuple[tuple[str, dict], ...] = (
    ("DeepSpeed ZeRO-1, AdamW", dict(deepspeed_stage=1)),
    ("8-bit AdamW, no DeepSpeed", dict(deepspeed_stage=None, optim="adamw_bnb_8bit")),
    ("8-bit AdamW + grad cache (chunks of 4)", dict(deepspeed_stage=None, optim="adamw_bnb_8bit",
                                                    grad_cache_chunk_size=4)),
    ("8-bit AdamW + grad cache (chunks of 1)", dict(deepspeed_stage=None, optim="adamw_bnb_8bit",
                                                    grad_cache_chunk_size=1)),
)
MODEL_MAX_LEN = 8192  # BGE-M3's longest input


@dataclass
class Trial:
    setting: str
    config: TrainConfig
    report: object  # predict.MemoryReport
    fits: bool


@dataclass
class FitResult:
    gpu: str
    margin_bytes: int
    query_max_len: int
    passage_max_len: int
    tokenizer: str
    coverage: float
    max_group: int
    best: Trial | None = None
    trials: list[Trial] = field(default_factory=list)

    def table(self) -> str:
        header = f"{'memory setting':40} {'group':>5} {'peak':>7} {'total':>7}  verdict"
        lines = [header, "-" * len(header)]
        for t in self.trials:
            mark = "  <- best" if t is self.best else ""
            lines.append(f"{t.setting:40} {t.config.train_group_size:5d} {t.report.peak_allocated_bytes / GIB:5.2f} G "
                         f"{t.report.total_bytes / GIB:5.2f} G  {t.report.short_verdict}{mark}")
        return "\n".join(lines)


def base_config(data: list[str], gpu_key: str, query_max_len: int, passage_max_len: int) -> TrainConfig:
    """Everything but the memory setting and the group: the full model trained, dense + sparse + ColBERT
    with self-distillation, fp16 (bf16 where the card has it), checkpointing, m3lab's sparse head."""
    gpu = gpu_profile(gpu_key)
    return TrainConfig(
        model=REAL_MODEL, train_data=list(data), query_max_len=query_max_len, passage_max_len=passage_max_len,
        per_device_train_batch_size=1, fp16=not gpu.supports_bf16, bf16=gpu.supports_bf16,
        gradient_checkpointing=True, unified_finetuning=True, use_self_distill=True, same_dataset_within_batch=True,
        pad_to_multiple_of=8, efficient_sparse_head=True, num_processes=gpu.count)


def data_lengths(data: list[str], coverage: float = 0.95, tokenizer=None) -> tuple[int, int, int, str]:
    """(query_max_len, passage_max_len, most negatives every line has, tokenizer name) for the data."""
    from m3lab.data import length_covering_tokens, load_jsonl, token_lengths

    # the data first: bad data is reported before the tokenizer (and the stand-in) is loaded and talks
    records = load_jsonl(data)
    if tokenizer is None:
        from m3lab.lessons import load_tokenizer

        tokenizer, name = load_tokenizer()
    else:
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    passages = list(dict.fromkeys(t for r in records for t in r["pos"] + r.get("neg", [])))
    query = length_covering_tokens(token_lengths([r["query"] for r in records], tokenizer), coverage)
    passage = length_covering_tokens(token_lengths(passages, tokenizer), coverage)
    negatives = min(len(r.get("neg", [])) for r in records)
    return min(query, MODEL_MAX_LEN), min(passage, MODEL_MAX_LEN), negatives, name


def fit(data: list[str] | str, gpu: str = "t4", margin_gib: float = 1.0, coverage: float = 0.95,
        tokenizer=None, max_group: int = 16, log=print) -> FitResult:
    """Search memory settings and group sizes with the predictor; see the module docstring."""
    from m3lab.predict import predict

    data = [str(data)] if isinstance(data, (str, Path)) else [str(d) for d in data]
    query_len, passage_len, negatives, tokenizer_name = data_lengths(data, coverage, tokenizer)
    # a group is one positive and group - 1 negatives; FlagEmbedding repeats negatives when a line has
    # too few, which adds memory and no information, so the data's fewest negatives cap the group
    cap = max(2, min(max_group, negatives + 1))
    profile = gpu_profile(gpu)
    result = FitResult(profile.name, int(margin_gib * GIB), query_len, passage_len, tokenizer_name, coverage, cap)
    log(f"lengths keeping {coverage:.0%} of the data's tokens ({tokenizer_name}): query_max_len {query_len}, "
        f"passage_max_len {passage_len}; train_group_size up to {cap} (every line has {negatives} negatives)")
    base = base_config(data, gpu, query_len, passage_len)

    def trial(setting: str, changes: dict, group: int) -> Trial:
        config = base.replace(**changes, train_group_size=group)
        report = predict(config, gpu)
        done = Trial(setting, config, report, report.total_bytes <= report.usable_bytes - result.margin_bytes)
        result.trials.append(done)
        log(f"  {setting}, group {group}: {report.total_bytes / GIB:.2f} GiB in all, {report.short_verdict}")
        return done

    # the most frugal setting finds the largest group (memory grows with the group: bisect) ...
    frugal_name, frugal = MEMORY_SETTINGS[-1]
    low, high, best = 2, cap, None
    while low <= high:
        group = (low + high) // 2
        attempt = trial(frugal_name, frugal, group)
        if attempt.fits:
            best, low = attempt, group + 1
        else:
            high = group - 1
    if best is None:
        return result
    # ... and the fastest setting that holds the same group is the one to run
    for name, changes in MEMORY_SETTINGS[:-1]:
        attempt = trial(name, changes, best.config.train_group_size)
        if attempt.fits:
            best = attempt
            break
    result.best = best
    return result
