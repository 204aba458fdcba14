"""The pieces the notebooks stand on: retrieval metrics, prediction tables, and plots that carry
their provenance and the card's usable-memory line."""

from pathlib import Path

import numpy as np
import pytest
from helpers.hf_runs import hf_run

from m3lab import lessons
from m3lab import predict as predictor
from m3lab.gpus import gpu_profile
from m3lab.lessons import plots
from m3lab.use.evaluate import _rank_metrics, load_corpus

BERT_TINY = Path(__file__).parent / "fixtures" / "bert-tiny-config.json"


def test_rank_metrics_by_hand():
    scores = np.array([[0.9, 0.8, 0.1],   # relevant {1}: ranked 2nd
                       [0.1, 0.2, 0.3],   # relevant {0, 2}: ranked 3rd and 1st
                       [0.5, 0.4, 0.3]])  # relevant {0}: ranked 1st
    metrics = _rank_metrics(scores, [{1}, {0, 2}, {0}], ks=(1, 2))
    assert metrics.mrr_at_10 == pytest.approx((1 / 2 + 1 + 1) / 3)
    assert metrics.recall[1] == pytest.approx((0 + 0.5 + 1) / 3)
    assert metrics.recall[2] == pytest.approx((1 + 0.5 + 1) / 3)
    # nDCG@10: gain 1 at rank r counts 1/log2(r + 1); divided by the best order's (positives first)
    second = 1 / np.log2(3)
    ideal_two = 1 + second
    assert metrics.ndcg_at_10 == pytest.approx((second / 1 + (1 + 1 / np.log2(4)) / ideal_two + 1) / 3)


def test_a_bad_corpus_line_is_reported_with_file_and_line(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "fine"}\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match=r"corpus.jsonl:2: not a corpus line"):
        load_corpus(path)


def test_a_corpus_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "first"}\r\n{"text": "second"}\r\n')
    assert load_corpus(path) == ["first", "second"]


@pytest.fixture(scope="module")
def two_reports():
    return {f"seq {n}": predictor.predict(hf_run(seq_len=n), "t4") for n in (64, 128)}


def test_prediction_table_names_every_configuration_and_the_provenance(two_reports):
    table = lessons.prediction_table(two_reports)
    assert "seq 64" in table and "seq 128" in table
    assert "predicted for Tesla T4 (Colab)" in table and "usable 14.74 GiB" in table


def test_plots_carry_provenance_and_the_usable_line(two_reports):
    for figure in (plots.breakdown_bars(two_reports),
                   plots.memory_curve([64, 128], list(two_reports.values()), "seq_len (tokens)")):
        ax = figure.axes[0]
        labels = [text.get_text() for text in ax.get_legend().get_texts()]
        assert any("usable memory (14.74 GiB)" in label for label in labels)
        assert "predicted for Tesla T4" in ax.get_title() + " ".join(labels)
        assert "GiB" in ax.get_ylabel()


def test_measured_plots_say_whose_run_in_the_title(two_reports):
    """A stand-in's measured figures must not pass for BGE-M3's: the title says where they came from."""
    where = "measured on CPU (tiny stand-in)"
    bars = plots.memory_bars(["a", "b"], [2**20, 2**21], where, title="Peak memory of one step")
    assert where in bars.axes[0].get_title()
    assert bars.axes[0].get_ylabel() == "peak memory (MiB)"  # tens of MiB are not written as 0.0x GiB
    assert [t.get_text() for t in bars.axes[0].texts] == ["1.0", "2.0"]
    drawn = plots.breakdown_bars(two_reports, measured={"seq 64": 2**20}, measured_provenance=where)
    assert where in drawn.axes[0].get_title() and "predicted for Tesla T4" in drawn.axes[0].get_title()


def test_no_gpu_environment_says_what_it_will_do():
    env = lessons.environment()
    assert not env.on_gpu and env.model == "tiny-bge-m3"
    assert "no GPU" in env.describe() and "predicted" in env.describe()
    assert env.memory_limit_bytes is None and env.oom_limit_bytes == lessons.CPU_MEMORY_CAP
    assert env.max_processes == 2


