"""Two training steps of one rank, traced: the model built, the driver's forward, backward and step.

``simulate_rank`` runs them under the simulation (fake process group, GPU kernels) and the trace
mode, labels what it sees (weights, gradients, optimizer states) and returns a ``RankSteps``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch
from torch.utils._pytree import tree_flatten

from m3lab import compat
from m3lab.config import Trainer
from m3lab.gpus import GPU
from m3lab.predict.allocator import OutOfMemory
from m3lab.predict.drivers import HALF, DeepSpeedDriver, PlainDriver, grad_tensors
from m3lab.predict.models import build_hf_model, build_m3_model, hf_inputs, m3_inputs
from m3lab.predict.optimizers import bnb_quantization_maps
from m3lab.predict.report import ModelStates, StepPeak
from m3lab.predict.simulation import (
    GPU_DEVICE,
    default_device,
    import_lazy_modules,
    simulation,
)
from m3lab.predict.spec import TraceSpec
from m3lab.predict.trace import (
    Candidate,
    Category,
    MemoryTrace,
    Phase,
    TracedFakeTensorMode,
    breakdown_at,
)
from m3lab.tensors import tensor_storages


@dataclass
class StepTrace:
    """What one traced step leaves: its peak candidates and the storages it saw."""

    candidates: dict[tuple[str, str], Candidate]  # (phase, operation) -> its highest point
    history: list
    reserved: int  # the allocator's peak reserved bytes in this step
    held: int  # its peak of segments holding tensors (Allocator.peak_held): what the step needs
    flops: int = 0

    def top(self) -> tuple[str, str]:
        return max(self.candidates, key=lambda key: self.candidates[key].bytes)

    def peak(self, key=None) -> StepPeak:
        high = self.candidates[key or self.top()]
        return StepPeak(high.bytes, self.reserved, breakdown_at(self.history, high.clock), high.phase, high.module,
                        high.op, self.flops, self.held)


@dataclass
class RankSteps:
    """One rank's two steps: traced (StepTrace) or, after extrapolation, their peaks (StepPeak)."""

    first: StepTrace | StepPeak
    steady: StepTrace | StepPeak
    model_states: ModelStates = field(default_factory=ModelStates)
    kernel: str = ""
    trace: MemoryTrace | None = None  # kept only in this process (it cannot be pickled)
    out_of_memory: OutOfMemory | None = None  # the first request the card could not hold

    def peaks(self) -> "RankSteps":
        """The same steps with StepTrace reduced to its peak."""
        def peak(step):
            return step.peak() if isinstance(step, StepTrace) else step
        return RankSteps(peak(self.first), peak(self.steady), self.model_states, self.kernel, self.trace,
                         self.out_of_memory)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype | None):
    """The model built in ``dtype``, as DeepSpeed's engine casts it (fp16/bf16) before the GPU sees it."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype or saved)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def moved_to_the_gpu(module) -> list[torch.Tensor]:
    """The module's tensors in the order ``Module.to(device)`` copies them (``Module._apply``: each
    module's children first, then its own parameters, then its buffers)."""
    tensors = [t for child in module.children() for t in moved_to_the_gpu(child)]
    return tensors + [p for _, p in module.named_parameters(recurse=False)] + list(module.buffers(recurse=False))


def module_hooks(model, trace: MemoryTrace):
    """Forward hooks that tell the trace which module is running (for 'where the peak happens')."""
    handles, stack = [], []

    def pre(name):
        def hook(module, args):
            stack.append(name)
            trace.module = name
        return hook

    def post(module, args, output):
        if stack:
            stack.pop()
        trace.module = stack[-1] if stack else ""

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(pre(name)))
            handles.append(module.register_forward_hook(post))
    return handles



def _model_on_the_gpu(spec: TraceSpec, trace: MemoryTrace):
    """The model and its inputs, placed as a real run places them. The runner loads the model in host
    memory; DeepSpeed's engine casts it to fp16/bf16 there; HF Trainer or the engine then moves it to
    the GPU, tensor by tensor."""
    with trace.unrecorded(), default_dtype(HALF.get(spec.precision) if spec.deepspeed is not None else None):
        model = build_m3_model(spec) if spec.trainer is Trainer.FLAGEMBEDDING_M3 else build_hf_model(spec)
    trace.relabel(moved_to_the_gpu(model), Category.WEIGHTS)
    trace.relabel(list(model.buffers()), Category.OTHER)
    return model, m3_inputs(spec) if spec.trainer is Trainer.FLAGEMBEDDING_M3 else hf_inputs(spec)


