"""Every reach of m3lab into torch, DeepSpeed, transformers, FlagEmbedding and bitsandbytes internals,
in one registry.

``TARGETS`` lists each attribute m3lab patches, overrides in a subclass, or reads: its module, its
name, how it is reached, and by which m3lab module. ``check_targets()`` (run by the tests on every
stack the lanes install) raises ``CompatError`` naming whatever moved, so that an upgrade cannot make
a patch, an override or a read silently stop applying. Each patch is a named context manager here
that undoes itself. The fake-tensor cache keys themselves are built in ``m3lab.predict.fake_cache_key``;
installing them in FakeTensorMode is a patch like the others (``fake_tensor_fast_dispatch``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import sys
import types
import warnings
from dataclasses import dataclass
from enum import Enum
from typing import Callable


class CompatError(RuntimeError):
    """A third-party attribute m3lab reaches is gone: the installed version is not one m3lab knows."""


class Reach(Enum):
    PATCHED = "replaced while a prediction runs"
    OVERRIDDEN = "overridden by m3lab (a subclass's method, or an instance's attribute)"
    READ = "read or called"
    ASSIGNED = "an attribute the class's own code assigns to its instances, read by m3lab"
    OPERATOR = "a private ATen operator called by name (torch.ops.aten.<name>)"


@dataclass(frozen=True)
class Target:
    module: str
    attribute: str  # "Class.name" or "name"
    reach: Reach
    user: str  # the m3lab module that reaches it


_FAKE = "torch._subclasses.fake_tensor"
_M3 = "FlagEmbedding.finetune.embedder.encoder_only.m3.modeling"
_ZERO = "deepspeed.runtime.zero.stage_1_and_2"
_PEFT = "peft.tuners.tuners_utils"
TARGETS: tuple[Target, ...] = (
    Target("transformers.modeling_utils", "PreTrainedModel.warn_if_padding_and_no_attention_mask", Reach.PATCHED,
           "compat"),
    Target("torch.nn.functional", "scaled_dot_product_attention", Reach.PATCHED, "predict.simulation"),
    Target("torch.optim.optimizer", "_default_to_fused_or_foreach", Reach.PATCHED, "predict.simulation"),
    Target("deepspeed.comm.torch", "build_shm_op", Reach.PATCHED, "predict.simulation"),
    Target("deepspeed.comm.comm", "cdb", Reach.PATCHED, "predict.simulation"),
    Target("transformers.integrations.deepspeed", "_hf_deepspeed_config_weak_ref", Reach.PATCHED, "predict.drivers"),
    Target("transformers.integrations.deepspeed", "HfTrainerDeepSpeedConfig", Reach.READ, "predict.drivers"),
    Target("deepspeed.ops.adam.fused_adam", "FusedAdamBuilder", Reach.PATCHED, "predict.simulation"),
    Target("deepspeed.ops.adam.cpu_adam", "CPUAdamBuilder", Reach.PATCHED, "predict.simulation"),
    Target("deepspeed.runtime.engine", "DeepSpeedEngine.allreduce_gradients", Reach.OVERRIDDEN, "predict.drivers"),
    Target("deepspeed.runtime.engine", "MEMORY_OPT_ALLREDUCE_SIZE", Reach.READ, "predict.drivers"),
    Target("deepspeed.runtime.precision_config", "DeepSpeedBF16Config", Reach.READ, "deepspeed_json"),
    Target("deepspeed.runtime.precision_config", "DeepSpeedFP16Config", Reach.READ, "deepspeed_json"),
    Target(_ZERO, "DeepSpeedZeroOptimizer.ipg_buckets", Reach.ASSIGNED, "predict.drivers"),
    Target(_ZERO, "DeepSpeedZeroOptimizer.averaged_gradients", Reach.ASSIGNED, "predict.drivers"),
    Target(_ZERO, "DeepSpeedZeroOptimizer.single_partition_of_fp32_groups", Reach.ASSIGNED, "train.meter"),
    Target("deepspeed.runtime.fp16.fused_optimizer", "FP16_Optimizer.fp32_groups_flat", Reach.ASSIGNED, "train.meter"),
    Target("deepspeed.runtime.fp16.unfused_optimizer", "FP16_UnfusedOptimizer.fp32_groups", Reach.ASSIGNED, "train.meter"),
    Target("bitsandbytes.functional", "create_dynamic_map", Reach.PATCHED, "predict.optimizers"),
    Target("bitsandbytes.optim", "GlobalOptimManager", Reach.PATCHED, "predict.step"),
    Target("torch.utils.flop_counter", "flop_registry", Reach.READ, "predict.trace"),
    Target("torch._C", "_current_autograd_node", Reach.READ, "predict.trace"),
    Target("torch._C", "_storage_Use_Count", Reach.READ, "predict.trace"),
    Target("torch._prims_common", "is_non_overlapping_and_dense_or_false", Reach.READ, "predict.trace"),
    Target("torch.utils._python_dispatch", "TorchDispatchMode._should_skip_dynamo", Reach.OVERRIDDEN, "predict.trace"),
    Target("torch.nn.modules.module", "Module.to", Reach.OVERRIDDEN, "predict.drivers"),
    *(Target(_FAKE, f"FakeTensorMode.{name}", Reach.PATCHED, "predict.fake_cache_key")
      for name in ("_prep_args_for_hash", "_cache_key", "_get_output_info_for_cache_entry",
                   "_get_output_tensor_from_cache_entry", "__torch_dispatch__")),
    Target("transformers.trainer", "Trainer._load_from_checkpoint", Reach.OVERRIDDEN, "train.runner"),
    Target(_M3, "EncoderOnlyEmbedderM3Model._sparse_embedding", Reach.OVERRIDDEN, "train.sparse_head"),
    Target(_M3, "EncoderOnlyEmbedderM3Model._encode", Reach.READ, "train.grad_cache"),
    Target(_M3, "EncoderOnlyEmbedderM3Model.encode", Reach.OVERRIDDEN, "train.grad_cache"),
    Target(_M3, "EncoderOnlyEmbedderM3Model.forward", Reach.OVERRIDDEN, "train.grad_cache"),
    Target("torch.nn.modules.module", "Module.to", Reach.PATCHED, "predict.models"),
    Target(_PEFT, "BaseTuner._cast_adapter_dtype", Reach.PATCHED, "predict.models"),
    # private modules and names read rather than patched: a rename would break an import or a key
    Target("torch._C", "StorageBase._cdata", Reach.READ, "tensors"),  # a storage's identity
    Target("torch.utils._python_dispatch", "TorchDispatchMode", Reach.READ, "tensors"),
    Target("torch.utils._pytree", "tree_flatten", Reach.READ, "tensors"),
    Target("torch.testing._internal.distributed.fake_pg", "FakeStore", Reach.READ, "predict.simulation"),
    Target("transformers.models.auto.modeling_auto", "AutoModel._model_mapping", Reach.READ, "predict.simulation"),
    Target(_FAKE, "_CacheKeyState", Reach.READ, "predict.fake_cache_key"),
    Target(_FAKE, "FakeTensor", Reach.READ, "predict.trace"),
    Target("torch._prims_common", "are_strides_like_channels_last_or_false", Reach.READ, "predict.fake_cache_key"),
    *(Target("torch.ops.aten", name, Reach.OPERATOR, user)
      for name, user in (("_scaled_dot_product_flash_attention", "predict.simulation"),
                         ("_scaled_dot_product_efficient_attention", "predict.simulation"),
                         ("_local_scalar_dense", "predict.trace"))),
)

# What a patch replaced, kept while it is in place (``unpatched``)
_ORIGINALS: dict[tuple[int, str], object] = {}


def _resolve(module_name: str, attribute: str):
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise CompatError(f"m3lab patches {module_name}.{attribute}, but {module_name} does not import "
                          f"({error}); install a version m3lab supports (see pyproject.toml).") from None
    owner, _, name = attribute.rpartition(".")
    obj = module
    for part in filter(None, owner.split(".")):
        obj = getattr(obj, part, None)
    if obj is None or name not in vars(obj):
        raise CompatError(f"{module_name}.{attribute} no longer exists in the installed version, so m3lab's "
                          "patch of it would not apply and predictions would be wrong; report it, or install "
                          "a version m3lab supports (see pyproject.toml).")
    return obj, name


@contextlib.contextmanager
def _replaced(obj, name: str, value):
    # vars(), not hasattr(): hasattr on transformers' lazy modules imports them (some need torchvision)
    if name not in vars(obj):
        raise CompatError(f"{getattr(obj, '__name__', obj)}.{name} no longer exists; m3lab's patch of it "
                          "would not apply. Install a version m3lab supports (see pyproject.toml).")
    old = vars(obj)[name]
    _ORIGINALS.setdefault((id(obj), name), old)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)
        if _ORIGINALS.get((id(obj), name)) is old:
            del _ORIGINALS[(id(obj), name)]


def original(module_name: str, attribute: str):
    """``module.attribute`` as the library defines it, even while a patch here replaces it;
    CompatError if it is gone."""
    obj, name = _resolve(module_name, attribute)
    return _ORIGINALS.get((id(obj), name), vars(obj)[name])


def _assigned(module_name: str, attribute: str) -> None:
    """That the class's own code still assigns ``self.<name>``, which m3lab reads from its instances."""
    import re

    class_name, _, name = attribute.rpartition(".")
    owner, key = _resolve(module_name, class_name)
    if not re.search(rf"self\.{name}\s*(:[^=\n]*)?=", inspect.getsource(vars(owner)[key])):
        raise CompatError(f"{module_name}.{class_name} no longer assigns self.{name}, which m3lab reads; its "
                          "figures would be mislabelled. Report it, or install a version m3lab supports "
                          "(see pyproject.toml).")


