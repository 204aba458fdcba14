"""A DeepSpeed JSON file, read once: what it says for memory, or one sentence saying what is wrong.

``read`` is the one reader of a user's (or upstream's) DeepSpeed JSON: ``TrainConfig`` checks it
against the run, the command parser takes the run's DeepSpeed settings from it, and the predictor
traces it. Each section DeepSpeed validates with its own model is validated the same way, so a file
DeepSpeed would refuse at launch is refused here with the keys to change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from m3lab.errors import ConfigError

REDUCE_BUCKET_SIZE = 500_000_000  # DeepSpeed's default, for a JSON that leaves it out or says "auto"

# DeepSpeed optimizer types the predictor builds as DeepSpeed would (case-insensitive, as DeepSpeed reads them)
DEEPSPEED_OPTIMIZERS = ("adam", "adamw")


@dataclass(frozen=True)
class DeepSpeedJson:
    """A DeepSpeed JSON as the run uses it."""

    path: str  # as the command names it
    settings: dict  # the file's contents
    stage: int  # ZeRO stage: 0, 1 or 2
    offload_optimizer: bool  # ZeRO's optimizer in host memory
    torch_adam: bool  # the JSON's AdamW is torch's, not DeepSpeed's CUDA FusedAdam
    reduce_bucket_size: int  # elements
    names_optimizer: bool  # the JSON names its optimizer (HF then ignores --optim)


def _elements(value) -> int:
    """A bucket size as DeepSpeed reads it (5e8 is a float in JSON); "auto" and absent: its default."""
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return REDUCE_BUCKET_SIZE


def _load(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError([f"--deepspeed {path}: no such file; give the path of your DeepSpeed JSON."])
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError([f"{path}:{error.lineno}: not valid JSON ({error.msg}); fix the file."]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not a text file; --deepspeed takes a DeepSpeed JSON."]) from None
    if not isinstance(settings, dict):
        raise ConfigError([f"{path}: a DeepSpeed config is a JSON object ({{...}}), not {type(settings).__name__}."])
    return settings


def _modelled_problems(path: Path, settings: dict) -> list[str]:
    """What the file asks that m3lab's predictor does not model."""
    problems = []
    zero = settings.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage == 3:
        problems.append(f"{path}: ZeRO stage 3 is not modelled (m3lab predicts stages 0, 1 and 2); a one-GPU run "
                        "gains nothing from stage 3 over stage 2 with offload. Use stage 0, 1 or 2.")
    elif stage not in (0, 1, 2):
        problems.append(f"{path}: zero_optimization.stage is {stage!r}; DeepSpeed's stages are 0 to 3.")
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    if offload not in ("none", "cpu"):
        problems.append(f"{path}: offload_optimizer to {offload!r} is not modelled; use \"cpu\" or none.")
    if (zero.get("offload_param") or {}).get("device", "none") != "none":
        problems.append(f"{path}: offload_param is a ZeRO-3 feature and is not modelled; remove it.")
    optimizer = (settings.get("optimizer") or {}).get("type")
    if optimizer is not None and str(optimizer).lower() not in DEEPSPEED_OPTIMIZERS:
        problems.append(f"{path}: optimizer type {optimizer!r} is not modelled; m3lab traces DeepSpeed's Adam "
                        "and AdamW (FusedAdam, or torch's with \"torch_adam\": true).")
    return problems


def _deepspeed_problems(path: Path, settings: dict) -> list[str]:
    """The sections DeepSpeed validates with models that forbid unknown keys, validated as it does:
    a key it refuses stops every launch, whatever the precision (FlagEmbedding's master ships
    ds_stage1.json with fp16's loss-scale keys under "bf16"; FlagEmbedding issue #1487)."""
    from m3lab import compat

    problems = []
    for section, allowed in compat.deepspeed_strict_sections().items():
        value = settings.get(section)
        if not isinstance(value, dict):
            continue
        extra = sorted(set(value) - allowed)
        if extra:
            problems.append(f"{path}: DeepSpeed refuses {', '.join(repr(k) for k in extra)} under \"{section}\" "
                            f"(it accepts only {', '.join(sorted(allowed))}) and stops before the first step; "
                            f"delete {'them' if len(extra) > 1 else 'it'} from \"{section}\""
                            + (" (the loss-scale keys belong under \"fp16\")." if section == "bf16" else "."))
    return problems


def read(path: str | Path) -> DeepSpeedJson:
    """The DeepSpeed JSON at ``path``, or ConfigError naming every problem with it."""
    file = Path(path)
    settings = _load(file)
    problems = _deepspeed_problems(file, settings) + _modelled_problems(file, settings)
    if problems:
        raise ConfigError(problems)
    zero = settings.get("zero_optimization") or {}
    params = (settings.get("optimizer") or {}).get("params") or {}
    return DeepSpeedJson(
        path=str(path), settings=settings, stage=int(zero.get("stage", 0)),
        offload_optimizer=(zero.get("offload_optimizer") or {}).get("device", "none") == "cpu",
        torch_adam=bool(params.get("torch_adam", False)), reduce_bucket_size=_elements(zero.get("reduce_bucket_size")),
        names_optimizer="optimizer" in settings)