def test_the_environment_picks_sizes_and_nothing_else():
    """One code path: a T4, a bigger GPU and a CPU run the same config; only model, precision, sizes differ."""
    from m3lab.config import TrainConfig

    config = TrainConfig.common_t4_advice(max_steps=60)
    t4 = lessons.Environment(True, "Tesla T4", 1, 15_828_320_256)
    h200 = lessons.Environment(True, "NVIDIA H200", 1, 150 * 2**30)
    cpu = lessons.Environment(False, None, 0, None)
    assert t4.sized(config, max_steps=2) == config.replace(model="BAAI/bge-m3")
    assert t4.memory_limit_bytes is None and h200.memory_limit_bytes == gpu_profile("t4").usable_bytes
    assert (t4.oom_limit_bytes, h200.oom_limit_bytes) == (None, h200.memory_limit_bytes)
    small = cpu.sized(config, max_steps=2, passage_max_len=128)
    assert small == config.replace(model="tiny-bge-m3", fp16=False, max_steps=2, passage_max_len=128)
    assert (t4.predicts_for, cpu.predicts_for) == ("t4", None)
    assert (t4.gpu_check_model, cpu.gpu_check_model) == ("full", "tiny")


def test_print_commands_gives_the_flags_to_change_from_where_the_path_stands(capsys):
    from m3lab.plan import ledger

    start = ledger.before("04")
    lessons.print_commands({"ZeRO-1": start.replace(deepspeed_stage=1), "unchanged": start,
                            "no DeepSpeed, 2 GPUs": start.replace(deepspeed_stage=None, num_processes=2)}, "04")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# Flags to change in the command the path reached before lesson 04")
    assert "m3lab predict --gpu t4 -- <command>" in lines[1]
    assert lines[2] == "ZeRO-1: --deepspeed ds_stage1.json"
    assert lines[3] == "unchanged: nothing changes"
    # without DeepSpeed the command itself names what the JSON held (HF Trainer's optimizer)
    assert lines[4].startswith("no DeepSpeed, 2 GPUs: --nproc_per_node 2 ") and lines[4].endswith("(remove --deepspeed)")
    assert "--optim adamw_torch" in lines[4]


def test_memory_curve_compares_labelled_series(two_reports):
    reports = list(two_reports.values())
    figure = plots.memory_curve([64, 128], reports, "seq_len", label="cached", compare={"plain": reports[::-1]})
    ax = figure.axes[0]
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert "cached: peak allocated, predicted for Tesla T4 (Colab)" in labels
    assert "plain: peak allocated, predicted for Tesla T4 (Colab)" in labels
    # every series drawn with what it needs of the card, the figure its verdict reads
    assert any(label.startswith("plain: what the step needs of the card") for label in labels)
    plain = next(line for line in ax.get_lines() if line.get_label().startswith("plain"))
    assert list(plain.get_ydata()) == [r.peak_allocated_bytes / 2**30 for r in reports[::-1]]


def test_retrieval_is_scored_in_a_child_process(monkeypatch):
    """The kernel never loads the model (on a GPU it would stay there while the next run trains)."""
    import FlagEmbedding

    from m3lab.use.evaluate import MODES, evaluate_retrieval

    def loaded_here(*args, **kwargs):
        raise AssertionError("the model was loaded in the calling process")

    monkeypatch.setattr(FlagEmbedding, "BGEM3FlagModel", loaded_here)
    scores = evaluate_retrieval("tiny-bge-m3")
    assert (scores.queries, scores.corpus) == (50, 303)
    assert set(scores.mrr_at_10) == set(MODES) and all(0 <= v <= 1 for v in scores.mrr_at_10.values())
    assert set(scores.recall["dense"]) == {1, 5, 10, 100}
    assert set(scores.ndcg_at_10) == set(MODES) and all(0 <= v <= 1 for v in scores.ndcg_at_10.values())


def test_memory_curve_zooms_on_the_card_and_writes_what_is_above(two_reports):
    import dataclasses

    small, big = list(two_reports.values())
    huge = dataclasses.replace(big, peak_allocated_bytes=137 * 2**30, total_bytes=138 * 2**30)
    ax = plots.memory_curve([64, 128], [small, huge], "seq_len").axes[0]
    assert ax.get_ylim()[1] == pytest.approx(2 * small.usable_bytes / 2**30)
    assert [t.get_text() for t in ax.texts if "\u2191" in t.get_text()] == ["137 GiB \u2191"]
    unzoomed = plots.memory_curve([64, 128], [small, big], "seq_len").axes[0]
    assert not any("\u2191" in t.get_text() for t in unzoomed.texts)