def _operator(name: str) -> None:
    """That ``torch.ops.aten.<name>`` still exists (ATen's operators are not module attributes)."""
    import torch

    if not hasattr(torch.ops.aten, name):
        raise CompatError(f"torch.ops.aten.{name} no longer exists in the installed torch, so m3lab's call of "
                          "it would fail; report it, or install a version m3lab supports (see pyproject.toml).")


def _patch(module_name: str, attribute: str, value):
    obj, name = _resolve(module_name, attribute)
    return _replaced(obj, name, value)


# ---- transformers -------------------------------------------------------------------------------
MASK_HELPER_4 = ("transformers.modeling_attn_mask_utils", "_prepare_4d_attention_mask_for_sdpa")
MASK_SKIP_5 = ("transformers.masking_utils", "_ignore_bidirectional_mask_sdpa")


def _modeling_module(model_config):
    from transformers import AutoModel

    return sys.modules[AutoModel._model_mapping[type(model_config)].__module__]


def _no_padding_mask(mask, dtype, tgt_len=None):
    return None


@contextlib.contextmanager
def full_length_attention_masks(model_config):
    """Every input is full length, so transformers drops the attention mask, as it does for real.

    Its own test reads the mask's data (``torch.all(mask == 1)``), which fake tensors do not have;
    and under fake tensors transformers 5 believes it is being traced and builds the full
    (batch, 1, L, L) mask instead (16 x 8,192 x 8,192 at 8,192 tokens), which a real run never does.
    transformers 4 builds the mask with ``_prepare_4d_attention_mask_for_sdpa`` imported into each
    modeling module; transformers 5 with ``masking_utils.create_bidirectional_mask``, which asks
    ``_ignore_bidirectional_mask_sdpa`` whether it may skip it.
    """
    module = _modeling_module(model_config)
    if "create_bidirectional_mask" in vars(module):
        with _patch(*MASK_SKIP_5, lambda *args, **kwargs: True):
            yield
    elif MASK_HELPER_4[1] in vars(module):
        with _replaced(module, MASK_HELPER_4[1], _no_padding_mask):
            yield
    else:
        raise CompatError(f"{module.__name__} builds its attention mask with neither transformers 4's "
                          f"{MASK_HELPER_4[1]} nor transformers 5's create_bidirectional_mask; m3lab cannot "
                          "predict it without materialising an (L x L) mask. Report it with your versions.")


