"""The main job: check the data, measure real training runs, fine-tune, and write a report.

``m3lab run`` (or ``python -m m3lab``) writes ``results/``: ``report.md`` with the tables,
``memory.png``, ``optimizer_state.png``, ``loss.png``, ``token_lengths.png``, ``predicted_t4.png``
and ``report.json``.
With no GPU it uses the tiny stand-in on CPU; with a CUDA GPU and hub access, BAAI/bge-m3.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path

from m3lab.command import shell_command
from m3lab.config import Hardware, TrainConfig
from m3lab.data.jsonl import (
    load_jsonl,
    resolve_data_path,
    token_length_stats,
    token_lengths,
)
from m3lab.gpus import GIB, gpu_profile
from m3lab.io import write_json_atomic, write_text_atomic
from m3lab.lessons import plots
from m3lab.predict import predict
from m3lab.standin import REAL_MODEL, STANDIN, resolve_model
from m3lab.train.launch import TrainResult, train


@dataclass
class Experiment:
    label: str
    config: TrainConfig


def experiments(model: str, on_gpu: bool) -> tuple[list[Experiment], TrainConfig]:
    """The memory comparisons and the fine-tuning run of the main job."""
    if on_gpu:
        base = TrainConfig.common_t4_advice(model=model, max_steps=3)
        finetune = base.replace(max_steps=60)
    else:
        # Stand-in sizes; a small DeepSpeed bucket keeps ZeRO's gradient buffer from dwarfing the
        # tiny model (the default 5e8-element bucket alone would be 1.9 GiB in fp32).
        base = TrainConfig(model=model, train_group_size=4, query_max_len=64, passage_max_len=256,
                           per_device_train_batch_size=2, max_steps=3, learning_rate=1e-4,
                           deepspeed_stage=1, reduce_bucket_size=1_000_000, use_self_distill=True)
        finetune = base.replace(max_steps=40, gradient_checkpointing=True, learning_rate=2e-4)
    two = base.replace(num_processes=2, negatives_cross_device=True)
    runs = [
        Experiment("ZeRO-0, 1 proc", base.replace(deepspeed_stage=0)),
        Experiment("ZeRO-1, 1 proc", base),
        Experiment("ZeRO-1 + grad ckpt", base.replace(gradient_checkpointing=True)),
        Experiment("ZeRO-0, 2 procs", two.replace(deepspeed_stage=0)),
        Experiment("ZeRO-1, 2 procs", two),
    ]
    if on_gpu and Hardware.detect().gpu_count < 2:
        runs = [r for r in runs if r.config.num_processes == 1]
    return runs, finetune


def predict_t4_table() -> list[dict]:
    """FlagEmbedding's example and the common T4 advice, predicted for a T4 at full size."""
    configs = [
        ("FlagEmbedding example (512)", TrainConfig.upstream_example()),
        ("T4 advice (ZeRO-1)", TrainConfig.common_t4_advice()),
        ("T4 advice, ZeRO-0", TrainConfig.common_t4_advice(deepspeed_stage=0)),
        ("T4 advice + fix_encoder", TrainConfig.common_t4_advice(fix_encoder=True)),
    ]
    rows = []
    for label, config in configs:
        report = predict(config, "t4")
        rows.append({"configuration": label, "peak_allocated_gib": round(report.peak_allocated_bytes / GIB, 2),
                     "needs_gib": round(report.total_bytes / GIB, 2), "verdict": report.verdict,
                     "peak_in": f"{report.peak_phase} ({report.peak_op})", "provenance": report.provenance})
    return rows


def _row(label: str, result: TrainResult) -> dict:
    return {
        "configuration": label,
        "status": result.status,
        "processes": result.config.num_processes,
        "peak_allocated_gib": round(result.peak_allocated_bytes / GIB, 4),
        "optimizer_state_bytes_rank0": result.optimizer_state_bytes(0) if result.steps else None,
        "fp32_master_bytes_rank0": result.steps[-1].fp32_master_bytes if result.steps else None,
        "trainable_params": result.ranks[0].trainable_params if result.ranks else None,
        "provenance": result.provenance,
    }


def _markdown_table(rows: list[dict]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if row[h] is None else str(row[h]) for h in header) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Section:
    """What one part of the main job found: its rows for report.json and its text for report.md."""

    rows: list[dict]
    markdown: str


def _data(out_dir: Path, model: str, log) -> Section:
    """The data checked, and its token lengths with the model's own tokenizer."""
    from transformers import AutoTokenizer

    records = load_jsonl(resolve_data_path("data/train.jsonl"))
    held_out = load_jsonl(resolve_data_path("data/eval.jsonl"))
    log(f"data: {len(records)} training and {len(held_out)} held-out queries, all lines valid")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    stats = token_length_stats(records, tokenizer, query_max_len=64, passage_max_len=392)
    passages = list(dict.fromkeys(t for r in records for t in r["pos"] + r["neg"]))
    plots.token_length_histogram(
        {"query": token_lengths([r["query"] for r in records], tokenizer).tolist(),
         "passage": token_lengths(passages, tokenizer).tolist()},
        out_dir / "token_lengths.png", max_lens={"query": 64, "passage": 392}, tokenizer_name=model)
    rows = [{k: round(v, 3) if isinstance(v, float) else v for k, v in s.as_row().items()} for s in stats]
    return Section(rows, "## Token lengths (training data)\n\n" + _markdown_table(rows))


