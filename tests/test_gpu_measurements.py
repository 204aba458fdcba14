"""The predictor against GPU measurements committed under data/measurements/ (written by
``python -m m3lab.evidence.gpu_check`` on a GPU), and the check script itself, run here on the CPU."""

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch

from m3lab import predict as predictor
from m3lab import standin
from m3lab.config import TrainConfig
from m3lab.evidence import compare, gpu_check, measurements
from m3lab.predict.models import meta_model
from m3lab.predict.spec import spec_for
from m3lab.train.meter import SDPA_KERNEL_ENV, limit_sdpa_kernels
from m3lab.train.record import Outcome, StepRecord

MEASUREMENTS = Path(__file__).resolve().parent.parent / "data" / "measurements"


def _committed_runs():
    for path in sorted(MEASUREMENTS.glob("*.json")):
        file = measurements.load(path)
        for run in file.runs:
            if run.outcome is not Outcome.RAN:
                continue
            marks = ()
            if not any(measurements.step_pairs(rank.steps) for rank in run.ranks):
                # kept as measured: the H200's first HF fp16 AMP run skipped every update (re-run with more steps)
                marks = pytest.mark.skip(reason="fp16 loss scaling skipped every step's update: no step to compare")
            yield pytest.param(file, run, id=f"{path.stem}: {run.name}", marks=marks)


COMMITTED = list(_committed_runs()) or [pytest.param(None, None, marks=pytest.mark.skip(
    reason="no measurements committed yet: `python -m m3lab.evidence.gpu_check` on a GPU, or `--model full-cpu` on a "
           "CPU (data/measurements/README.md)"))]


@pytest.mark.parametrize("file,run", COMMITTED)
def test_prediction_within_tolerance_of_measurement(file, run):
    """5% of a GPU's max_memory_allocated; 2% of a CPU run's live tensor bytes."""
    rows = measurements.compare(file, [run])
    assert len(rows) == 2 * len(run.ranks)
    failures = [row.describe() for row in rows if not row.within_tolerance]
    assert not failures, f"{file.provenance}, torch {file.torch}:\n" + "\n".join(failures)


@pytest.mark.slow
def test_the_check_script_runs_and_compares_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("M3LAB_GPU_CHECK_WORK", str(tmp_path / "work"))
    name = "tiny: ZeRO-1 + gradient checkpointing"
    assert gpu_check.main(["--model", "tiny", "--out", str(tmp_path / "out"), "--only", name, "--no-predict"]) == 0
    path = tmp_path / "out" / "gpu_check.json"
    file = measurements.load(path)
    assert str(file.provenance) == "measured on CPU (live tensor bytes)" and file.predict_with_gpu is None
    (run,) = file.runs
    assert run.outcome is Outcome.RAN and run.config.max_steps == gpu_check.STEPS
    assert [s.step for s in run.ranks[0].steps] == [1, 2, 3]
    assert [s.optimizer_step_skipped for s in run.ranks[0].steps] == [False] * 3  # fp32: no scaling
    rows = measurements.compare(file)
    assert [(r.step, r.measured_step) for r in rows] == [("first", 1), ("steady", 2)]
    # the ZeRO-1 step holds optimizer states from its first update on: the steady step is higher
    assert rows[1].measured_bytes > rows[0].measured_bytes
    assert all(row.within_tolerance for row in rows), [row.describe() for row in rows]
    # and the comparison can fail: a measurement 5% higher is outside the CPU's 2%
    report = json.loads(path.read_text())
    for step in report["runs"][0]["ranks"][0]["steps"]:
        step["peak_allocated_bytes"] = int(step["peak_allocated_bytes"] * 1.05)
    path.write_text(json.dumps(report))
    assert not any(row.within_tolerance for row in measurements.compare(measurements.load(path)))


def test_a_refused_configuration_is_recorded_and_costs_no_other_run(tmp_path, standin_dir):
    import time

    bad = gpu_check.Check("bad", gpu_check.checks("tiny")[0].config.replace(train_group_size=0))
    record = gpu_check._run_one(bad, tmp_path / "data.jsonl", standin_dir, tmp_path / "runs",
                                time.monotonic() + 600, "tiny-bge-m3", alone=False)
    assert record["status"] == "failed" and record["reason"].startswith("ConfigError")
    assert "train_group_size is 0" in record["reason"]


def _steps(*steps: dict) -> tuple:
    return tuple(StepRecord(**{"loss": None, "step_time_s": 0.0, "peak_allocated_bytes": 0, "peak_reserved_bytes": None,
                               "allocated_after_step_bytes": 0, "fp32_master_bytes": 0, "memory_source": "",
                               **step}) for step in steps)