class _Labels:
    """Tells the trace what the driver's tensors are: optimizer states after each step, gradients
    the moment autograd stores them, DeepSpeed's gradient bucket as soon as it exists."""

    def __init__(self, trace: MemoryTrace, driver, model):
        self.trace, self.driver, self.model = trace, driver, model
        self.handles = module_hooks(model, trace)
        for param in model.parameters():
            if param.requires_grad:
                self.handles.append(param.register_post_accumulate_grad_hook(self.gradient))

    def states(self) -> None:
        from m3lab.tensors import fp32_master_tensors, optimizer_state_tensors

        optimizer = self.driver.optimizer
        self.trace.relabel(optimizer_state_tensors(optimizer) + fp32_master_tensors(optimizer),
                           Category.OPTIMIZER_STATES)

    def gradient(self, param) -> None:
        self.trace.relabel([param.grad] if param.grad is not None else [], Category.GRADIENTS)
        self.trace.relabel(self.driver.buffers(), Category.OTHER)

    def gradients(self) -> None:
        self.trace.relabel(grad_tensors(self.driver.optimizer, self.model), Category.GRADIENTS)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _step(trace: MemoryTrace, driver, labels: _Labels, inputs, spec: TraceSpec) -> StepTrace:
    """One optimizer step (all its micro-batches), traced."""
    trace.reset_peak()
    trace.flops = 0
    for _ in range(spec.gradient_accumulation_steps):
        trace.enter(Phase.FORWARD)
        loss = driver.loss(inputs)
        trace.module = ""
        trace.enter(Phase.BACKWARD)
        driver.backward(loss)
        del loss
        labels.gradients()
    trace.enter(Phase.OPTIMIZER)
    driver.step()
    labels.states()
    allocator = trace.allocator
    reserved, held = (allocator.peak_reserved, allocator.peak_held) if allocator else (trace.peak,) * 2
    return StepTrace(dict(trace.candidates), list(trace.history), reserved, held, trace.flops)


def _model_states(trace: MemoryTrace, model, driver) -> ModelStates:
    """What the model holds after its steps: weights and optimizer states (on the GPU, and what an
    offloaded optimizer holds in host memory), and its parameters."""
    from m3lab.tensors import fp32_master_tensors, optimizer_state_tensors

    states = optimizer_state_tensors(driver.optimizer) + fp32_master_tensors(driver.optimizer)
    return ModelStates(
        weights=sum(e.nbytes for e in trace.live.values() if e.category is Category.WEIGHTS),
        optimizer_states=sum(e.nbytes for e in trace.live.values() if e.category is Category.OPTIMIZER_STATES),
        offloaded_optimizer_states=sum(storage.nbytes() for storage in {s._cdata: s for s in tensor_storages(states)}.values()
                                       if storage._cdata in trace.host_live),
        host_peak_bytes=trace.host_peak,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        params=sum(p.numel() for p in model.parameters()))


def simulate_rank(spec: TraceSpec, gpu: GPU | None, rank: int, record_events: bool = False,
                  limited: bool = True, first_update_skipped: bool = False) -> RankSteps:
    """Two training steps of one rank on fake tensors, the allocator limited to the card's memory
    (``limited=False``: not limited, as for shallow copies, whose figures are extrapolated).
    ``first_update_skipped``: DeepSpeed's fp16 loss scaling finds an overflow in the first step and
    skips its update, as it does on the first steps of many runs (its scale starts at 2**16)."""
    kernel = gpu.sdpa_kernel(spec.precision in HALF) if gpu is not None else "cpu"
    import_lazy_modules(spec.model_config)
    if spec.optim == "adamw_bnb_8bit":
        bnb_quantization_maps()
    trace = MemoryTrace(rounding=gpu is not None, record_events=record_events,
                        limit_bytes=gpu.allocator_limit_bytes if gpu is not None and limited else None,
                        separate_host=spec.offloads)
    device = GPU_DEVICE if spec.offloads else "cpu"
    bnb = compat.bitsandbytes_overrides_isolated() if spec.optim == "adamw_bnb_8bit" else contextlib.nullcontext()
    with simulation(gpu, kernel, rank, spec.num_gpus, spec.model_config, device), bnb, \
            TracedFakeTensorMode(trace, allow_non_fake_inputs=True), default_device(device):
        model, inputs = _model_on_the_gpu(spec, trace)
        driver = (DeepSpeedDriver if spec.deepspeed is not None else PlainDriver)(model, spec)
        trace.relabel(list(model.parameters()), Category.WEIGHTS)
        labels = _Labels(trace, driver, model)
        labels.states()
        trace.relabel(tree_flatten(inputs)[0], Category.OTHER)
        steps, out_of_memory = [], None
        try:
            for step in (1, 2):
                trace.overflowing = first_update_skipped and step == 1
                steps.append(_step(trace, driver, labels, inputs, spec))
                trace.phase = Phase.BETWEEN_STEPS
                found = trace.allocator.out_of_memory if trace.allocator is not None else None
                if found is not None and out_of_memory is None:
                    out_of_memory = dataclasses.replace(found, step=step)
        finally:
            labels.remove()
        return RankSteps(steps[0], steps[1], _model_states(trace, model, driver), kernel, trace, out_of_memory)
