"""Per-length batches: the split, the plan's verdicts, the files, and a real epoch through FlagEmbedding's
same-dataset path with them."""

import json
from collections import Counter

import pytest

from m3lab.data.jsonl import load_jsonl
from m3lab.plan import buckets

WORDS = "memory card batch length token passage query model train fits".split()


def _text(words: int, seed: int) -> str:
    return " ".join(WORDS[(seed + i) % len(WORDS)] + str(i % 7) for i in range(words))


def _lengths_of(records):
    return {t: len(t.split()) for r in records for t in r["pos"] + r["neg"]}


def test_lines_go_to_the_bucket_of_their_longest_passage_and_small_buckets_join_the_next():
    records = [{"query": "q", "pos": ["a " * n], "neg": ["b " * m]} for n, m in
               [(10, 20), (30, 5), (40, 2), (300, 10), (3000, 9000)]]
    lengths = {t: len(t.split()) for r in records for t in r["pos"] + r["neg"]}
    split = buckets.split(records, lengths, min_lines=1)
    assert [(b.low, b.bound, b.lines) for b in split] == [(0, 32, 2), (32, 64, 1), (64, 512, 1), (512, 8192, 1)]
    joined = buckets.split(records, lengths, min_lines=2)
    # the longest bucket has no longer one to join: it stays, however few its lines
    assert [(b.low, b.bound, b.lines) for b in joined] == [(0, 32, 2), (32, 512, 2), (512, 8192, 1)]


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """A learner's file outside the repository: 36 lines whose passages run from a few tokens to ~100."""
    folder = tmp_path_factory.mktemp("learner")
    lines = [{"query": _text(4, i), "pos": [_text(6 + (i % 3) * 30, i)], "neg": [_text(5 + j, i + j) for j in range(3)]}
             for i in range(36)]
    path = folder / "my data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def small_plan(outside):
    return buckets.plan(outside, "colab-t4", max_batch=4, log=lambda line: None)


def test_every_batch_the_plan_proposes_fits_the_card_with_the_margin(small_plan):
    assert small_plan.cut is None and len(small_plan.buckets) >= 2
    for bucket in small_plan.buckets:
        assert bucket.batch == min(4, bucket.lines)  # a T4 holds far more of such short texts
        assert bucket.report.fits and bucket.report.spare_bytes >= buckets.CLOSE_CALL_BYTES


def test_the_files_are_flagembeddings_format_with_each_buckets_batch(small_plan, tmp_path):
    written = small_plan.write(tmp_path / "buckets")
    assert [p.name for p in written] == [b.name for b in small_plan.buckets]
    for path, bucket in zip(written, small_plan.buckets):
        records = load_jsonl(path)
        assert len(records) == bucket.lines and {r["batch_size"] for r in records} == {bucket.batch}
    command = small_plan.command("buckets")
    assert "--same_dataset_within_batch True" in command and "--query_instruction_for_retrieval ''" in command


def test_a_card_without_a_step_time_estimate_still_checkpoints_every_tenth_of_the_run(small_plan):
    """A card with no datasheet peak here (an H100) has no step-time estimate: the run still saves."""
    import dataclasses

    elsewhere = dataclasses.replace(small_plan, buckets=[dataclasses.replace(b, report=dataclasses.replace(
        b.report, gpu="h100")) for b in small_plan.buckets])
    steps = int(elsewhere.epoch_steps() * elsewhere.base.num_train_epochs)
    assert elsewhere.config("buckets").save_steps == max(1, steps // 10)
    assert "no estimate" in elsewhere.table()


@pytest.mark.slow
def test_the_stand_ins_epoch_over_the_files_takes_the_planned_batches(small_plan, tmp_path, standin_dir):
    from m3lab.train.launch import train

    folder = tmp_path / "buckets"
    small_plan.write(folder)
    # the plan's run on a CPU with the tiny stand-in: its own optimizer (8-bit AdamW wants a GPU), no fp16
    config = small_plan.config(str(folder)).replace(model=str(standin_dir), fp16=False, optim="adamw_torch",
                                                    num_train_epochs=1, save_steps=None, save_total_limit=None,
                                                    learning_rate=1e-4)
    result = train(config, runs_root=tmp_path / "runs")
    assert result.status == "ok", result.log_path.read_text()[-3000:]
    seen = Counter(step.queries for step in result.steps)
    planned = Counter()
    for bucket in small_plan.buckets:
        planned[bucket.batch] += bucket.steps(1)
    assert seen == planned and len(result.steps) == small_plan.epoch_steps()
    group = config.train_group_size
    assert all(step.passages == step.queries * group for step in result.steps)
    assert max(step.passage_tokens for step in result.steps) <= small_plan.buckets[-1].bound


def _m3lab(*args, cwd):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "m3lab", *args], cwd=cwd, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_the_command_line_writes_the_files_and_a_command_for_two_processes(outside, tmp_path):
    run = _m3lab("fit", "--buckets", "my-buckets", "--platform", "kaggle-t4x2", "--data", str(outside), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    files = sorted((tmp_path / "my-buckets").glob("len-*.jsonl"))
    assert files and sum(len(load_jsonl(f)) for f in files) == len(load_jsonl(outside))
    assert "--nproc_per_node 2" in run.stdout and "--train_data my-buckets" in run.stdout
    assert "per-length batches" in run.stdout and "the seed's T4 advice" in run.stdout


def test_what_the_command_line_cannot_do_is_one_sentence_and_status_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "pos": []}\n')
    for args in (["--buckets", "b", "--gpu", "t4"], ["--buckets", "b", "--data", str(bad)]):
        run = _m3lab("fit", *args, cwd=tmp_path)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert not (tmp_path / "b").exists()
