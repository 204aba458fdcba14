"""The GPU check: the predictor held against ``torch.cuda.max_memory_allocated`` of real training steps.

Where a CUDA GPU is at hand::

    python -m m3lab.evidence.gpu_check --out DIR

builds the full-size stand-in (BGE-M3's shapes, random weights: memory depends on shapes, not
values, and nothing is downloaded), trains each configuration of ``checks("full")`` for three steps
with FlagEmbedding's own trainer under torchrun (``m3lab.train.launch``; several runs at a time, since
each process has its own peak counters), and writes ``DIR/gpu_check.json``: for every run the
measured peaks of each step on each rank, with the device, the versions, the date and the kernel
settings. A card other than a T4 imitates a T4's kernels: SDPA without its flash and cuDNN kernels
(so the memory-efficient one, as on a T4) and a T4's cuBLAS workspace size. Commit the file under
``data/measurements/``: ``tests/test_gpu_measurements.py`` then holds the predictor within 5% of it.

``--model tiny`` runs the tiny stand-in on a CPU, measuring live tensor bytes: how the script
itself is tested. ``m3lab.evidence.measurements`` reads the files and pairs each measured step with its prediction.

``--model full-cpu`` is full-size truth without a GPU (opt-in, about 15 minutes and 16 GB of RAM):
the full-size stand-in trained for real on this CPU in a handful of configurations that fit 24 GiB
(short texts, ZeRO-0, ZeRO-1 and no DeepSpeed, ``adamw_torch`` and ``adamw_torch_fused``,
checkpointing on and off, ``sub_batch_size``, LoRA; fp32 only, see ``checks``), one run at a time, measured with the same live-tensor meter as the tiny runs.
Committed under ``data/measurements/``, the normal suite holds fresh CPU predictions within 2% of it.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from m3lab.config import TrainConfig
from m3lab.evidence import measurements
from m3lab.gpus import GIB, gpu_profile, is_t4
from m3lab.io import write_json_atomic, write_jsonl_atomic
from m3lab.plan import ledger
from m3lab.train.meter import SDPA_KERNEL_ENV
from m3lab.train.record import Outcome

STEPS = 3  # a step skipped by fp16 loss scaling (no optimizer states yet) still leaves two to compare
# HF's fp16 AMP (no DeepSpeed) starts its GradScaler at 2**16 and halves it per overflow: on the H200
# (2026-11-30) it skipped all of 3 steps, so those runs get more; a step there takes under half a second
AMP_STEPS = 10
# A T4's cuBLAS workspace (PyTorch's default below sm90). PyTorch takes it from the caching
# allocator, so it counts in max_memory_allocated; a Hopper card's default is about four times larger.
T4_CUBLAS_WORKSPACE_CONFIG = ":4096:2:16:8"


@dataclass(frozen=True)
class Check:
    name: str
    config: TrainConfig
    # Cap the run's allocator at what a T4 leaves it (usable minus the CUDA context estimate), to
    # see the OOM or the fit that the verdict predicts; False: no cap, the peak is measured whole.
    t4_budget: bool = False
    alone: bool = False  # run with nothing beside it (it needs most of the card)
    steps: int = STEPS


# ``m3lab fit --platform colab-t4 --lora`` on the series' sample (tests/test_gpu_measurements.py holds it to the fit)
LORA_ANSWER = TrainConfig(train_group_size=11, query_max_len=32, passage_max_len=2704, pad_to_multiple_of=8,
                          per_device_train_batch_size=1,
                          fp16=True, gradient_checkpointing=True, use_self_distill=True, efficient_sparse_head=True,
                          deepspeed_stage=None, optim="adamw_torch_fused", use_lora=True, learning_rate=1e-4)

# What notebook 07 runs: two configurations, a few minutes on a T4; the tiny stand-in's two on a CPU
NOTEBOOK_CHECKS = {"full": ["advice, fix_encoder on", "advice (ZeRO-1)"],
                   "tiny": ["tiny: ZeRO-1 + gradient checkpointing", "tiny: fix_encoder, ZeRO-0"]}


def checks(model: str = "full") -> list[Check]:
    """The configurations the check trains, most informative first (a time budget cuts the tail)."""
    if model == "full-cpu":
        # short texts and a group of 2 keep a full-size step to seconds on a CPU; fp32 (or bf16
        # autocast without DeepSpeed), as a CPU trains
        base = TrainConfig(train_group_size=2, query_max_len=16, passage_max_len=32, per_device_train_batch_size=1,
                           learning_rate=1e-5, unified_finetuning=True, use_self_distill=True, deepspeed_stage=0)
        plain = base.replace(deepspeed_stage=None)
        return [Check("full size, ZeRO-0, fp32", base),
                Check("full size, ZeRO-1, fp32", base.replace(deepspeed_stage=1)),
                Check("full size, ZeRO-1, fp32, gradient checkpointing", base.replace(deepspeed_stage=1,
                                                                                     gradient_checkpointing=True)),
                Check("full size, no DeepSpeed, fp32, adamw_torch", plain),
                Check("full size, no DeepSpeed, fp32, adamw_torch_fused", plain.replace(optim="adamw_torch_fused")),
                # No bf16 autocast run: on a CPU the live-tensor meter (a TorchDispatchMode) makes autocast
                # keep one fp32 copy of every parameter that an unmetered run does not hold (found with gc
                # on the tiny stand-in), so it cannot measure autocast; GPU runs use the CUDA counters.
                Check("full size, no DeepSpeed, fp32, sub_batch_size 1", plain.replace(sub_batch_size=1)),
                # LoRA (m3lab.train.lora) at FlagEmbedding's rank 64: the encoder frozen, the adapter and both heads trained
                Check("full size, ZeRO-1, fp32, LoRA, gradient checkpointing",
                      base.replace(deepspeed_stage=1, use_lora=True, gradient_checkpointing=True)),
                Check("full size, no DeepSpeed, fp32, LoRA", plain.replace(use_lora=True))]
    if model == "tiny":
        base = TrainConfig(model="tiny-bge-m3", train_group_size=4, query_max_len=32, passage_max_len=64,
                           per_device_train_batch_size=2, learning_rate=1e-4, deepspeed_stage=1,
                           reduce_bucket_size=1_000_000, use_self_distill=True, gradient_checkpointing=True)
        return [Check("tiny: ZeRO-1 + gradient checkpointing", base),
                Check("tiny: fix_encoder, ZeRO-0", base.replace(fix_encoder=True, deepspeed_stage=0))]
    advice = TrainConfig.common_t4_advice()
    # torch's AdamW: the GPU machine's DeepSpeed is built without its CUDA ops (no FusedAdam)
    example = TrainConfig.upstream_example(torch_adam=True)
    return [
        Check("advice, fix_encoder on", advice.replace(fix_encoder=True)),
        Check("advice (ZeRO-1)", advice),
        Check("advice, ZeRO-0", advice.replace(deepspeed_stage=0)),
        Check("advice, no gradient checkpointing", advice.replace(gradient_checkpointing=False)),
        Check("advice, no DeepSpeed (HF fp16 AMP, adamw_torch)", advice.replace(deepspeed_stage=None),
              steps=AMP_STEPS),
        # where the series' path stands after lesson 04 (and 05, 06): what it tells a T4 user to run
        Check("path after lesson 04 (no DeepSpeed, adamw_torch_fused)", ledger.after("04"), steps=AMP_STEPS),
        Check("example at passage 512", example),
        Check("advice + efficient sparse head + grad cache", advice.replace(efficient_sparse_head=True,
                                                                             grad_cache_chunk_size=1)),
        Check("advice (ZeRO-1), T4 budget", advice, t4_budget=True),
        Check("example at passage 512, T4 budget", example, t4_budget=True),
        Check("path after lesson 04, T4 budget", ledger.after("04"), t4_budget=True, steps=AMP_STEPS),
        Check("example at passage 8192", example.replace(passage_max_len=8192), alone=True),
        # what the lessons now recommend, each under a T4's budget: lesson 07's path (8-bit AdamW, 768-token
        # passages) and lesson 08's goal (8,192/512 tokens, group 8, m3lab's levers)
        Check("path after lesson 07, T4 budget", ledger.after("07"), t4_budget=True, steps=AMP_STEPS),
        Check("lesson 08's goal, T4 budget", ledger.after("08"), t4_budget=True, steps=AMP_STEPS),
        # lesson 09's answer for free Colab on the series' sample: LoRA at rank 64, groups of 11 at 32/2,704 tokens
        Check("LoRA answer, T4 budget", LORA_ANSWER, t4_budget=True, steps=AMP_STEPS),
    ]


# ---- the data: every text longer than its max length --------------------------------------------
def long_data(path: Path, tokenizer_dir: Path, query_tokens: int, passage_tokens: int, rows: int = 40) -> Path:
    """Training rows whose texts all exceed the max lengths, so every batch has the predicted shape.

    Real runs pad a batch to its longest text; the predictor assumes full-length batches.
    """
    from transformers import AutoTokenizer

    from m3lab.data.jsonl import load_jsonl
    from m3lab.data.sample import DATA_DIR

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    lengths: dict[str, int] = {}

    def stretch(text: str, tokens: int) -> str:
        if text not in lengths:
            lengths[text] = max(1, len(tokenizer(text, add_special_tokens=False)["input_ids"]))
        return " ".join([text] * (math.ceil(tokens / lengths[text]) + 1))

    out = []
    for row in load_jsonl(DATA_DIR / "train.jsonl")[:rows]:
        out.append({"query": stretch(row["query"], query_tokens),
                    "pos": [stretch(t, passage_tokens) for t in row["pos"]],
                    "neg": [stretch(t, passage_tokens) for t in row["neg"]]})
    write_jsonl_atomic(path, out)
    return path


# ---- running ---------------------------------------------------------------------------------------
def _environment(cuda: bool) -> dict:
    import importlib.metadata as metadata

    import torch

    versions = {}
    for name in ("transformers", "deepspeed", "FlagEmbedding", "accelerate", "tokenizers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    env = {"torch": torch.__version__, "python": sys.version.split()[0], "versions": versions,
           "date": time.strftime("%Y-%m-%d"), "device": "cpu", "cpu": _cpu_name(), "cpu_count": os.cpu_count()}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, device_total_bytes=props.total_memory, cuda=torch.version.cuda,
                   compute_capability=f"{props.major}.{props.minor}",
                   kernels={SDPA_KERNEL_ENV: os.environ.get(SDPA_KERNEL_ENV),
                            "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG")})
    return env


def _imitate_t4() -> None:
    """The child processes inherit these: T4 kernels (no flash or cuDNN attention), T4 workspace."""
    os.environ[SDPA_KERNEL_ENV] = "efficient"
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = T4_CUBLAS_WORKSPACE_CONFIG


def _run_one(check: Check, data: Path, model_dir: Path, runs: Path, deadline: float, model_name: str,
             alone: bool) -> dict:
    from m3lab.train.launch import TrainingFailed, train

    record = {"name": check.name, "t4_budget": check.t4_budget, "alone": alone,
              "config": check.config.replace(model=model_name, train_data=[data.name], max_steps=check.steps).to_dict()}
    remaining = deadline - time.monotonic()
    if remaining < (150 if check.alone else 60):
        return {**record, "status": Outcome.SKIPPED, "reason": "time budget spent"}
    t4 = gpu_profile("t4")
    limit = t4.usable_bytes - t4.context_bytes if check.t4_budget else None
    config = check.config.replace(model=str(model_dir), train_data=[str(data)], max_steps=check.steps)
    try:
        result = train(config, runs / check.name.replace(" ", "_").replace(",", "").replace("/", "-"),
                       memory_limit_bytes=limit, timeout_s=remaining)
    except TrainingFailed as error:
        return {**record, "status": Outcome.FAILED, "returncode": error.result.returncode,
                "log_tail": error.result.log_tail(60)}
    except Exception as error:  # a refused configuration or data must not cost the other runs
        return {**record, "status": Outcome.FAILED, "reason": f"{type(error).__name__}: {error}"[:2000]}
    shutil.rmtree(result.run_dir / "model", ignore_errors=True)  # the trained weights are not wanted
    return {**record, "status": result.status, "memory_limit_bytes": limit, "wall_time_s": round(result.wall_time_s, 1),
            "oom_step": result.oom_step, "oom_message": (result.oom_message or "")[:500] or None,
            "ranks": [{"rank": r.rank, "device": r.device, "trainable_params": r.trainable_params,
                       "steps": [asdict(s) for s in r.steps]}
                      for r in result.ranks]}


def _cpu_name() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(out: Path, model: str = "full", only: list[str] | None = None, parallel: int = 3,
        budget_s: float = 420.0, predict: bool = True) -> dict:
    """Train every check, write ``out/gpu_check.json`` (rewritten after each run) and return it."""
    import torch

    from m3lab.standin import FULL_SIZE_STANDIN, STANDIN, full_size_path, standin_path

    started = time.monotonic()
    deadline = started + budget_s
    cuda = torch.cuda.is_available()
    if model == "full" and not cuda:
        raise SystemExit("The full-size check needs a CUDA GPU; on a CPU run `--model full-cpu` or `--model tiny`.")
    if model == "full-cpu" and cuda:
        raise SystemExit("`--model full-cpu` measures CPU runs; on this GPU machine run `--model full`.")
    real_t4 = cuda and is_t4(torch.cuda.get_device_name(0))
    if cuda and not real_t4:
        _imitate_t4()
    # On a T4 the card itself is the budget: the capped runs would repeat the uncapped ones
    selected = [c for c in checks(model) if (not only or c.name in only) and not (real_t4 and c.t4_budget)]
    unknown = set(only or ()) - {c.name for c in checks(model)}
    if unknown:
        raise SystemExit(f"unknown check(s) {sorted(unknown)}; choose from {[c.name for c in checks(model)]}")
    out.mkdir(parents=True, exist_ok=True)
    # The checkpoint, the data and the runs' folders: large, and not results
    work = Path(os.environ.get("M3LAB_GPU_CHECK_WORK", Path(tempfile.gettempdir()) / "m3lab-gpu-check"))
    model_dir = full_size_path(work) if model.startswith("full") else standin_path()
    model_name = FULL_SIZE_STANDIN if model.startswith("full") else STANDIN
    report = {"format": measurements.FORMAT, **_environment(cuda), "model": model_name, "steps": STEPS,
              "predict_with_gpu": "t4" if cuda else None, "runs": []}
    report["provenance"] = str(measurements.Provenance.of_device(report["device"] if cuda else None,
                                                                 imitating_t4=cuda and not real_t4))
    print(f"gpu_check: {report['provenance']}, torch {report['torch']}; model ready after "
          f"{time.monotonic() - started:.0f} s", flush=True)

    datasets: dict[tuple[int, int], Path] = {}
    for check in selected:
        key = (check.config.query_max_len, check.config.passage_max_len)
        if key not in datasets:
            datasets[key] = long_data(work / f"long-q{key[0]}-p{key[1]}.jsonl", model_dir, *key)
    runs_dir = work / "runs"
    if runs_dir.exists():
        shutil.rmtree(runs_dir)

    def launch(check: Check) -> dict:
        key = (check.config.query_max_len, check.config.passage_max_len)
        alone = check.alone or parallel <= 1
        record = _run_one(check, datasets[key], model_dir, runs_dir, deadline, model_name, alone)
        print(_line(record), flush=True)
        return record

    together = [c for c in selected if not c.alone]
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        for record in pool.map(launch, together):
            report["runs"].append(record)
            write_json_atomic(out / "gpu_check.json", report)
    for check in (c for c in selected if c.alone):
        report["runs"].append(launch(check))
        write_json_atomic(out / "gpu_check.json", report)

    if predict:
        _add_predictions(report, out / "gpu_check.json", deadline)
    report["wall_time_s"] = round(time.monotonic() - started, 1)
    write_json_atomic(out / "gpu_check.json", report)
    return report


def _line(record: dict) -> str:
    """A run as the log prints it."""
    if record["status"] != Outcome.RAN:
        why = record.get("reason") or record.get("oom_message") or (record.get("log_tail") or "")[-300:]
        return f"{record['name']:48} {record['status']}: {why}"
    steps = record["ranks"][0]["steps"]
    peaks = ", ".join(f"{s['peak_allocated_bytes'] / GIB:.3f}" for s in steps)
    line = (f"{record['name']:48} {Outcome.RAN}: peak allocated per step {peaks} GiB, measured on "
            f"{record['ranks'][0]['device']} ({record['wall_time_s']} s)")
    outside = measurements.outside_allocator_bytes(measurements.parse_run(record))
    if outside is not None:
        line += f"; outside the allocator (CUDA context, workspaces): {outside / GIB:.2f} GiB"
    return line


def _add_predictions(report: dict, path: Path, deadline: float) -> None:
    """Predictions made beside the measurements (same torch), for the log; the tests predict anew."""
    file = measurements.load(path)
    for record, run in zip(report["runs"], file.runs):
        if run.outcome is not Outcome.RAN or time.monotonic() > deadline:
            continue
        try:
            rows = measurements.compare(file, [run])
        except Exception as error:  # a predictor failure must not lose the measurements
            record["predicted_here"] = f"failed: {type(error).__name__}: {str(error)[:300]}"
            continue
        record["predicted_here"] = [row.to_dict() for row in rows]
        for row in rows:
            print(row.describe(), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m3lab.evidence.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    parser.add_argument("--model", choices=("full", "full-cpu", "tiny"), default="full",
                        help="full: the full-size stand-in on a GPU; full-cpu: on this CPU (opt-in, ~15 min, "
                             "run with --parallel 1); tiny: the tiny stand-in on a CPU")
    parser.add_argument("--only", action="append", help="run only this check (repeatable)")
    parser.add_argument("--parallel", type=int, default=3, help="runs at a time (each has its own peak counters)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no run after this many seconds")
    parser.add_argument("--no-predict", dest="predict", action="store_false",
                        help="measure only (the tests predict from the committed file anyway)")
    args = parser.parse_args(argv)
    report = run(args.out, args.model, args.only, args.parallel, args.budget_s, args.predict)
    done = sum(r["status"] in (Outcome.RAN, Outcome.OUT_OF_MEMORY) for r in report["runs"])
    print(f"gpu_check: {done} of {len(report['runs'])} runs finished in {report['wall_time_s']} s; "
          f"wrote {args.out / 'gpu_check.json'}")
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
