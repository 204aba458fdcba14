"""DeepSpeed's FusedAdam (a JSON's AdamW without ``torch_adam``), modelled without CUDA.

Its CUDA kernel updates parameters and moments in place; the stand-in does the same with in-place
ops (m3lab.predict.optimizers.fused_adam_in_place). The check: torch's own fused AdamW
(``torch_adam: true, fused: true``), one kernel that also works in place, must show the same
optimizer-step memory but for the one step-count tensor per parameter that torch keeps and
FusedAdam does not (it counts steps in Python); torch's foreach AdamW (``torch_adam: true``) must
show its per-tensor temporaries.
"""

import json

import pytest
from helpers.hf_runs import hf_run

from m3lab import compat
from m3lab.gpus import gpu_profile
from m3lab.predict.allocator import allocator_round
from m3lab.predict.spec import spec_for
from m3lab.predict.step import simulate_rank


def _optimizer_phase(tmp_path, name, params):
    """(bytes alive as the steady step's optimizer phase starts, how far the phase rises above
    that, optimizer-state bytes, the phase's operations) for ZeRO-0 with this JSON's AdamW."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                "zero_optimization": {"stage": 0},
                                "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, **params}}}))
    spec = spec_for(hf_run(seq_len=64, batch_size=2, deepspeed_stage=0, deepspeed_config_file=str(path)))
    steps = simulate_rank(spec, gpu_profile("t4"), 0)
    phase = {op: value.bytes for (phase, op), value in steps.steady.candidates.items() if phase == "optimizer"}
    start = phase["(start)"]
    return start, max(phase.values()) - start, steps.model_states.optimizer_states, phase


def test_fused_adam_updates_in_place_like_torchs_fused_adamw(tmp_path):
    fused_start, fused_rise, fused_states, fused_ops = _optimizer_phase(tmp_path, "deepspeed", {})
    torch_start, torch_rise, torch_states, _ = _optimizer_phase(tmp_path, "torch-fused",
                                                                   {"torch_adam": True, "fused": True})
    _, foreach_rise, _, foreach_ops = _optimizer_phase(tmp_path, "torch-foreach", {"torch_adam": True})
    # the update itself allocates nothing in either: the phase rises by the same (gradient clipping's norms)
    assert fused_rise == torch_rise
    assert not any(op.startswith("_foreach") for op in fused_ops)
    # torch keeps one fp32 step count per parameter tensor; FusedAdam keeps none
    step_counts = torch_states - fused_states
    assert step_counts > 0 and step_counts % allocator_round(4) == 0
    assert 0 < torch_start - fused_start <= step_counts  # those step counts are what the start differs by
    # and the foreach AdamW that DeepSpeed's torch_adam gets on a GPU makes whole-tensor temporaries
    assert "_foreach_sqrt.default" in foreach_ops and foreach_rise > torch_rise


def test_the_kernel_stand_in_is_applied_through_compat(monkeypatch):
    """FusedAdam's own Python runs; only the CUDA build is replaced, and only inside the patch."""
    import deepspeed.ops.adam.fused_adam as fused_adam

    original = fused_adam.FusedAdamBuilder
    with compat.fused_adam_kernel(lambda *args: None):
        assert fused_adam.FusedAdamBuilder is not original
        assert callable(fused_adam.FusedAdamBuilder().load().multi_tensor_adam)
    assert fused_adam.FusedAdamBuilder is original
    monkeypatch.delattr(fused_adam, "FusedAdamBuilder")
    with pytest.raises(compat.CompatError, match="FusedAdamBuilder no longer exists"):
        with compat.fused_adam_kernel(lambda *args: None):
            pass