def no_padding_warning():
    """transformers' check for padding without a mask reads token ids; there is no padding here."""
    return _patch("transformers.modeling_utils", "PreTrainedModel.warn_if_padding_and_no_attention_mask",
                  lambda *args, **kwargs: None)


@contextlib.contextmanager
def hf_deepspeed_config(config: dict):
    """HF's ``HfTrainerDeepSpeedConfig`` for ``config``, the object HF Trainer fills "auto" values
    with. Creating one registers it in a transformers module global (a weak reference that ZeRO-3
    checks consult); the one registered before, if any, is put back afterwards."""
    module = importlib.import_module("transformers.integrations.deepspeed")
    if "_hf_deepspeed_config_weak_ref" not in vars(module) or "HfTrainerDeepSpeedConfig" not in vars(module):
        raise CompatError("transformers.integrations.deepspeed no longer has HfTrainerDeepSpeedConfig and its "
                          "global reference; m3lab cannot fill DeepSpeed's \"auto\" values as HF does. Install "
                          "a transformers m3lab supports (see pyproject.toml).")
    saved = module._hf_deepspeed_config_weak_ref
    try:
        yield module.HfTrainerDeepSpeedConfig(config)
    finally:
        module._hf_deepspeed_config_weak_ref = saved


# ---- torch ----------------------------------------------------------------------------------------
def gpu_attention_kernel(sdpa: Callable):
    """``F.scaled_dot_product_attention`` replaced by the kernel the GPU would pick (see m3lab.predict.simulation)."""
    return _patch("torch.nn.functional", "scaled_dot_product_attention", sdpa)


