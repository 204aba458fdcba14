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
from m3lab.gpus import GPU
from m3lab.measure import tensor_storages
from m3lab.predict.drivers import DeepSpeedDriver, PlainDriver, grad_tensors
from m3lab.predict.allocator import OutOfMemory
from m3lab.predict.models import build_hf_model, build_m3_model, hf_inputs, m3_inputs
from m3lab.predict.optimizers import bnb_quantization_maps
from m3lab.predict.report import StepPeak
from m3lab.predict.simulation import GPU_DEVICE, default_device, import_lazy_modules, simulation
from m3lab.predict.spec import TraceSpec
from m3lab.predict.trace import Candidate, Category, MemoryTrace, Phase, TracedFakeTensorMode, breakdown_at


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
    model_states: dict[str, int] = field(default_factory=dict)
    kernel: str = ""
    trace: MemoryTrace | None = None  # kept only in this process (it cannot be pickled)
    out_of_memory: OutOfMemory | None = None  # the first request the card could not hold

    def peaks(self) -> "RankSteps":
        """The same steps with StepTrace reduced to its peak."""
        def peak(step):
            return step.peak() if isinstance(step, StepTrace) else step
        return RankSteps(peak(self.first), peak(self.steady), self.model_states, self.kernel, self.trace,
                         self.out_of_memory)


HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


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



def simulate_rank(spec: TraceSpec, gpu: GPU | None, rank: int, record_events: bool = False,
                  limited: bool = True, first_update_skipped: bool = False):
    """Two training steps of one rank on fake tensors, the allocator limited to the card's memory
    (``limited=False``: not limited, as for shallow copies, whose figures are extrapolated).
    ``first_update_skipped``: DeepSpeed's fp16 loss scaling finds an overflow in the first step and
    skips its update, as it does on the first steps of many runs (its scale starts at 2**16)."""
    from m3lab.measure import fp32_master_tensors, optimizer_state_tensors

    half = spec.precision in ("fp16", "bf16")
    kernel = gpu.sdpa_kernel(half) if gpu is not None else "cpu"
    import_lazy_modules(spec.model_config)
    if spec.optim == "adamw_bnb_8bit":
        bnb_quantization_maps()
    offload = spec.offloads
    trace = MemoryTrace(rounding=gpu is not None, record_events=record_events,
                        limit_bytes=gpu.allocator_limit_bytes if gpu is not None and limited else None,
                        separate_host=offload)
    device = GPU_DEVICE if offload else "cpu"
    steps: list[StepTrace] = []
    out_of_memory = None
    bnb = compat.bitsandbytes_overrides_isolated() if spec.optim == "adamw_bnb_8bit" else contextlib.nullcontext()
    with simulation(gpu, kernel, rank, spec.num_gpus, spec.model_config, device), bnb, \
            TracedFakeTensorMode(trace, allow_non_fake_inputs=True), default_device(device):
        # The runner loads the model in host memory; DeepSpeed's engine casts it to fp16/bf16 there
        # and HF Trainer or the engine then moves it to the GPU, tensor by tensor
        with trace.unrecorded(), default_dtype(HALF.get(spec.precision) if spec.deepspeed is not None else None):
            model = build_m3_model(spec) if spec.trainer == "flagembedding-m3" else build_hf_model(spec)
        trace.relabel(moved_to_the_gpu(model), Category.WEIGHTS)
        trace.relabel(list(model.buffers()), Category.OTHER)
        inputs = m3_inputs(spec) if spec.trainer == "flagembedding-m3" else hf_inputs(spec)
        driver = (DeepSpeedDriver if spec.deepspeed is not None else PlainDriver)(model, spec)
        trace.relabel(list(model.parameters()), Category.WEIGHTS)

        def label_states():
            states = optimizer_state_tensors(driver.optimizer) + fp32_master_tensors(driver.optimizer)
            trace.relabel(states, Category.OPTIMIZER_STATES)

        label_states()
        trace.relabel(tree_flatten(inputs)[0], Category.OTHER)
        handles = module_hooks(model, trace)

        def label_gradient(param):
            # A gradient is labelled the moment autograd stores it; DeepSpeed's gradient bucket,
            # created at the first gradient and gone by the step, is labelled as soon as it exists.
            trace.relabel([param.grad] if param.grad is not None else [], Category.GRADIENTS)
            trace.relabel(driver.buffers(), Category.OTHER)

        for param in model.parameters():
            if param.requires_grad:
                handles.append(param.register_post_accumulate_grad_hook(label_gradient))
        try:
            for step in (1, 2):
                trace.reset_peak()
                trace.overflowing = first_update_skipped and step == 1
                trace.flops = 0
                for _ in range(spec.gradient_accumulation_steps):
                    trace.enter(Phase.FORWARD)
                    loss = driver.loss(inputs)
                    trace.module = ""
                    trace.enter(Phase.BACKWARD)
                    driver.backward(loss)
                    del loss
                    trace.relabel(grad_tensors(driver.optimizer, model), Category.GRADIENTS)
                trace.enter(Phase.OPTIMIZER)
                driver.step()
                label_states()
                allocator = trace.allocator
                if allocator is not None:
                    if allocator.out_of_memory is not None and out_of_memory is None:
                        out_of_memory = dataclasses.replace(allocator.out_of_memory, step=len(steps) + 1)
                reserved, held = (allocator.peak_reserved, allocator.peak_held) if allocator else (trace.peak,) * 2
                steps.append(StepTrace(dict(trace.candidates), list(trace.history), reserved, held, trace.flops))
                trace.phase = Phase.BETWEEN_STEPS
        finally:
            for handle in handles:
                handle.remove()
        model_states = {"weights": sum(e.nbytes for e in trace.live.values() if e.category is Category.WEIGHTS),
                        "optimizer_states": sum(e.nbytes for e in trace.live.values()
                                                if e.category is Category.OPTIMIZER_STATES),
                        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                        "params": sum(p.numel() for p in model.parameters()),
                        # offloaded: fp32 masters and Adam states in host memory, and the host's peak
                        "offloaded_optimizer_states": sum(
                            storage.nbytes() for storage in {s._cdata: s for s in tensor_storages(
                                optimizer_state_tensors(driver.optimizer) + fp32_master_tensors(driver.optimizer))
                            }.values() if storage._cdata in trace.host_live),
                        "host_peak_bytes": trace.host_peak}
    return RankSteps(steps[0], steps[1], model_states, kernel, trace, out_of_memory)