def test_a_step_skipped_by_loss_scaling_is_not_compared():
    def pairs(steps):
        return [(label, step.step) for label, step in measurements.step_pairs(steps)]

    # told by the trainer: DeepSpeed holds its Adam states from the start, so only the flag shows it
    told = _steps(*({"step": n, "optimizer_state_bytes": 8, "optimizer_step_skipped": n == 2} for n in (1, 2, 3)))
    assert pairs(told) == [("first", 1), ("steady", 3)]
    # not told (an older file): no optimizer states yet means no update yet
    untold = _steps({"step": 1, "optimizer_state_bytes": 0}, {"step": 2, "optimizer_state_bytes": 8},
                    {"step": 3, "optimizer_state_bytes": 8})
    assert pairs(untold) == [("first", 2), ("steady", 3)]
    # fix_encoder with nothing trainable in the optimizer's eyes: every step counts
    frozen = _steps(*({"step": n, "optimizer_state_bytes": 0} for n in (1, 2, 3)))
    assert pairs(frozen) == [("first", 1), ("steady", 2)]


def test_memory_outside_the_allocator_is_read_only_from_a_run_alone_on_the_card():
    step = {"step": 2, "optimizer_state_bytes": 0, "device_used_bytes": 10 * 2**30,
            "reserved_after_step_bytes": 9 * 2**30 + 2**29}
    run = measurements.RunRecord("r", Outcome.RAN, TrainConfig(), None, True, None,
                                 (measurements.MeasuredRank(0, "cuda", _steps({"step": 1, "optimizer_state_bytes": 0},
                                                                              step)),))
    assert measurements.outside_allocator_bytes(run) == 2**29
    assert measurements.outside_allocator_bytes(dataclasses.replace(run, alone=False)) is None
    cpu = dataclasses.replace(run, ranks=(measurements.MeasuredRank(0, "cpu", _steps({"step": 1,
                                                                                       "optimizer_state_bytes": 0})),))
    assert measurements.outside_allocator_bytes(cpu) is None


def test_every_files_provenance_reads_back_as_the_check_writes_it():
    for path in sorted(MEASUREMENTS.glob("*.json")):
        text = json.loads(path.read_text())["provenance"]
        read = measurements.Provenance.parse(text)
        assert str(read) == text and read.headline.startswith("measured on ")
    h200 = measurements.Provenance.of_device("NVIDIA H200", imitating_t4=True)
    assert str(h200) == ("measured on NVIDIA H200 imitating a T4's kernels (memory-efficient SDPA, "
                         "T4 cuBLAS workspace)")
    assert str(measurements.Provenance.of_device("Tesla T4", imitating_t4=False)) == "measured on Tesla T4"


def test_a_broken_measurement_file_says_where_and_what(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": 1,\n "device": }')
    with pytest.raises(ValueError, match=r"bad.json, line 2: not valid JSON"):
        measurements.load(bad)
    bad.write_text(json.dumps({"format": 1, "device": "x", "runs": []}))
    with pytest.raises(ValueError, match=r"bad.json: missing torch, date, provenance"):
        measurements.load(bad)


@pytest.mark.slow
def test_the_lora_check_is_the_lora_answer_for_free_colab():
    from m3lab.plan import recipes
    from m3lab.predict.spec import spec_for

    answer = recipes.answer_for("colab-t4", stock=False, lora=True)

    def as_traced(config):  # what changes memory; the step counts only set the scheduler
        return dataclasses.replace(spec_for(config), training_steps=0, warmup_steps=0)

    assert as_traced(gpu_check.LORA_ANSWER) == as_traced(answer.config)


def test_the_full_size_checks_are_the_issue_s_configurations():
    checks = {c.name: c for c in gpu_check.checks("full")}
    assert checks["advice (ZeRO-1)"].config == checks["advice (ZeRO-1), T4 budget"].config
    assert checks["advice, fix_encoder on"].config.fix_encoder
    example = checks["example at passage 8192"]
    assert example.alone and example.config.passage_max_len == 8192 and example.config.deepspeed_stage == 0


def test_sdpa_kernel_limit_leaves_the_kernels_a_t4_has(monkeypatch):
    before = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled())
    monkeypatch.setenv(SDPA_KERNEL_ENV, "efficient")
    try:
        limit_sdpa_kernels()
        assert not torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    finally:
        torch.backends.cuda.enable_flash_sdp(before[0])
        torch.backends.cuda.enable_cudnn_sdp(before[1])
    monkeypatch.setenv(SDPA_KERNEL_ENV, "flash")
    with pytest.raises(ValueError, match="only value m3lab knows is 'efficient'"):
        limit_sdpa_kernels()