OPTIMIZER_PATH_CHOICE = ("torch.optim.optimizer", "_default_to_fused_or_foreach")


@contextlib.contextmanager
def optimizer_paths(choose: Callable):
    """torch's optimizers pick foreach (multi-tensor) kernels for CUDA tensors and single-tensor ones
    on a CPU; ``choose`` picks as the GPU would. Each optimizer module imports the chooser by name,
    so every loaded copy is replaced."""
    _resolve(*OPTIMIZER_PATH_CHOICE)
    with contextlib.ExitStack() as stack:
        for name, module in list(sys.modules.items()):
            if name.startswith("torch.optim") and OPTIMIZER_PATH_CHOICE[1] in vars(module):
                stack.enter_context(_replaced(module, OPTIMIZER_PATH_CHOICE[1], choose))
        yield


# ---- DeepSpeed ------------------------------------------------------------------------------------
def no_shared_memory_comm():
    """DeepSpeed's CPU backend compiles and loads a shared-memory all-reduce op (and prints that it
    did) whenever it starts; the trace's process group is fake and never uses it."""
    return _patch("deepspeed.comm.torch", "build_shm_op", lambda: None)


@contextlib.contextmanager
def deepspeed_accelerator_as_gpu(device: str = "cpu"):
    """DeepSpeed's CPU accelerator, made to say what a CUDA card says: fp16 and bf16 supported (so
    DeepSpeed builds its half-precision optimizers), and its device named ``device`` (the trace's
    stand-in for the GPU when DeepSpeed offloads to plain "cpu"). Afterwards DeepSpeed's cached
    communication backend and process groups, module globals, are reset with the accelerator."""
    from deepspeed.accelerator import get_accelerator, set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    comm, _ = _resolve("deepspeed.comm.comm", "cdb")
    groups = importlib.import_module("deepspeed.utils.groups")
    accelerator = CPU_Accelerator()
    overrides = {"is_fp16_supported": lambda: True, "is_bf16_supported": lambda: True}
    if device != "cpu":
        overrides.update(current_device_name=lambda: device, device_name=lambda device_index=None: device)
    for name, value in overrides.items():
        if not callable(getattr(accelerator, name, None)):
            raise CompatError(f"DeepSpeed's CPU_Accelerator has no {name}(); m3lab's predictor cannot make it "
                              "stand in for a GPU. Install DeepSpeed 0.19.8 (see pyproject.toml).")
        setattr(accelerator, name, value)
    saved = get_accelerator()
    set_accelerator(accelerator)
    try:
        yield
    finally:
        comm.cdb = None
        importlib.reload(groups)  # DeepSpeed caches its process groups in module globals
        set_accelerator(saved)


