"""README's first command runs `m3lab run`; this runs the same job into a temporary folder."""

import json

import pytest

from m3lab.lessons.main_job import run_main_job

pytestmark = pytest.mark.slow


def test_main_job_writes_a_labelled_report(tmp_path, standin_dir):
    report = run_main_job(tmp_path, model="tiny-bge-m3", log=lambda *_: None)
    for name in ("report.md", "report.json", "memory.png", "optimizer_state.png", "loss.png", "token_lengths.png",
                 "predicted_t4.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "report.json").read_text())["model"] == "tiny-bge-m3"
    assert all(row["provenance"] == "measured on CPU (tiny stand-in)" for row in report["memory"])
    assert all(row["status"] == "ok" for row in report["memory"])
    by_label = {row["configuration"]: row for row in report["memory"]}
    assert by_label["ZeRO-1, 2 procs"]["optimizer_state_bytes_rank0"] == pytest.approx(
        by_label["ZeRO-1, 1 proc"]["optimizer_state_bytes_rank0"] / 2, rel=0.01)
    assert by_label["ZeRO-1 + grad ckpt"]["peak_allocated_gib"] < by_label["ZeRO-1, 1 proc"]["peak_allocated_gib"]
    losses = report["finetune"]["losses"]
    assert sum(losses[-5:]) < sum(losses[:5])
    assert "-m FlagEmbedding.finetune.embedder.encoder_only.m3" in report["copyable_command"]
    assert "tiny-bge-m3-" in report["copyable_command"]  # the stand-in's real folder, runnable as shown
    predicted = {row["configuration"]: row for row in report["predicted_t4"]}
    assert predicted["FlagEmbedding example (512)"]["verdict"].startswith("out of memory")
    assert all(row["provenance"] == "predicted for Tesla T4 (Colab)" for row in predicted.values())
    passage = next(s for s in report["token_lengths"] if s["field"] == "passage")
    assert passage["truncated_share"] > 0.1  # truncation at 392 tokens matters on this data
