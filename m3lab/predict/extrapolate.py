"""Extrapolation: a deep model's step predicted from traces of two shallow copies of it.

Layers are identical, so every figure of a step grows by the same bytes per layer as long as the
peak stays at the same point of the step; ``shallow_specs`` picks copies for which that holds
(DeepSpeed's buckets shrunk to match), ``extrapolate_rank`` draws the line to full depth.
"""

from __future__ import annotations

import dataclasses
from copy import deepcopy
from dataclasses import dataclass

from m3lab.gpus import GPU
from m3lab.predict.models import meta_model
from m3lab.predict.report import ModelStates, StepPeak
from m3lab.predict.spec import TraceSpec
from m3lab.predict.step import RankSteps, StepTrace
from m3lab.predict.trace import Phase

# The shallow copies' depths (the first pair tried; DeepSpeed's buckets may need deeper ones)
EXTRAPOLATE_FROM = (2, 3)
DEEPSPEED_ALLREDUCE_BUCKET = 500_000_000  # stage 0's gradient all-reduce buffer (elements)


def with_layers(spec: TraceSpec, layers: int) -> TraceSpec:
    model_config = deepcopy(spec.model_config)
    model_config.num_hidden_layers = layers
    return TraceSpec(**{**{f: getattr(spec, f) for f in spec.__dataclass_fields__}, "model_config": model_config})


@dataclass
class ShallowPair:
    """Two shallow copies (n and n+1 layers) to trace and extrapolate from.

    ``bounded``: DeepSpeed's shrunken gradient buckets hold less than the model's largest gradient,
    which the copies then reduce on its own (DeepSpeed's "extra large" path) where the full model
    copies it into its bucket. That path keeps the gradient alive longer and changes nothing else,
    so the copies' figures during backward (where the gradients are reduced) are upper bounds;
    everything after it (the optimizer's step, the next step) is the full model's, layer for layer.
    Such a pair stands only when the step's peak lies outside backward.
    """

    specs: list[TraceSpec]
    bounded: bool = False

    @property
    def depth(self) -> int:
        return self.specs[0].model_config.num_hidden_layers


