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


def test_a_buckets_lines_past_its_last_whole_batch_go_up_and_only_the_longest_buckets_are_left_out():
    records = [{"query": f"q{i}", "pos": [_text(n, i)], "neg": [_text(3, i)]}
               for i, n in enumerate([5, 20, 6, 7, 8, 40, 45, 50, 300, 310, 320])]
    lengths = _lengths_of(records)
    split = buckets.split(records, lengths, min_lines=1)
    assert [b.lines for b in split] == [5, 3, 3]
    for bucket, batch in zip(split, (2, 2, 2)):
        bucket.batch = batch
    plan = buckets.BucketPlan(buckets.platform_for("colab-t4"), False, buckets.TrainConfig(), "words", split)
    assert plan.lines_left_out() == 1 + 1 + 1  # FlagEmbedding would drop each file's odd line
    buckets._carry_up(split, lengths, processes=1)
    # the first bucket's longest line (20 words) goes up; the second's then has 4 lines and keeps them
    assert [len(r["pos"][0].split()) for r in split[0].records] == [5, 6, 7, 8]
    assert [b.lines for b in split] == [4, 4, 3] and plan.lines_left_out() == 1
    assert sum(b.lines for b in split) == len(records)


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
    # as the answer's card: where the files must go first, the command, and the same run resumed
    steps = small_plan.instructions("buckets").split("\n")
    assert steps[0].startswith("# Before you run it: mount Google Drive first")
    assert command in "\n".join(steps) and steps[-1] == "    --resume_from_checkpoint latest"
    assert small_plan.resume_command("buckets") == command.replace(
        "-m FlagEmbedding.finetune.embedder.encoder_only.m3", "-m m3lab.run_m3") + " \\\n    --resume_from_checkpoint latest"