def test_the_verdict_says_helped_no_change_or_worse_and_what_the_guards_found():
    from m3lab.use.evaluate import RetrievalScores, verdict

    def scores(mrr, empty=0.0, start=(0.1, 0.2)):
        return RetrievalScores("m", 50, 303, {"combined": mrr}, {}, empty, list(start))

    assert verdict(scores(0.40), scores(0.45), )[0] == "helped: combined MRR@10 0.400 -> 0.450 (+0.050) on 50 held-out queries"
    assert verdict(scores(0.40), scores(0.405))[0].startswith("no change:")
    worse = verdict(scores(0.40), scores(0.30, empty=0.9, start=(0.3, 0.1)))
    assert worse[0].startswith("worse:") and worse[1].startswith("to check:")
    assert worse[2].startswith("guard: 90% of the passages have all-zero sparse weights")
    same = verdict(scores(0.40), scores(0.40))
    assert any(line.startswith("guard: the fine-tuned dense vectors equal the base model's") for line in same)


def test_the_ledgers_bar_height_and_colour_come_from_the_same_figure(two_reports):
    """A bar is as tall as what the step needs of the card, and coloured by the verdict. Every figure drawn (bars, peak ticks, measured
    marks) lies inside an axis the reader sees, the tall ones in the upper band of a broken axis."""
    import dataclasses

    small, big = two_reports.values()
    huge = dataclasses.replace(big, peak_allocated_bytes=56 * 2**30, total_bytes=77 * 2**30)
    reports = {"small": small, "huge": huge}
    figure = plots.ledger(reports, measured={"small": small.peak_allocated_bytes})
    upper, lower = figure.axes[:2]
    bars = {round(p.get_height(), 6): p for ax in (upper, lower) for p in ax.patches}
    for report in reports.values():
        bar = bars[round(report.total_bytes / 2**30, 6)]
        colour = plots.VERDICT_COLOURS[report.kind]
        assert bar.get_facecolor()[:3] == pytest.approx(__import__("matplotlib").colors.to_rgb(colour))

    def seen(value):
        return any(ax.get_ylim()[0] <= value <= ax.get_ylim()[1] for ax in (upper, lower))

    for report in reports.values():
        assert seen(report.total_bytes / 2**30) and seen(report.peak_allocated_bytes / 2**30)
    # each figure written above everything drawn at its step, so no mark covers it
    for text, report in zip(sorted(upper.texts + lower.texts, key=lambda t: t.xy[0]), reports.values()):
        assert text.xy[1] >= max(report.total_bytes, report.peak_allocated_bytes) / 2**30


def test_a_cpu_ledger_does_not_call_its_axis_gpu_memory(two_reports):
    import dataclasses

    cpu = {k: dataclasses.replace(r, usable_bytes=0) for k, r in two_reports.items()}
    figure = plots.ledger(cpu)
    assert "GPU" not in figure.axes[0].get_ylabel() and "CPU" in figure.axes[0].get_ylabel()
    bars = plots.breakdown_bars(cpu, measured={"seq 64": 2**20}, measured_provenance="measured on CPU")
    assert bars.axes[0].get_ylabel() == "memory on the CPU at the peak (MiB)"  # a few MiB: not 0.00x GiB


@pytest.mark.parametrize("op, words", [("scatter.src (autograd MaxBackward0)", "the sparse head's max over the vocabulary"),
                                       ("scatter.src", "the sparse head's vocabulary-sized tensor"),
                                       ("native_layer_norm.default", "a layer norm"),
                                       ("_foreach_sqrt.default", "Adam's square roots"),
                                       ("embedding_dense_backward.default", "the word embeddings' gradient"),
                                       ("something_new.default", "the operation something_new.default")])
def test_where_a_step_peaks_is_said_in_words(op, words):
    from m3lab.predict.report import operation_in_words

    assert operation_in_words(op) == words
