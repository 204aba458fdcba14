"""``m3lab fit``: the best FlagEmbedding M3 configuration that a platform holds, found with the predictor.

A platform is a GPU and the host RAM beside it (``m3lab.plan.platforms``: free Colab, Kaggle, or a GPU
with ``--host-ram-gib``). The data decides the lengths: the smallest query_max_len and
passage_max_len that keep 95% of the data's tokens (passages counted once each); then, if the
data's longest queries still fit, they are kept whole. The encoder stays trainable (no
fix_encoder, no frozen word embeddings): freezing is a lever for smaller cards, not a way to fit.
When nothing holds even a group of 2 at those lengths, the passages are cut shorter: the longest
passage_max_len that the most frugal setting holds at group 2 (bisected, a multiple of 8, at least
``SHORTEST_PASSAGES``), and the search runs again there; the result says how much of the passages'
tokens that length keeps. The largest train_group_size that any memory setting holds wins: the predicted verdict leaves at
least ``margin`` of the card to spare (by default, not a close call) and the platform has its host
RAM (``m3lab.predict.host``); among the settings that hold it, the fastest (the settings are listed
fastest first). A trial whose live tensors alone leave less than the margin (a quick trace of
shallow copies tells) is not traced at full depth.
``stock=True`` keeps to what FlagEmbedding has (its own sparse head, no gradient cache); otherwise
m3lab's levers join in (the efficient sparse head, gradient caching). ``lora=True`` trains a LoRA
adapter on the encoder instead of its weights (``LORA_SETTINGS``): the learner's choice, never the
search's, since it changes what trains, not only what it costs. Every figure is predicted,
and said to be.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from m3lab.command import render
from m3lab.config import TrainConfig
from m3lab.errors import ConfigError
from m3lab.gpus import CLOSE_CALL_BYTES, GIB
from m3lab.plan.platforms import Platform, platform_for
from m3lab.standin import REAL_MODEL

# (what to call it, TrainConfig changes), fastest first: each later one saves memory and costs time.
# Shared by both: FlagEmbedding's own knobs.
_STOCK_FIRST: tuple[tuple[str, dict], ...] = (
    ("no DeepSpeed, fused AdamW (HF's default)", dict(deepspeed_stage=None, optim="adamw_torch_fused")),
    ("DeepSpeed ZeRO-1, torch AdamW", dict(deepspeed_stage=1)),
    ("8-bit AdamW, no DeepSpeed", dict(deepspeed_stage=None, optim="adamw_bnb_8bit")),
    ("DeepSpeed ZeRO-1 + optimizer offload", dict(deepspeed_stage=1, offload_optimizer=True)),
)
# FlagEmbedding as it is: the most frugal is 8-bit AdamW (the group search bisects with the last
# setting, and offload's host RAM would fail free Colab's every trial; on one GPU 8-bit AdamW saves
# about what offload saves, without the host RAM and the CPU's slow update). Not --sub_batch_size:
# with unified fine-tuning FlagEmbedding 1.4.2 concatenates the chunks' ColBERT vectors, which fails
# as soon as two chunks pad to different lengths (any real data; found running notebook 07's recipe).
STOCK_SETTINGS = _STOCK_FIRST[:3]
MEMORY_SETTINGS = _STOCK_FIRST + (
    ("8-bit AdamW + grad cache (chunks of 4)", dict(deepspeed_stage=None, optim="adamw_bnb_8bit",
                                                    grad_cache_chunk_size=4)),
    ("8-bit AdamW + grad cache (chunks of 1)", dict(deepspeed_stage=None, optim="adamw_bnb_8bit",
                                                    grad_cache_chunk_size=1)),
)
# LoRA (``--lora``; m3lab.train.lora at FlagEmbedding's rank 64): the encoder's weights frozen, so the
# optimizer holds only the adapter and the two heads, and 8-bit AdamW or ZeRO would save next to nothing;
# what is left to save is the activations, which the gradient cache cuts.
# Its learning rate is ten times full fine-tuning's: LoRA scales its updates by alpha / rank (a quarter at
# FlagEmbedding's 16 / 64), and at full fine-tuning's rate a real pretrained encoder barely moved where ten
# times it came close to its full fine-tune (data/quality/, lesson 09).
LORA = dict(deepspeed_stage=None, optim="adamw_torch_fused", use_lora=True, learning_rate=1e-4)
LORA_SETTINGS = (
    ("LoRA, fused AdamW, no DeepSpeed", LORA),
    ("LoRA + grad cache (chunks of 4)", dict(LORA, grad_cache_chunk_size=4)),
    ("LoRA + grad cache (chunks of 1)", dict(LORA, grad_cache_chunk_size=1)),
)
MODEL_MAX_LEN = 8192  # BGE-M3's longest input
SHORTEST_PASSAGES = 64  # the shortest passage_max_len the search cuts to when nothing fits the data's


@dataclass
class Trial:
    setting: str
    config: TrainConfig
    report: object  # predict.MemoryReport
    fits: bool  # on the GPU with the margin, and in the host's RAM
    host_fits: bool = True
    screened: bool = False  # ruled out by its live tensors, from shallow copies (``report`` is theirs)

    @property
    def verdict(self) -> str:
        if self.screened:
            spare = self.report.usable_bytes - self.report.peak_allocated_bytes - self.report.context_bytes
            return f"live tensors alone leave {spare / GIB:.2f} GiB (quick trace)"
        return self.report.short_verdict


@dataclass
class FitResult:
    platform: Platform
    margin_bytes: int
    query_max_len: int
    passage_max_len: int
    tokenizer: str
    coverage: float
    max_group: int
    stock: bool = False
    lora: bool = False
    longest_query: int = 0  # the data's longest query, in tokens (rounded up to 8)
    # when nothing fitted at the data's passage length: that length, and the share of the passages'
    # tokens the shorter one (passage_max_len) keeps
    cut_from: int | None = None
    tokens_kept: float | None = None
    best: Trial | None = None
    trials: list[Trial] = field(default_factory=list)
    lines: tuple = field(default=(), repr=False)  # the data's lines in tokens (LineLengths): the step time's basis

    @property
    def gpu(self) -> str:
        return self.platform.gpu.name

    def cut(self) -> str | None:
        """What cutting the passages cost, in a sentence (None when the data's length fitted)."""
        if self.cut_from is None:
            return None
        return (f"passages cut to {self.passage_max_len} tokens, keeping {self.tokens_kept:.0%} of their tokens "
                f"(predicted): nothing fitted at {self.cut_from}, the length keeping {self.coverage:.0%}")

    def table(self) -> str:
        header = (f"{'memory setting':40} {'group':>5} {'query':>5} {'peak':>7} {'needs':>7} {'host':>7}  verdict")
        lines = [header, "-" * len(header)]
        for t in self.trials:
            mark = "  <- best" if t is self.best else ""
            host = "" if t.host_fits else f"; host RAM short ({self.platform.host_ram_bytes / GIB:.1f} GiB)"
            lines.append(f"{t.setting:40} {t.config.train_group_size:5d} {t.config.query_max_len:5d} "
                         f"{t.report.peak_allocated_bytes / GIB:5.2f} G {t.report.total_bytes / GIB:5.2f} G "
                         f"{t.report.host.total_bytes / GIB:5.2f} G  {t.verdict}{host}{mark}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        """The chosen configuration (its command's arguments) and its report, for ``--json``."""
        import dataclasses

        best = self.best
        return {"platform": self.platform.key, "gpu": self.gpu, "host_ram_bytes": self.platform.host_ram_bytes,
                "margin_bytes": self.margin_bytes, "stock": self.stock, "lora": self.lora, "coverage": self.coverage,
                "tokenizer": self.tokenizer, "longest_query": self.longest_query,
                "passage_max_len": self.passage_max_len, "cut_from": self.cut_from, "tokens_kept": self.tokens_kept,
                "best": None if best is None else {"setting": best.setting, "config": dataclasses.asdict(best.config),
                                                   "command": render(best.config),
                                                   "report": best.report.to_json()},
                "trials": [{"setting": t.setting, "train_group_size": t.config.train_group_size,
                            "query_max_len": t.config.query_max_len, "fits": t.fits, "host_fits": t.host_fits,
                            "total_bytes": t.report.total_bytes, "screened": t.screened,
                            "host_total_bytes": t.report.host.total_bytes}
                           for t in self.trials]}


def base_config(data: list[str], platform: Platform, query_max_len: int, passage_max_len: int,
                stock: bool = False) -> TrainConfig:
    """Everything but the memory setting and the group: the full model trained, dense + sparse + ColBERT
    with self-distillation, fp16 (bf16 where the card has it), checkpointing, negatives shared across
    GPUs where there are several, and (unless ``stock``) m3lab's sparse head."""
    gpu = platform.gpu
    return TrainConfig(
        model=REAL_MODEL, train_data=list(data), query_max_len=query_max_len, passage_max_len=passage_max_len,
        per_device_train_batch_size=1, fp16=not gpu.supports_bf16, bf16=gpu.supports_bf16,
        gradient_checkpointing=True, unified_finetuning=True, use_self_distill=True,
        pad_to_multiple_of=8, efficient_sparse_head=not stock, num_processes=gpu.count,
        # on several GPUs, each query sees the other GPUs' passages too, as FlagEmbedding's m3.sh runs it;
        # not same_dataset_within_batch: without a query instruction FlagEmbedding 1.4.2 then prefixes
        # every query with the text "None" (notebook 03 shows it)
        negatives_cross_device=gpu.count > 1)


@dataclass(frozen=True)
class DataLengths:
    """What the data asks of the lengths and the group, counted with ``tokenizer``."""

    query_max_len: int  # keeps ``coverage`` of the queries' tokens
    passage_max_len: int  # keeps ``coverage`` of the passages' tokens (each passage counted once)
    fewest_negatives: int  # the fewest negatives any line has
    tokenizer: str
    longest_query: int  # the longest query, rounded up to a multiple of 8
    passage_tokens: tuple[int, ...] = ()  # each passage's length in tokens (each passage once)
    lines: tuple = ()  # every line's texts in tokens (m3lab.data.jsonl.LineLengths): what batches pad to

    def passage_tokens_kept(self, max_len: int) -> float:
        """The share of the passages' tokens that ``max_len`` keeps."""
        return sum(min(n, max_len) for n in self.passage_tokens) / max(1, sum(self.passage_tokens))


def data_lengths(data: list[str], coverage: float = 0.95, tokenizer=None) -> DataLengths:
    """The lengths that keep ``coverage`` of the data's tokens, and what else the data decides."""
    from m3lab.data.jsonl import (
        length_covering_tokens,
        line_lengths,
        load_jsonl,
        token_lengths,
    )

    # the data first: bad data is reported before the tokenizer (and the stand-in) is loaded and talks
    records = load_jsonl(data)
    if tokenizer is None:
        from m3lab.standin import load_tokenizer

        tokenizer, name = load_tokenizer()
    else:
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    passages = list(dict.fromkeys(t for r in records for t in r["pos"] + r.get("neg", [])))
    query_lengths = token_lengths([r["query"] for r in records], tokenizer)
    passage_lengths = token_lengths(passages, tokenizer)
    return DataLengths(
        query_max_len=min(length_covering_tokens(query_lengths, coverage), MODEL_MAX_LEN),
        passage_max_len=min(length_covering_tokens(passage_lengths, coverage), MODEL_MAX_LEN),
        fewest_negatives=min(len(r.get("neg", [])) for r in records), tokenizer=name,
        longest_query=min(length_covering_tokens(query_lengths, 1.0), MODEL_MAX_LEN),
        passage_tokens=tuple(int(n) for n in passage_lengths), lines=line_lengths(records, tokenizer))


class _Search:
    """The trials of one fit: each configuration predicted once, ruled out by its live tensors first
    where a quick trace of shallow copies shows they leave less than the margin."""

    def __init__(self, base: TrainConfig, result: FitResult, settings, log):
        self.base, self.result, self.settings, self.log = base, result, dict(settings), log
        self.tried: dict[tuple[str, int], Trial] = {}

    def trial(self, setting: str, group: int, **lengths) -> Trial:
        from m3lab.predict import predict

        where, margin = self.result.platform, self.result.margin_bytes
        config = self.base.replace(**self.settings[setting], train_group_size=group, **lengths)
        quick = predict(config, where.gpu.key, exact=False)
        screened = quick.usable_bytes - quick.peak_allocated_bytes - quick.context_bytes < margin
        report = quick if screened else predict(config, where.gpu.key)
        host_fits = where.host_ram_bytes is None or report.host.total_bytes <= where.host_ram_bytes
        gpu_fits = not screened and report.fits_with(margin)
        done = Trial(setting, config, report, gpu_fits and host_fits, host_fits, screened)
        self.result.trials.append(done)
        host = "" if host_fits else f"; needs {report.host.total_bytes / GIB:.2f} GiB of host RAM, more than the host has"
        self.log(f"  {setting}, group {group}, query {config.query_max_len}: {done.verdict}{host}")
        return done

    def at(self, setting: str, group: int) -> Trial:
        if (setting, group) not in self.tried:
            self.tried[(setting, group)] = self.trial(setting, group)
        return self.tried[(setting, group)]

    def largest_group(self, cap: int) -> Trial | None:
        """The largest group any setting holds (memory grows with the group: bisect), the frugal
        settings first: they find it soonest, and each later one need only try above it. The cap is tried
        first, with the last setting: where that holds it, no group can be larger. Which
        setting is the most frugal depends on the platform (on two GPUs ZeRO-1 halves the optimizer
        states per GPU; on one it saves nothing), so each one gets its try."""
        best = None
        frugal = list(self.settings)[-1]
        if self.at(frugal, cap).fits:  # the data's cap is often held outright (always, with LoRA on the sample)
            return self.tried[(frugal, cap)]
        for setting in reversed(self.settings):
            low, high = (best.config.train_group_size + 1 if best else 2), cap
            while low <= high:
                group = (low + high) // 2
                attempt = self.at(setting, group)
                if attempt.fits:
                    best, low = attempt, group + 1
                else:
                    high = group - 1
        return best

    def fastest_at(self, best: Trial) -> Trial:
        """The fastest setting that holds the same group (the settings are listed fastest first)."""
        return next(attempt for attempt in (self.at(setting, best.config.train_group_size) for setting in self.settings)
                    if attempt.fits)

    def longest_passages(self, high: int) -> Trial | None:
        """The trial at the longest passage_max_len (a multiple of 8, from SHORTEST_PASSAGES up to
        ``high``) that the most frugal setting holds at group 2 (memory grows with the length:
        bisect); None if none does."""
        frugal = list(self.settings)[-1]
        found, low, high = None, SHORTEST_PASSAGES // 8, high // 8
        while low <= high:
            middle = (low + high) // 2
            attempt = self.trial(frugal, 2, passage_max_len=middle * 8)
            if attempt.fits:
                found, low = attempt, middle + 1
            else:
                high = middle - 1
        return found

    def with_whole_queries(self, best: Trial, longest_query: int) -> Trial:
        """Queries kept whole when the run still fits with them (they are short, and the peak is often
        where their length does not count)."""
        if longest_query <= best.config.query_max_len:
            return best
        whole = self.trial(best.setting, best.config.train_group_size, query_max_len=longest_query)
        return whole if whole.fits else best


def fit(data: list[str] | str, gpu: str | None = None, margin_gib: float = CLOSE_CALL_BYTES / GIB,
        coverage: float = 0.95, tokenizer=None, max_group: int = 16, log=print, *, platform: str | None = None,
        host_ram_gib: float | None = None, stock: bool = False, lora: bool = False) -> FitResult:
    """Search memory settings and group sizes with the predictor; see the module docstring.
    ``platform`` ("colab-t4", "kaggle-t4x2") or ``gpu`` (default "t4") with ``host_ram_gib``."""
    if stock and lora:
        raise ConfigError(["LoRA is m3lab's lever (FlagEmbedding's M3 runner has none): leave out --stock to fit "
                           "with --lora, or --lora to fit FlagEmbedding as it is."])
    where = platform_for(platform, gpu, host_ram_gib)
    data = [str(data)] if isinstance(data, (str, Path)) else [str(d) for d in data]
    lengths = data_lengths(data, coverage, tokenizer)
    # a group is one positive and group - 1 negatives; FlagEmbedding repeats negatives when a line has
    # too few, which adds memory and no information, so the data's fewest negatives cap the group
    cap = max(2, min(max_group, lengths.fewest_negatives + 1))
    result = FitResult(where, int(margin_gib * GIB), lengths.query_max_len, lengths.passage_max_len, lengths.tokenizer,
                       coverage, cap, stock, lora, lengths.longest_query, lines=lengths.lines)
    log(f"{where.describe()}; lengths keeping {coverage:.0%} of the data's tokens ({lengths.tokenizer}): "
        f"query_max_len {lengths.query_max_len}, passage_max_len {lengths.passage_max_len}; train_group_size up to "
        f"{cap} (every line has {lengths.fewest_negatives} negatives)")
    settings = LORA_SETTINGS if lora else STOCK_SETTINGS if stock else MEMORY_SETTINGS
    base = base_config(data, where, lengths.query_max_len, lengths.passage_max_len, stock)
    search = _Search(base, result, settings, log)
    best = search.largest_group(cap)
    if best is None and any(t.host_fits for t in result.trials):  # the GPU is short: cut the passages
        log(f"nothing fits at passage_max_len {lengths.passage_max_len}: the longest passages that fit, group 2")
        shortest = search.longest_passages(lengths.passage_max_len - 8)
        if shortest is not None:
            shorter = shortest.config.passage_max_len
            result.cut_from, result.passage_max_len = lengths.passage_max_len, shorter
            result.tokens_kept = lengths.passage_tokens_kept(shorter)
            log(f"passage_max_len {shorter} fits, keeping {result.tokens_kept:.0%} of the passages' tokens")
            search = _Search(base.replace(passage_max_len=shorter), result, settings, log)
            search.tried[(shortest.setting, 2)] = shortest
            best = search.largest_group(cap)
    if best is not None:
        result.best = search.with_whole_queries(search.fastest_at(best), lengths.longest_query)
    return result