def fused_adam_kernel(multi_tensor_adam: Callable):
    """DeepSpeed's FusedAdam with its CUDA kernel replaced by ``multi_tensor_adam`` (same
    arguments): FusedAdam's own Python (state creation, dtype grouping, step counts) runs as it is;
    only ``FusedAdamBuilder().load()``, which would compile the CUDA op, hands over the stand-in."""
    class KernelStandIn:
        def load(self, verbose=True):
            return types.SimpleNamespace(multi_tensor_adam=multi_tensor_adam)

    return _patch("deepspeed.ops.adam.fused_adam", "FusedAdamBuilder", KernelStandIn)


def cpu_adam_kernel():
    """DeepSpeed's CPU Adam (ZeRO offload without torch_adam) with its C++ kernel left out: the kernel
    updates the host's fp32 parameters and moments in place and allocates nothing, and run on fake
    tensors it would read memory that is not there (a segmentation fault, found tracing ZeRO-1 +
    offload with DeepSpeed's default AdamW). DeepSpeedCPUAdam's Python (its states) runs as it is."""
    def nothing(*args, **kwargs):
        return 0

    class KernelStandIn:
        def load(self, verbose=True):
            return types.SimpleNamespace(create_adam=nothing, adam_update=nothing, adam_rollback=nothing,
                                         destroy_adam=nothing)

    return _cpu_adam_stand_in(KernelStandIn)


@contextlib.contextmanager
def _cpu_adam_stand_in(builder):
    from deepspeed.utils.logging import logger

    # its warning about running the kernel on AMD CPUs is moot: the kernel does not run here
    def not_the_kernel_warning(record):
        return "CPUAdam may not work on AMD CPUs" not in record.getMessage()

    logger.addFilter(not_the_kernel_warning)
    try:
        with _patch("deepspeed.ops.adam.cpu_adam", "CPUAdamBuilder", builder):
            yield
    finally:
        logger.removeFilter(not_the_kernel_warning)


def allreduce_chunk(engine, elements: int) -> None:
    """Make ZeRO-0's gradient all-reduce use chunks of ``elements`` (the engine passes its module
    constant as a default argument; the predictor's shallow copies need a smaller one)."""
    # the default it replaces; the method itself is wrapped by DeepSpeed's NVTX decorator, which hides
    # its signature, so a renamed keyword would fail loudly (TypeError) at the first call
    _resolve("deepspeed.runtime.engine", "MEMORY_OPT_ALLREDUCE_SIZE")
    method = getattr(type(engine), "allreduce_gradients", None)
    if method is None:
        raise CompatError("DeepSpeedEngine.allreduce_gradients no longer exists; m3lab cannot shrink ZeRO-0's "
                          "all-reduce chunks for shallow copies. Install DeepSpeed 0.19.8.")
    engine.allreduce_gradients = functools.partial(method, engine, bucket_size=elements)


# ---- peft -----------------------------------------------------------------------------------------
def _moves_nothing(module, args, kwargs) -> bool:
    import torch

    device, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
    return all((device is None or t.device == device) and (dtype is None or t.dtype == dtype or not t.is_floating_point())
               for t in [*module.parameters(), *module.buffers()])


