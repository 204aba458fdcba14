"""The series' path (m3lab.plan.ledger): one baseline, each step changing what the step before it left,
in lesson order; the plot draws it; the predicted path goes from an OOM to a recipe that fits."""

import pytest

from m3lab.config import TrainConfig
from m3lab.gpus import GIB
from m3lab.lessons import plots
from m3lab.plan import ledger


def test_the_baseline_is_upstreams_example_as_shipped_at_8192_tokens():
    base = ledger.baseline()
    assert base == TrainConfig.upstream_example(passage_max_len=8192)
    assert base.deepspeed_stage == 0 and not base.torch_adam  # ds_stage0.json: DeepSpeed's FusedAdam
    assert '"torch_adam"' not in base.deepspeed_json()
    assert (base.train_group_size, base.per_device_train_batch_size, base.query_max_len) == (8, 2, 512)


def test_each_step_changes_only_what_it_says_from_where_the_last_left():
    configs = list(ledger.path().values())
    assert len(configs) == len(ledger.PATH)
    previous = ledger.baseline()
    for step, config in zip(ledger.PATH, configs):
        assert config == previous.replace(**step.changes), step.knob
        config.check()  # every point of the path is a configuration that runs
        previous = config
    lessons = [step.lesson for step in ledger.PATH]
    assert lessons == sorted(lessons) and lessons[0] == "01"


def test_path_upto_and_where_each_lesson_starts():
    assert list(ledger.path("01")) == ["01: FlagEmbedding's example, 8,192-token passages"]
    assert all(label[:2] <= "03" for label in ledger.path("03"))
    assert ledger.before("01") == ledger.baseline()
    assert ledger.before("04") == ledger.after("03")
    assert ledger.after("04").deepspeed_stage is None and ledger.before("04").deepspeed_stage == 0
    with pytest.raises(ValueError, match="lesson '09'"):
        ledger.path("09")


def test_changed_flags_name_only_what_changes():
    before, after = ledger.before("04"), ledger.after("04")
    changed = ledger.changed_flags(after, before)
    assert "--optim adamw_torch_fused" in changed and "(remove --deepspeed)" in changed
    assert not any(flag.startswith("--train_group_size") for flag in changed)
    assert ledger.changed_flags(before, before) == []


def test_changed_flags_say_what_changes_inside_a_json_of_the_same_name():
    zero1 = ledger.before("04").replace(deepspeed_stage=1, torch_adam=True)
    offload = zero1.replace(offload_optimizer=True)
    changed = ledger.changed_flags(offload, zero1)
    assert len(changed) == 1 and changed[0].startswith("(ds_stage1.json: ")
    assert 'zero_optimization.offload_optimizer: {"device": "cpu"' in changed[0]
    # a new stage is named by the file; what else changes in it is spelled out
    assert ledger.changed_flags(zero1.replace(deepspeed_stage=0), zero1) == ["--deepspeed ds_stage0.json"]
    moved = ledger.changed_flags(offload, zero1.replace(deepspeed_stage=0))
    assert moved[0] == "--deepspeed ds_stage1.json" and len(moved) == 2
    assert moved[1].startswith("(ds_stage1.json: ") and "offload_optimizer" in moved[1] and "zero_optimization.stage" not in moved[1]


@pytest.mark.slow
def test_the_predicted_path_runs_from_an_oom_to_a_recipe_that_fits_free_colab():
    reports = ledger.predict_path("08")
    first, *_ = reports.values()
    recipe = reports[list(ledger.path("07"))[-1]]
    assert not first.fits and first.peak_allocated_bytes > 100 * GIB
    assert recipe.fits and recipe.total_bytes < recipe.usable_bytes - GIB  # more than a close call
    assert recipe.host.total_bytes < 12.7e9  # free Colab's host RAM
    for label, report in reports.items():
        assert report.provenance == "predicted for Tesla T4 (Colab)", label
    figure = plots.ledger(reports)
    assert len(figure.axes) == 2  # the baseline's bar breaks the axis (no log scale)
    assert all(ax.get_yscale() == "linear" for ax in figure.axes)


def test_a_lessons_changes_name_each_flag_once():
    """The knob's own words are not repeated as flags; what they do not say is added once."""
    for lesson in ("02", "03", "04", "07", "08"):
        for line in ledger.lesson_changes(lesson):
            knob, _, added = line.partition("; with it: ")
            for flag in added.split(" --"):
                assert not flag or flag.strip("- ") not in knob, line
    assert ledger.lesson_changes("04") == ["04: no --deepspeed (HF fp16; --optim adamw_torch_fused)"]
    assert "--warmup_steps" in ledger.lesson_changes("03")[0]  # not in the knob's words: kept


def test_a_changed_flag_pastes_into_a_shell_as_it_is_printed():
    """A JSON value (DDP's checkpointing kwargs on two GPUs) is quoted as the full command quotes it."""
    import shlex

    advice = TrainConfig.common_t4_advice()
    two = advice.replace(num_processes=2, deepspeed_stage=None, optim="adamw_torch_fused")
    flags = ledger.changed_flags(two, advice)
    kwargs = next(flag for flag in flags if flag.startswith("--gradient_checkpointing_kwargs"))
    assert shlex.split(kwargs) == ["--gradient_checkpointing_kwargs", '{"use_reentrant": false}']