def shallow_specs(spec: TraceSpec) -> list[ShallowPair]:
    """The pairs of shallow copies to try, in order (the cheapest first); empty when only a full
    trace will do.

    DeepSpeed copies gradients into buckets (ZeRO-1/2: ``reduce_bucket_size`` elements) and
    empties one when the next gradient does not fit. When the model has more trainable
    parameters than a bucket holds, where it empties depends on depth, so each shallow copy gets
    a bucket smaller by exactly the parameters it lacks: it then empties before the same tensor
    as the full model, and its bucket (a buffer of that many elements) grows with depth as the
    rest does. A shrunken bucket that no longer holds the largest gradient (BGE-M3's 256M-element
    word embeddings in 2- and 3-layer copies with a 5e8 bucket) makes DeepSpeed pass that one
    around the bucket: 2 and 3 layers are tried first as a ``bounded`` pair, then copies deep
    enough for the bucket to hold it (5 and 6 layers for BGE-M3). ZeRO-0 on several GPUs
    all-reduces after backward in chunks of a fixed 5e8 elements, in parameter order, each chunk
    closing after the gradient that takes it past the limit; shallow copies get a chunk smaller by
    the parameters they lack, deep enough that it still closes inside a layer (6 and 7 layers for
    BGE-M3).
    """
    shallow = [with_layers(spec, n) for n in EXTRAPOLATE_FROM]
    if spec.deepspeed is None:
        return [ShallowPair(shallow)]
    zero = spec.deepspeed.get("zero_optimization", {})
    layers = spec.model_config.num_hidden_layers
    # Counted on the copies (a full-depth model on the meta device costs a fresh process 0.1 s):
    # every layer holds the same parameters, so a copy holds every size the full model does
    (shallow_trainable, largest), (deeper_trainable, _) = (trainable_params(copy) for copy in shallow)
    per_layer = deeper_trainable - shallow_trainable
    trainable = shallow_trainable + (layers - EXTRAPOLATE_FROM[0]) * per_layer
    if spec.zero_stage == 0:
        chunk = spec.allreduce_bucket_size or DEEPSPEED_ALLREDUCE_BUCKET
        if spec.num_gpus == 1 or trainable <= chunk:
            return [ShallowPair(shallow)]  # one GPU reduces nothing; a model within one chunk reduces in one piece
        pair = _shallow_allreduce_chunks(spec, chunk, trainable, layers)
        return [ShallowPair(pair)] if pair else []
    buckets = {key: int(zero.get(key, 500_000_000)) for key in ("reduce_bucket_size", "allgather_bucket_size")}
    if trainable <= min(buckets.values()):
        return [ShallowPair(shallow)]

    def shrunk(depth: int) -> tuple[list[TraceSpec], int]:
        """Copies of depth and depth + 1 layers with buckets smaller by the parameters each lacks,
        and the smaller of their buckets."""
        # allgather_bucket_size must stay a multiple of 2 (DeepSpeed's NCCL alignment)
        scaled = [{key: (size - (layers - n) * per_layer) // 2 * 2 for key, size in buckets.items()}
                  for n in (depth, depth + 1)]
        copies = [with_layers(spec, n) for n in (depth, depth + 1)]
        for copy, sizes in zip(copies, scaled):
            copy.deepspeed = {**spec.deepspeed, "zero_optimization": {**zero, **sizes}}
        return copies, min(scaled[0].values())

    pairs = []
    for depth in range(EXTRAPOLATE_FROM[0], layers - 2):
        copies, bucket = shrunk(depth)
        if bucket >= largest:
            return pairs + [ShallowPair(copies)]
        if not pairs and bucket > 0:
            pairs.append(ShallowPair(copies, bounded=True))
    return pairs


def _shallow_allreduce_chunks(spec: TraceSpec, chunk: int, trainable: int, layers: int):
    """Shallow copies for ZeRO-0 on several GPUs with a model bigger than one all-reduce chunk:
    chunk n is smaller by the (layers - n) layers copy n lacks, so the first chunk closes at the
    same gradient counted from the end; it must close inside a layer (past the embeddings) and the
    rest must fit in one more chunk, or only a full trace will do."""
    before_layers, per_layer = trainable_params_before_layers(with_layers(spec, EXTRAPOLATE_FROM[0]))
    for depth in range(EXTRAPOLATE_FROM[0], layers - 2):
        scaled = [chunk - (layers - n) * per_layer for n in (depth, depth + 1)]
        if scaled[0] > before_layers and trainable - chunk < scaled[0]:
            shallow = [with_layers(spec, n) for n in (depth, depth + 1)]
            for copy, size in zip(shallow, scaled):
                copy.allreduce_bucket_size = size
            return shallow
    return None


def trainable_params_before_layers(spec: TraceSpec) -> tuple[int, int]:
    """(trainable parameters before the first encoder layer, in parameter order; those of one layer)."""
    before, per_layer, seen_layer = 0, 0, False
    for name, param in meta_model(spec).named_parameters():
        if not param.requires_grad:
            continue
        if ".layer.0." in f".{name}":
            seen_layer = True
            per_layer += param.numel()
        elif not seen_layer:
            before += param.numel()
    return before, per_layer


def trainable_params(spec: TraceSpec) -> tuple[int, int]:
    """(trainable parameters, elements of the largest one), counted on the meta device."""
    sizes = [p.numel() for p in meta_model(spec).parameters() if p.requires_grad]
    return sum(sizes), max(sizes, default=0)


def _line(a: int, b: int, steps: int) -> int:
    return a + steps * (b - a)


def _extrapolate_step(a: StepPeak, b: StepPeak, steps: int, layers: int, cached: int) -> StepPeak:
    """One phase's peak at full depth from its peaks at the two shallow depths."""
    module = b.peak_module
    last = layers - steps  # the deeper copy's last layer
    if f"layer.{last}." in module + ".":  # the last layer of the shallow copy is the model's last
        module = module.replace(f"layer.{last}", f"layer.{layers - 1}")
    peak = _line(a.peak_allocated_bytes, b.peak_allocated_bytes, steps)
    # The allocator's cache is not linear in depth: the cached-but-unused bytes of the deeper copy
    # (``cached``) are taken as they are. The segments it holds grow with the tensors in them.
    return StepPeak(peak, peak + cached,
                    {k: _line(a.breakdown[k], b.breakdown[k], steps) for k in a.breakdown},
                    b.peak_phase, module, b.peak_op, _line(a.flops, b.flops, steps),
                    _line(a.held_bytes, b.held_bytes, steps))


def extrapolate_rank(spec: TraceSpec, pair: ShallowPair, profile: GPU | None,
                     small: list[RankSteps]) -> RankSteps | None:
    """One rank's steps at full depth (as StepPeak) from the traces of ``pair``'s copies, or None
    when the peak does not sit at the same point of the step in both copies, or when a bounded
    pair's peak lies in backward (where its figures are only upper bounds)."""
    depth = pair.depth
    layers = spec.model_config.num_hidden_layers
    steps = layers - depth
    # Each candidate peak (an operation of a phase) is linear in depth; the step's peak is
    # the highest candidate at full depth, which need not be the highest in the shallow copies.
    shallow, deeper = small

    def extrapolate(a: StepTrace, b: StepTrace) -> StepPeak | None:
        common = a.candidates.keys() & b.candidates.keys()
        if b.top() not in common:
            return None
        key = max(common, key=lambda k: _line(a.candidates[k].bytes, b.candidates[k].bytes, steps))
        b_top = b.peak()
        cached = max(0, b_top.predicted_reserved_bytes - b_top.peak_allocated_bytes)
        return _extrapolate_step(a.peak(key), b.peak(key), steps, layers, cached)

    first, steady = extrapolate(shallow.first, deeper.first), extrapolate(shallow.steady, deeper.steady)
    if first is None or steady is None:
        return None
    if pair.bounded and Phase.BACKWARD in (first.peak_phase, steady.peak_phase):
        return None
    states = ModelStates(**{f.name: _line(getattr(shallow.model_states, f.name), getattr(deeper.model_states, f.name), steps)
                            for f in dataclasses.fields(ModelStates)})
    return RankSteps(first, steady, states, shallow.kernel)