@contextlib.contextmanager
def lora_adapters_as_built():
    """peft's LoRA layers left as the predictor builds them, on fake tensors, where ``Module.to`` cannot
    swap a parameter. peft moves each new adapter to its base layer's device and dtype, which it is
    built on already (the same default device and dtype): such a ``.to`` moves nothing and returns the
    module. And peft casts a half-precision adapter to fp32, which a real run never meets: it wraps the
    fp32 model, and DeepSpeed's engine then casts the adapter to half with everything else, as the
    predictor's half default dtype already did."""
    module_to = original("torch.nn.modules.module", "Module.to")

    def to(self, *args, **kwargs):
        return self if _moves_nothing(self, args, kwargs) else module_to(self, *args, **kwargs)

    with _patch("torch.nn.modules.module", "Module.to", to), \
            _patch(_PEFT, "BaseTuner._cast_adapter_dtype", lambda self, *args, **kwargs: None):
        yield


# ---- bitsandbytes ---------------------------------------------------------------------------------
def prebuilt_quantization_maps(maps: dict):
    """bitsandbytes builds its 8-bit maps from real numbers (``.tolist()``), which fake tensors do
    not have; hand it the maps built outside the trace instead."""
    return _patch("bitsandbytes.functional", "create_dynamic_map",
                  lambda signed=True, **kwargs: maps[signed].clone())


@contextlib.contextmanager
def bitsandbytes_overrides_isolated():
    """bitsandbytes keeps HF's per-parameter overrides in a process-wide manager, keyed by parameter
    id and by (group, index): the trace starts from an empty one, and its entries do not outlive it."""
    obj, name = _resolve("bitsandbytes.optim", "GlobalOptimManager")
    manager = getattr(obj, name).get_instance()
    fields = ("module_weight_config_triple", "pid2config", "index2config")
    missing = [f for f in fields if not hasattr(manager, f)]
    if missing:
        raise CompatError(f"bitsandbytes' GlobalOptimManager has no {', '.join(missing)}; m3lab's 8-bit AdamW "
                          "trace cannot isolate it. Install a bitsandbytes m3lab supports (see pyproject.toml).")
    saved = {f: getattr(manager, f) for f in fields}
    for f, value in saved.items():
        setattr(manager, f, type(value)())
    try:
        yield
    finally:
        for f, value in saved.items():
            setattr(manager, f, value)


# ---- torch's fake tensors ----------------------------------------------------------------------
@contextlib.contextmanager
def fake_tensor_fast_dispatch(cache_key: Callable, cache_key_args: Callable, output_info: Callable | None,
                              output_tensor: Callable | None, keys_agree: bool, unguard: bool = True):
    """FakeTensorMode with m3lab's cache keys and view entries (``m3lab.predict.fake_cache_key``; only if
    ``keys_agree``, i.e. its keys match PyTorch's own on sample arguments; view entries only if
    given) and its
    ``__torch_dispatch__`` without the no-compile guard PyTorch wraps around it. Predictions are the
    same either way (tested); only the time differs, so keys that disagree fall back to PyTorch's
    with a warning."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    dispatch = vars(FakeTensorMode).get("__torch_dispatch__")
    with contextlib.ExitStack() as stack:
        if keys_agree:
            stack.enter_context(_replaced(FakeTensorMode, "_prep_args_for_hash", cache_key_args))
            stack.enter_context(_replaced(FakeTensorMode, "_cache_key", cache_key))
            # entries whose keys leave the placement out hold view offsets relative to the input's
            if output_info is not None and output_tensor is not None:
                stack.enter_context(_replaced(FakeTensorMode, "_get_output_info_for_cache_entry", output_info))
                stack.enter_context(_replaced(FakeTensorMode, "_get_output_tensor_from_cache_entry", output_tensor))
        else:
            warnings.warn("m3lab's fake-tensor cache keys differ from this PyTorch's; predictions stay right "
                          "but take longer. Report your torch version.", RuntimeWarning, stacklevel=3)
        unguarded = getattr(dispatch, "__wrapped__", None)
        if unguard and unguarded is not None:
            stack.enter_context(_replaced(FakeTensorMode, "__torch_dispatch__", unguarded))
        yield


# ---- torch: FLOP formulas -------------------------------------------------------------------------
FLOP_FORMULAS = ("torch.utils.flop_counter", "flop_registry")


def flop_formulas() -> dict:
    """PyTorch's own FLOP formulas (operator packet -> function of its inputs' shapes), the ones
    ``FlopCounterMode`` applies. Read, not patched: the trace mode counts with them directly, since
    ``FlopCounterMode``'s module tracker would add hooks to the traced step."""
    obj, name = _resolve(*FLOP_FORMULAS)
    return vars(obj)[name]