def test_the_full_size_stand_in_has_the_parameters_the_predictor_traces(tmp_path):
    from safetensors import safe_open

    built = standin.build(tmp_path / "full", full_size=True)
    config = predictor.load_model_config(built)
    for key, value in standin.BGE_M3_CONFIG.items():
        assert getattr(config, key) == value, key
    with safe_open(built / "model.safetensors", "pt") as weights:
        encoder = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    heads = sum(t.numel() for name in ("colbert_linear.pt", "sparse_linear.pt")
                for t in torch.load(built / name, weights_only=True).values())
    spec = spec_for(gpu_check.checks("full")[1].config)
    traced = sum(p.numel() for p in meta_model(spec).parameters())
    assert encoder + heads == traced
    assert traced > 567_000_000  # BGE-M3's ~568M parameters
    assert os.path.getsize(built / "model.safetensors") > 2.2e9  # fp32, like the real checkpoint


def test_a_gpu_adds_the_word_embedding_gradients_in_place(monkeypatch):
    """Fused AdamW without DeepSpeed peaks in backward, where autograd adds the word embedding's two
    gradients (queries and passages are encoded apart). Measured on the H200, the steady step holds
    one gradient there, not two: autograd adds the second in place on a GPU, out of place under any
    dispatch mode. The trace adds it in place (GPU_ADDS_GRADIENTS_IN_PLACE); without that it is one
    fp32 word-embedding gradient too high, outside the tolerance."""
    from m3lab.predict import trace

    file = measurements.load(MEASUREMENTS / "2026-11-30-nvidia-h200-fp16-amp.json")
    (run,) = [r for r in file.runs if r.name == "path after lesson 04 (no DeepSpeed, adamw_torch_fused)"]
    rows = {row.step: row for row in measurements.compare(file, [run])}
    assert trace.GPU_ADDS_GRADIENTS_IN_PLACE and rows["steady"].within_tolerance
    monkeypatch.setattr(trace, "GPU_ADDS_GRADIENTS_IN_PLACE", False)
    config = predictor.bge_m3_config()
    out_of_place = predictor.predict(run.config, "t4", model_config=config).per_rank[0].steady_step.peak_allocated_bytes
    gradient = config.vocab_size * config.hidden_size * 4  # fp32
    assert abs(out_of_place - rows["steady"].predicted_bytes - gradient) < 2**21  # within the allocator's 2 MiB blocks
    assert abs(out_of_place / rows["steady"].measured_bytes - 1) > measurements.TOLERANCE["cuda"]


# ---- the allocator under the card's limit, against the same runs ------------------------------------
EVIDENCE = [pytest.param(run, id=f"{run.source}: {run.name}") for run in compare.measured_runs()
            if run.peak_allocated_bytes or not run.ran]
RESERVED_TOLERANCE = 0.02
# Measured, not yet understood: the reserved bytes of this run's first updated step (after a skipped
# one) are 12.8% below the simulation's, whose peak allocated is within 0.2%
RESERVED_MISSES = {"advice, no gradient checkpointing": "the simulated cache holds 1.9 GiB more than the H200's "
                                                        "(16.84 against 14.93 GiB); cause not found"}


@pytest.mark.parametrize("run", [r for r in EVIDENCE if r.values[0].limit_bytes])
def test_under_a_t4s_limit_the_verdict_is_what_the_card_did(run):
    """The H200 capped at a T4's budget ran the advice and the path after lesson 04 and ran out of
    memory on FlagEmbedding's example: the simulated allocator, limited the same way, says the same,
    and where it runs out, it runs out on the same request with the same bytes in use."""
    found = compare.against_prediction(run)
    assert found.outcome_matches, found.describe()
    if not run.ran:
        oom = found.report.out_of_memory
        assert oom.requested_bytes == pytest.approx(run.oom_requested_bytes, rel=0.005)  # "Tried to allocate"
        assert oom.allocated_bytes == pytest.approx(run.oom_allocated_bytes, rel=0.005)
        assert abs(oom.unallocated_bytes - run.oom_unallocated_bytes) < 10 * 2**20  # fragmentation, 10 MiB
        assert found.report.spare_bytes < 0 and "out of memory in step 1" in found.report.verdict
    else:
        assert found.report.out_of_memory is None and found.report.spare_bytes > 0


