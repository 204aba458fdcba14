"""GPU profiles for the predictor: usable memory, fixed overheads and the kernels each card runs.

``usable_bytes`` is the card's memory as ``torch.cuda.get_device_properties(i).total_memory``
reports it: the T4's 14.74 GiB was checked (../shared/FINDINGS.md); the others are approximate
figures of the "total capacity" that PyTorch's OOM messages print for those cards, not checked
here. ``context_bytes`` (CUDA context, cuBLAS/cuDNN workspaces and the kernels' images, which
``max_memory_allocated`` does not count) is an estimate for every card, labelled as one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GIB = 2**30
# A verdict with less than this to spare is a close call: the CUDA context (``context_bytes``) is an
# estimate, and a real allocator's blocks can land differently from the simulation's.
CLOSE_CALL_BYTES = GIB // 2


@dataclass(frozen=True)
class GPU:
    key: str
    name: str
    usable_bytes: int
    context_bytes: int  # estimate: CUDA context + library workspaces, outside the caching allocator
    compute_capability: tuple[int, int]
    count: int = 1  # how many of them the platform gives (Kaggle: 2 x T4)
    # The datasheet's peak throughput (FLOP/s), half precision on tensor cores and fp32; only where
    # a source is named (m3lab.predict.steptime uses them for step-time estimates)
    peak_flops_half: float | None = None
    peak_flops_fp32: float | None = None
    card: str = ""  # one card's own name where ``name`` adds the platform and the count ("Tesla T4")

    @property
    def card_name(self) -> str:
        """One card's name, without the platform or the count."""
        return self.card or self.name

    @property
    def allocator_limit_bytes(self) -> int:
        """What PyTorch's caching allocator can obtain: the card less what lies outside it."""
        return self.usable_bytes - self.context_bytes

    @property
    def supports_bf16(self) -> bool:
        return self.compute_capability >= (8, 0)

    @property
    def has_flash_attention(self) -> bool:
        # PyTorch's SDPA flash kernel needs sm80+; older cards use the memory-efficient kernel.
        return self.compute_capability >= (8, 0)

    def sdpa_kernel(self, dtype_is_half: bool) -> str:
        """The SDPA backend PyTorch picks on this card for training (no flash on sm75/sm70)."""
        return "flash" if self.has_flash_attention and dtype_is_half else "efficient"


def _gib(x: float) -> int:
    return int(round(x * GIB))


PROFILES: dict[str, GPU] = {g.key: g for g in [
    # T4 throughput: NVIDIA T4 Tensor Core GPU datasheet: 65 TFLOPS mixed precision (FP16/FP32),
    # 8.1 TFLOPS single precision
    GPU("t4", "Tesla T4 (Colab)", _gib(14.74), _gib(0.40), (7, 5), peak_flops_half=65e12, peak_flops_fp32=8.1e12,
        card="Tesla T4"),
    GPU("t4x2", "2 x Tesla T4 (Kaggle)", _gib(14.74), _gib(0.40), (7, 5), count=2, peak_flops_half=65e12,
        peak_flops_fp32=8.1e12, card="Tesla T4"),
    # L4 and A100 peaks: NVIDIA's datasheets, dense (the half-precision figures without sparsity)
    GPU("l4", "NVIDIA L4 24 GB", _gib(22.17), _gib(0.45), (8, 9), peak_flops_half=121e12, peak_flops_fp32=30.3e12),
    GPU("a10g", "NVIDIA A10G 24 GB", _gib(22.19), _gib(0.45), (8, 6)),
    GPU("v100", "Tesla V100 16 GB", _gib(15.77), _gib(0.40), (7, 0)),
    GPU("a100-40", "NVIDIA A100 40 GB", _gib(39.39), _gib(0.50), (8, 0), peak_flops_half=312e12, peak_flops_fp32=19.5e12),
    GPU("a100-80", "NVIDIA A100 80 GB", _gib(79.15), _gib(0.50), (8, 0), peak_flops_half=312e12, peak_flops_fp32=19.5e12),
    GPU("h100", "NVIDIA H100 80 GB", _gib(79.11), _gib(0.55), (9, 0)),
]}
ALIASES = {"a100": "a100-40", "kaggle": "t4x2", "colab": "t4", "a10": "a10g", "h100-80": "h100"}


# What CUDA calls each card (``torch.cuda.get_device_name``: "Tesla T4", "NVIDIA A100-SXM4-80GB"):
# the model's word, and a second word where the model comes in two sizes
_DEVICE_WORDS = ((("A100", "80GB"), "a100-80"), (("A100",), "a100-40"), (("H100",), "h100"),
                 (("A10G",), "a10g"), (("V100",), "v100"), (("L4",), "l4"), (("T4",), "t4"))


def identify(device_name: str | None) -> GPU | None:
    """The profile of the card CUDA names ``device_name``; None for a card m3lab has no profile of."""
    words = set(re.split(r"[\s\-]+", (device_name or "").upper()))
    return next((PROFILES[key] for needed, key in _DEVICE_WORDS if set(needed) <= words), None)


def is_t4(device_name: str | None) -> bool:
    """Whether CUDA's ``device_name`` is a Tesla T4 (one card of Colab's or of Kaggle's pair)."""
    found = identify(device_name)
    return found is not None and found.key == "t4"


def gpu_profile(name: str) -> GPU:
    key = name.lower().replace("_", "-").replace(" ", "")
    key = ALIASES.get(key, key)
    if key not in PROFILES:
        from m3lab.errors import ConfigError

        raise ConfigError([f"--gpu {name}: unknown GPU; choose one of {', '.join(PROFILES)}."])
    return PROFILES[key]