# ---- torch: autograd's in-place accumulation of gradients -------------------------------------
# Read, not patched. Autograd adds a parameter's second gradient (BGE-M3 encodes queries and passages
# apart, so every weight gets two) into the first in place when it holds the only reference to a plain
# dense tensor (torch/csrc/autograd/input_buffer.cpp: accumulate, can_accumulate_inplace), but out of
# place for tensor subclasses and under any TorchDispatchMode: a fake-tensor trace would hold one more
# gradient there than a GPU run does (0.95 GiB for the word embeddings; measured on the H200).
# (torch._C._current_autograd_node, torch._C._storage_Use_Count, is_non_overlapping_and_dense_or_false: TARGETS)


def autograd_adds_in_place(func, args, kwargs) -> bool:
    """Whether this ``aten.add`` is autograd adding a second gradient into a parameter's first, which a
    run with no dispatch mode does in place: the node running has an edge to the parameter's
    AccumulateGrad, both operands have its shape and dtype, and the first is dense and owns its
    storage alone (the count includes the Python storage object made to read it)."""
    import torch

    if func is not torch.ops.aten.add.Tensor or kwargs or len(args) != 2 or torch.is_grad_enabled():
        return False
    from torch._prims_common import is_non_overlapping_and_dense_or_false

    first, second = args
    if not (isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)):
        return False
    if first.shape != second.shape or first.dtype != second.dtype:
        return False
    node = torch._C._current_autograd_node()
    if node is None or not any(getattr(next_node, "variable", None) is not None
                               and next_node.variable.shape == first.shape and next_node.variable.dtype == first.dtype
                               for next_node, _ in node.next_functions if next_node is not None):
        return False
    return (is_non_overlapping_and_dense_or_false(first)
            and torch._C._storage_Use_Count(first.untyped_storage()._cdata) <= 2)


def deepspeed_strict_sections() -> dict[str, frozenset[str]]:
    """The DeepSpeed JSON sections DeepSpeed validates with a model that forbids unknown keys, and
    the keys each accepts (names and aliases)."""
    found = {}
    for section, name in (("bf16", "DeepSpeedBF16Config"), ("fp16", "DeepSpeedFP16Config")):
        obj, key = _resolve("deepspeed.runtime.precision_config", name)
        model = vars(obj)[key]
        if model.model_config.get("extra") == "forbid":
            found[section] = frozenset(n for n, f in model.model_fields.items() for n in (n, f.alias) if n)
    return found


def check_targets() -> None:
    """Raise CompatError naming every target in ``TARGETS`` missing from the installed versions."""
    from transformers import XLMRobertaConfig

    problems = []
    for target in TARGETS:
        try:
            if target.reach is Reach.ASSIGNED:
                _assigned(target.module, target.attribute)
            elif target.reach is Reach.OPERATOR:
                _operator(target.attribute)
            else:
                _resolve(target.module, target.attribute)
        except CompatError as error:
            problems.append(f"{error} (reached by m3lab.{target.user}: {target.reach.value})")
    try:  # the attention-mask patch picks its target by transformers' major version
        with full_length_attention_masks(XLMRobertaConfig()):
            pass
    except CompatError as error:
        problems.append(str(error))
    if problems:
        raise CompatError("\n".join(problems))