def _measured(out_dir: Path, model: str, runs: list[Experiment], log) -> tuple[Section, str]:
    """Each configuration trained for real, its peak memory and optimizer state; and their provenance."""
    rows, results = [], []
    for experiment in runs:
        log(f"training: {experiment.label} ...")
        result = train(experiment.config, runs_root=out_dir / "runs")
        results.append(result)
        rows.append(_row(experiment.label, result))
        log(f"  {result.summary()}")
    provenance = results[0].provenance
    labels = [r["configuration"] for r in rows]
    plots.memory_bars(labels, [r["peak_allocated_gib"] * GIB for r in rows], provenance, out_dir / "memory.png",
                      title=f"Peak memory of one training step ({model})")
    plots.memory_bars(labels, [r["optimizer_state_bytes_rank0"] or 0 for r in rows], provenance,
                      out_dir / "optimizer_state.png", title="AdamW state held by rank 0 (real DeepSpeed)",
                      ylabel="optimizer state on rank 0 (GiB)")
    markdown = ("## Memory of one training step\n\n" + _markdown_table(rows)
                + "\n\n![memory](memory.png)\n\n![optimizer state](optimizer_state.png)")
    return Section(rows, markdown), provenance


def _finetuned(out_dir: Path, model: str, config: TrainConfig, log) -> TrainResult:
    log(f"fine-tuning {model} for {config.max_steps} steps ...")
    result = train(config, runs_root=out_dir / "runs")
    log(f"  {result.summary()}")
    plots.loss_curve(result, out_dir / "loss.png", title=f"Fine-tuning {model} with FlagEmbedding's M3 trainer")
    return result


def _predicted(out_dir: Path, log) -> Section:
    log("predicting full-size BGE-M3 on a Tesla T4 ...")
    rows = predict_t4_table()
    plots.memory_bars([r["configuration"] for r in rows], [r["peak_allocated_gib"] * GIB for r in rows],
                      "predicted for Tesla T4 (Colab): peak allocated", out_dir / "predicted_t4.png",
                      title="Full-size BGE-M3, one training step on a T4 (predicted)",
                      usable_bytes=gpu_profile("t4").usable_bytes, usable_label="T4 usable memory")
    markdown = ("## Full-size BGE-M3 on a T4, predicted\n\nPredicted by tracing the real training step on fake "
                "tensors, with PyTorch's caching allocator simulated under the card's limit (`m3lab.predict`); "
                "the CUDA context is an estimate.\n\n" + _markdown_table(rows) + "\n\n![predicted](predicted_t4.png)")
    return Section(rows, markdown)


def run_main_job(out_dir: str | Path = "results", model: str = "auto", log=print) -> dict:
    """Everything ``m3lab run`` does; returns what it wrote into report.json."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hardware = Hardware.detect()
    on_gpu = hardware.device == "cuda"
    model = (REAL_MODEL if on_gpu else STANDIN) if model == "auto" else model
    where = hardware.gpu_name if on_gpu else "CPU"
    log(f"m3lab main job: model {model} on {where} ({hardware.gpu_count} GPU(s)), Python {platform.python_version()}")
    data = _data(out_dir, model, log)
    runs, finetune_config = experiments(model, on_gpu)
    measured, provenance = _measured(out_dir, model, runs, log)
    finetune = _finetuned(out_dir, model, finetune_config, log)
    predicted = _predicted(out_dir, log)
    report = {
        "model": model, "device": where, "provenance": provenance, "token_lengths": data.rows,
        "predicted_t4": predicted.rows, "memory": measured.rows,
        "finetune": {"losses": finetune.losses, "command": finetune.command, "summary": finetune.summary()},
        "copyable_command": shell_command(finetune_config), "deepspeed_json": finetune_config.deepspeed_json(),
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(out_dir / "report.json", report)
    peak = "of `torch.cuda.max_memory_allocated`." if on_gpu else "of live tensor bytes in the training process."
    write_text_atomic(out_dir / "report.md", "\n\n".join([
        f"# m3lab report: {model} on {where}",
        f"All memory figures are {provenance}. Peak = highest per-step peak " + peak,
        data.markdown, measured.markdown, predicted.markdown,
        f"## Fine-tuning\n\n{finetune.summary()}\n\n![loss](loss.png)",
        "## The same run, as a command to copy\n\n```bash\n" + shell_command(finetune_config) + "\n```",
        "With the DeepSpeed JSON (`ds_stage1.json`):\n\n```json\n" + (finetune_config.deepspeed_json() or "") + "```",
    ]) + "\n")
    log(f"wrote {out_dir}/report.md and plots in {report['wall_time_s']:.0f} s")
    return report
