"""A traced rank is kept on disk and read back only for the same trace by the same code."""

import copy
import dataclasses

import pytest

from m3lab.config import TrainConfig
from m3lab.gpus import gpu_profile
from m3lab.predict import predict, saved_traces
from m3lab.predict.pool import TraceJob
from m3lab.predict.spec import spec_for


@pytest.fixture
def kept(tmp_path, monkeypatch):
    monkeypatch.setenv("M3LAB_CACHE", str(tmp_path))
    monkeypatch.setenv("M3LAB_SAVED_TRACES", "1")  # the tests' own switch (conftest) turned back on
    return tmp_path / "traces" / saved_traces.code_fingerprint()


def _config(standin_dir, **changes):
    return TrainConfig(model=str(standin_dir), query_max_len=16, passage_max_len=32, train_group_size=2).replace(
        **changes)


def test_a_second_prediction_reads_the_first_ones_trace(standin_dir, kept, monkeypatch):
    first = predict(_config(standin_dir), None, exact=True)
    assert len(list(kept.glob("*.pkl"))) == 1

    from m3lab.predict import pool

    traced = []
    real = pool._traced
    monkeypatch.setattr(pool, "_traced", lambda jobs, one_shot: traced.extend(jobs) or real(jobs, one_shot))
    again = predict(_config(standin_dir), None, exact=True)
    assert not traced
    assert again.peak_allocated_bytes == first.peak_allocated_bytes
    assert again.breakdown == first.breakdown
    predict(_config(standin_dir, train_group_size=3), None, exact=True)
    assert len(traced) == 1


def test_everything_the_trace_is_given_changes_the_key(standin_dir):
    spec = spec_for(_config(standin_dir))
    job = TraceJob(spec, gpu_profile("t4"), 0)
    others = [dataclasses.replace(job, rank=1), dataclasses.replace(job, gpu=gpu_profile("l4")),
              dataclasses.replace(job, shallow=True), dataclasses.replace(job, first_update_skipped=True),
              dataclasses.replace(job, spec=dataclasses.replace(spec, passage_max_len=64)),
              dataclasses.replace(job, spec=dataclasses.replace(spec, deepspeed={"zero_optimization": {"stage": 1}}))]
    geometry = copy.deepcopy(spec.model_config)
    geometry.num_hidden_layers += 1
    others.append(dataclasses.replace(job, spec=dataclasses.replace(spec, model_config=geometry)))
    keys = {saved_traces.key_of(other) for other in others}
    assert saved_traces.key_of(job) not in keys and len(keys) == len(others)
    assert saved_traces.key_of(job) == saved_traces.key_of(TraceJob(spec_for(_config(standin_dir)), gpu_profile("t4"), 0))


def test_turned_off_nothing_is_kept(standin_dir, kept, monkeypatch):
    monkeypatch.setenv("M3LAB_SAVED_TRACES", "0")
    predict(_config(standin_dir), None, exact=True)
    assert not kept.exists()


def test_the_code_fingerprint_covers_the_traced_libraries_versions(monkeypatch):
    before = saved_traces.code_fingerprint()
    saved_traces.code_fingerprint.cache_clear()
    real = saved_traces.metadata.version
    monkeypatch.setattr(saved_traces.metadata, "version",
                        lambda name: "0.0.1" if name == "transformers" else real(name))
    try:
        assert saved_traces.code_fingerprint() != before
    finally:
        saved_traces.code_fingerprint.cache_clear()


def test_the_fingerprint_reads_every_module_a_trace_can_run_and_not_the_planner_above_it():
    files = {str(path).split("/m3lab/", 1)[1] for path in saved_traces.traced_code()}
    # the levers a traced model runs are imported inside a function: found all the same
    assert {"predict/step.py", "train/runner.py", "train/sparse_head.py", "train/grad_cache.py", "config.py",
            "deepspeed_json.py", "compat.py"} <= files
    assert not {f for f in files if f.startswith(("plan/", "lessons/", "evidence/", "use/", "cli.py"))}