@pytest.mark.parametrize("run", [pytest.param(*r.values, id=r.id, marks=pytest.mark.xfail(
    strict=True, reason=RESERVED_MISSES[r.values[0].name])) if r.values[0].name in RESERVED_MISSES else r
    for r in EVIDENCE if r.values[0].peak_reserved_bytes])
def test_the_simulated_allocator_reserves_what_the_card_reserved(run):
    """max_memory_reserved over the compared steps, with and without a T4's limit, within 2%."""
    found = compare.against_prediction(run)
    assert abs(found.reserved_error) <= RESERVED_TOLERANCE, found.describe()


def test_the_comparison_can_fail():
    """A run that ran, predicted on a card too small for it, is a mismatch (and the other way round)."""
    (run,) = [r for r in compare.measured_runs() if r.name == "advice (ZeRO-1), T4 budget"]
    small = dataclasses.replace(run, limit_bytes=10 * 2**30, name="advice (ZeRO-1), 10 GiB")
    found = compare.Evidence(small, predictor.predict(run.config, compare.card_of(small),
                                                       model_config=predictor.bge_m3_config()))
    assert not found.outcome_matches


def test_a_lesson_finds_the_measurement_of_what_it_predicts():
    advice = TrainConfig.common_t4_advice()
    assert [run.name for run in compare.measured_peaks(advice)] == ["advice (ZeRO-1)"]
    assert compare.measured_peaks(advice.replace(train_group_size=4)) == []


def test_the_measured_figures_quoted_in_the_readmes_are_the_files():
    """data/measurements/README.md's table and README.md quote measured peaks: each is the committed file's."""
    runs = {}
    for path in sorted(MEASUREMENTS.glob("*.json")):
        for run in measurements.load(path).runs:
            pairs = [step for rank in run.ranks[:1] for _label, step in measurements.step_pairs(rank.steps)]
            if run.outcome is Outcome.RAN and pairs:
                runs[run.name] = " / ".join(f"{s.peak_allocated_bytes / 2**30:.3f}" for s in pairs)
    rows = {"common advice (ZeRO-1, 64/392, group 6)": "advice (ZeRO-1)", "advice, ZeRO-0": "advice, ZeRO-0",
            "advice, fix_encoder on": "advice, fix_encoder on",
            "advice, no gradient checkpointing": "advice, no gradient checkpointing",
            "advice + efficient sparse head + grad cache": "advice + efficient sparse head + grad cache",
            "FlagEmbedding's example at passage 512": "example at passage 512",
            "FlagEmbedding's example at passage 8192": "example at passage 8192",
            "advice, no DeepSpeed (HF fp16 AMP, adamw_torch), 10 steps": "advice, no DeepSpeed (HF fp16 AMP, adamw_torch)",
            "the path after lesson 04 (no DeepSpeed, adamw_torch_fused)":
                "path after lesson 04 (no DeepSpeed, adamw_torch_fused)"}
    table = {}
    for line in (MEASUREMENTS / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0] in rows:
            table[cells[0]] = cells[1].replace("**", "")
    assert table == {label: runs[name] for label, name in rows.items()}
    readme = " ".join((MEASUREMENTS.parent.parent / "README.md").read_text().split())
    steady = {name: figures.split(" / ")[-1] for name, figures in runs.items()}
    assert f"{float(steady['example at passage 8192']):.2f} GiB measured" in readme
    assert f"measured {float(steady['path after lesson 04 (no DeepSpeed, adamw_torch_fused)']):.2f} GiB" in readme
    # and the reserved bytes data/measurements/README.md quotes
    reserved = {}
    for path in sorted(MEASUREMENTS.glob("*.json")):
        for run in measurements.load(path).runs:
            if run.outcome is Outcome.RAN and run.ranks[0].steps[0].peak_reserved_bytes is not None:
                reserved[(path.stem, run.name)] = max(s.peak_reserved_bytes for s in run.ranks[0].steps)
    notes = " ".join((MEASUREMENTS / "README.md").read_text().split())
    h200 = "2026-11-30-nvidia-h200"
    for phrase, key in [("reserved at most {:.2f} GiB", (h200, "advice (ZeRO-1), T4 budget")),
                        ("against {:.2f} uncapped", (h200, "advice (ZeRO-1)")),
                        ("(16.84 against {:.2f} GiB)", (h200, "advice, no gradient checkpointing"))]:
        assert phrase.format(reserved[key] / 2**30) in notes, phrase
    (oom,) = [run for run in compare.measured_runs() if not run.ran]
    assert (f"asking for {oom.oom_requested_bytes / 2**30:.2f} GiB with {oom.oom_allocated_bytes / 2**30:.2f} GiB in use"
            in notes)
