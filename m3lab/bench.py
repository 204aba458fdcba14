"""How fast the predictor is: from a fresh shell, and warm, at full BGE-M3 size.

``python -m m3lab.bench`` prints how fast the machine is right now (a fixed pure-Python workload:
shared machines vary by a third from hour to hour); then, cold and warm side by side, the common
T4 advice (ZeRO-1) predicted for a T4: a fresh ``m3lab predict -- <command>`` process, the imports
alone in a fresh process (DeepSpeed, FlagEmbedding, transformers: what any use of them pays), the
difference (the target: at most 3 s), and the same prediction in a warm process; then one line per
configuration of a 17-point sweep (predicted peak, seconds, extrapolated or traced in full), and
the median and slowest time after the first call, and the median per method.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from m3lab.config import TrainConfig
from m3lab.predict import GIB, predict


def sweep() -> list[tuple[str, TrainConfig]]:
    advice_zero0 = TrainConfig.common_t4_advice(deepspeed_stage=0)
    points = [(f"advice, ZeRO-0, passage {p}", advice_zero0.replace(passage_max_len=p))
              for p in (128, 256, 392, 512, 1024, 2048)]
    points += [(f"advice, ZeRO-0, group {g}", advice_zero0.replace(train_group_size=g)) for g in (2, 4)]
    advice = TrainConfig.common_t4_advice()
    points += [(f"advice (ZeRO-1), passage {p}", advice.replace(passage_max_len=p)) for p in (256, 392, 512, 1024)]
    points += [
               ("advice, fix_encoder", TrainConfig.common_t4_advice(fix_encoder=True)),
               ("advice, ZeRO-1 + offload", TrainConfig.common_t4_advice(offload_optimizer=True)),
               ("advice, Kaggle 2 x T4", TrainConfig.common_t4_advice(num_processes=2)),
               ("advice, ZeRO-0, Kaggle 2 x T4", advice_zero0.replace(num_processes=2))]
    # issue 5's goal: every parameter trained at 8,192/512 tokens, group 8, with m3lab's levers
    goal = advice.replace(query_max_len=512, passage_max_len=8192, train_group_size=8, efficient_sparse_head=True,
                          grad_cache_chunk_size=1, deepspeed_stage=None, optim="adamw_bnb_8bit")
    points += [("the goal (grad cache, 8-bit AdamW)", goal)]
    return points


def reference_seconds() -> float:
    """Seconds for a fixed pure-Python workload (calls, dicts, tuples: what fake-tensor dispatch is
    made of), best of three: how fast this machine is right now, to read the timings against."""
    def work() -> int:
        table: dict[tuple[int, int], int] = {}
        for i in range(1_000_000):
            key = (i % 997, i % 13)
            table[key] = table.get(key, 0) + len(str(i))
        return len(table)

    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


# What the predictor imports before it can trace anything (a fresh process pays this whatever it does)
IMPORTS = "import deepspeed, transformers, FlagEmbedding.finetune.embedder.encoder_only.m3"


def _fresh_process_seconds(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env=_quiet_env())
    return time.perf_counter() - started


def _quiet_env() -> dict:
    import os

    return {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}


def cold_and_warm() -> dict[str, float]:
    """Seconds for the advice's prediction from a fresh process, its imports alone, and warm."""
    advice = TrainConfig.common_t4_advice(max_steps=100)
    command = advice.command(deepspeed_json_path=str(_advice_json(advice)))
    cold = _fresh_process_seconds([sys.executable, "-m", "m3lab", "predict", "--gpu", "t4", "--json", "--", *command])
    imports = _fresh_process_seconds([sys.executable, "-c", IMPORTS])
    predict(advice, "t4")  # this process's first: imports, caches, workers if any
    started = time.perf_counter()
    predict(advice, "t4")
    return {"cold": cold, "imports": imports, "beyond_imports": cold - imports, "warm": time.perf_counter() - started}


def _advice_json(advice: TrainConfig):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp(prefix="m3lab-bench-")) / "ds_stage1.json"
    path.write_text(advice.deepspeed_json())
    return path


def main() -> None:
    print(f"machine speed: the reference workload took {reference_seconds():.3f} s (smaller is faster)")
    times = cold_and_warm()
    print(f"the common T4 advice (ZeRO-1), predicted for a T4: cold (a fresh `m3lab predict -- ...`) "
          f"{times['cold']:.1f} s = imports {times['imports']:.1f} s + {times['beyond_imports']:.1f} s beyond them "
          f"(target: 3 s); warm {times['warm']:.1f} s", flush=True)
    timings, methods = [], []
    print(f"{'configuration':36} {'peak GiB':>9} {'seconds':>8}  method")
    for name, config in sweep():
        started = time.perf_counter()
        report = predict(config, "t4x2" if config.num_processes == 2 else "t4")
        seconds = time.perf_counter() - started
        timings.append(seconds)
        methods.append(report.method)
        print(f"{name:36} {report.peak_allocated_bytes / GIB:9.2f} {seconds:8.2f}  {report.method}", flush=True)
    after_first = timings[1:]
    print(f"after the first call: median {statistics.median(after_first):.2f} s, "
          f"slowest {max(after_first):.2f} s per configuration (target: 3 s)")
    by_method: dict[str, list[float]] = {}
    for (name, _), seconds, method in zip(sweep()[1:], after_first, methods[1:]):
        by_method.setdefault(method, []).append(seconds)
    for method, seconds in by_method.items():
        print(f"  {method}: median {statistics.median(seconds):.2f} s over {len(seconds)}")


if __name__ == "__main__":
    main()