def test_the_per_length_command_pasted_into_predict_is_predicted_at_its_tightest_file(small_plan, tmp_path):
    """FlagEmbedding batches each file at its lines' batch_size: the command's own batch says little."""
    import shlex

    from m3lab.command import parse
    from m3lab.plan import per_file
    from m3lab.predict import predict

    small_plan.write(tmp_path / "buckets")
    command = small_plan.command(str(tmp_path / "buckets"))
    config = parse(command).config
    assert per_file.carries_batch_sizes(config)
    runs = per_file.file_runs(config)
    assert [(r.path.name, r.lines, r.batch_size) for r in runs] == [(b.name, b.lines, b.batch) for b in small_plan.buckets]
    assert all(b.low < r.longest_passage <= b.bound for r, b in zip(runs, small_plan.buckets))
    found = per_file.tightest(config, "t4", runs)
    one_by_one = [predict(run.config(config), "t4").spare_bytes for run in runs]
    assert found.report.spare_bytes == min(one_by_one)
    printed = _m3lab("predict", "--gpu", "t4", "--", *shlex.split(command.replace("\\\n", " ")), cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert f"note: {found.describe()}" in printed.stderr
    assert f"{found.report.total_bytes / 2**30:.2f} GiB" in printed.stdout


@pytest.fixture(scope="module")
def long_lines(tmp_path_factory):
    """40 lines whose positives run 600 to 900 tokens (one bucket, up to 1,024), three short negatives each."""
    path = tmp_path_factory.mktemp("long") / "long.jsonl"
    lines = [{"query": _text(4, i), "pos": [_text(200 + (i % 4) * 30, i)], "neg": [_text(20 + j, i + j) for j in range(3)]}
             for i in range(40)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_token_chunks_hold_batches_memory_alone_would_not_up_to_a_steps_tokens(long_lines):
    """On a T4 the batch over the whole encoder pass is held by its activations; in chunks of 8,192 tokens
    it reaches the step's token budget (32 lines of group 4 at 1,024 tokens), and both fit with the margin."""
    quiet = dict(log=lambda line: None)
    before = buckets.plan(long_lines, "colab-t4", chunk_tokens=0, **quiet)
    after = buckets.plan(long_lines, "colab-t4", **quiet)
    assert [b.bound for b in before.buckets] == [b.bound for b in after.buckets] == [1024]
    assert before.chunk_tokens == 0 and after.chunk_tokens == buckets.CHUNK_TOKENS == after.config("b").grad_cache_chunk_tokens
    assert after.base.train_group_size == before.base.train_group_size == 4
    cap = buckets.STEP_TOKENS // (4 * 1024)
    assert after.buckets[0].batch == cap == 32 and 1 <= before.buckets[0].batch < cap
    for plan in (before, after):
        report = plan.buckets[0].report
        assert report.fits and report.spare_bytes >= buckets.CLOSE_CALL_BYTES
    assert "--grad_cache_chunk_tokens 8192" in after.command("b") and "grad_cache" not in before.command("b")
    table = buckets.before_after(before, after)
    assert f"{before.buckets[0].batch:>6} -> 32" in table and "group: 4 -> 4" in table
    slow, fast = after.tokens_a_second(after.buckets[0])
    assert 0 < slow < fast


def test_a_lora_plan_trains_the_adapter_with_fused_adamw_in_every_file(outside):
    plan = buckets.plan(outside, "colab-t4", max_batch=4, lora=True, log=lambda line: None)
    config = plan.config("b")
    assert config.use_lora and config.optim == "adamw_torch_fused" and config.learning_rate == 1e-4
    assert config.grad_cache_chunk_tokens == buckets.CHUNK_TOKENS
    assert "--use_lora True" in plan.command("b") and "LoRA (rank 64)" in plan.table()


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
    assert config.grad_cache_chunk_tokens == buckets.CHUNK_TOKENS  # the encoder in chunks of tokens, as planned
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
    assert run.stdout.rstrip().endswith("--resume_from_checkpoint latest \\\n    --previous_output_dirs /kaggle/input")
    assert "per-length batches" in run.stdout and "the common T4 advice" in run.stdout


def test_what_the_command_line_cannot_do_is_one_sentence_and_status_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "pos": []}\n')
    for args in (["--buckets", "b", "--gpu", "t4"], ["--buckets", "b", "--data", str(bad)]):
        run = _m3lab("fit", *args, cwd=tmp_path)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert not (tmp_path / "b").exists()


def test_each_buckets_step_time_is_estimated_at_the_lengths_its_own_lines_pad_to(small_plan):
    """One basis for every time: a bucket's batches pad to its own lines' longest texts, so its step
    is estimated at their padded share of the full-length FLOPs, never above them."""
    for bucket in small_plan.buckets:
        time = small_plan.step_time(bucket)
        assert time.padded_share is not None and 0 < time.padded_share <= 1
        lines = small_plan.line_lengths(bucket.records)
        assert [line.query for line in lines] == [small_plan.query_lengths[r["query"]] for r in bucket.records]
    assert "at the lengths each bucket's batches pad to" in small_plan.table()


def test_an_answer_is_costed_on_the_same_footing_as_the_buckets(small_plan):
    """``answer_cost``: the answer's kept share, steps an epoch and its plan's time for that epoch."""
    from types import SimpleNamespace

    from m3lab.predict.steptime import StepTime

    time = StepTime(10**12, 0.5, 2.0, 3.0, "Tesla T4 (Colab)", 0.13, 0.24, None)
    config = small_plan.base.replace(passage_max_len=32)
    answer = SimpleNamespace(config=config, plan=SimpleNamespace(time=time, steps_per_epoch=18),
                             report=small_plan.buckets[0].report)
    cost = buckets.answer_cost("the answer", answer, small_plan.lengths)
    assert cost.steps == 18 and cost.seconds == (36.0, 54.0)
    assert cost.tokens_kept == pytest.approx(buckets.kept(small_plan.lengths, 32)) and cost.tokens_kept < 1


def test_the_committed_benchmark_reads_back_and_says_where_it_was_measured():
    from m3lab.evidence import bench_buckets

    result = bench_buckets.load()
    lines = result.describe()
    assert lines[0].startswith("measured on CPU") and "the tiny stand-in" in lines[0]
    ratio = result.bucketed.lines_per_second / result.fixed.lines_per_second
    assert f"{ratio:.2f}x lines/s" in lines[-1] and result.bucketed.steps < result.fixed.steps
