"""Every patch m3lab's predictor applies to torch, DeepSpeed and transformers internals, in one place.

Each patch is a named context manager that undoes itself, and each replaces an attribute that must
exist: ``check_targets()`` (run by the tests, on every supported version) raises ``CompatError``
naming what moved, so that an upgrade cannot make a patch silently stop applying.

Known limitation: the fake-tensor cache hooks still live beside their user (``m3lab.fake_cache_key``).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Callable


class CompatError(RuntimeError):
    """A patched third-party attribute is gone: the installed version is not one m3lab knows."""


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
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


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


# ---- torch ----------------------------------------------------------------------------------------
def gpu_attention_kernel(sdpa: Callable):
    """``F.scaled_dot_product_attention`` replaced by the kernel the GPU would pick (see m3lab.memory)."""
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


# ---- bitsandbytes ---------------------------------------------------------------------------------
def prebuilt_quantization_maps(maps: dict):
    """bitsandbytes builds its 8-bit maps from real numbers (``.tolist()``), which fake tensors do
    not have; hand it the maps built outside the trace instead."""
    return _patch("bitsandbytes.functional", "create_dynamic_map",
                  lambda signed=True, **kwargs: maps[signed].clone())


def check_targets() -> None:
    """Raise CompatError if any attribute these patches replace is missing from the installed versions."""
    from transformers import XLMRobertaConfig

    problems = []
    for module_name, attribute in [("transformers.modeling_utils",
                                    "PreTrainedModel.warn_if_padding_and_no_attention_mask"),
                                   ("torch.nn.functional", "scaled_dot_product_attention"),
                                   OPTIMIZER_PATH_CHOICE, ("deepspeed.comm.torch", "build_shm_op"),
                                   ("bitsandbytes.functional", "create_dynamic_map")]:
        try:
            _resolve(module_name, attribute)
        except CompatError as error:
            problems.append(str(error))
    try:
        with full_length_attention_masks(XLMRobertaConfig()):
            pass
    except CompatError as error:
        problems.append(str(error))
    if problems:
        raise CompatError("\n".join(problems))
