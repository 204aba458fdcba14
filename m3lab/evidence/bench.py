"""How fast the predictor is: from a fresh shell, and warm, at full BGE-M3 size.

``python -m m3lab.evidence.bench`` prints how fast the machine is right now (a fixed pure-Python workload:
shared machines vary by a third from hour to hour); then, cold and warm side by side, the common
T4 advice predicted for a T4, with its ZeRO-1 JSON and without DeepSpeed: a fresh ``m3lab predict --
<command>`` process, the imports alone in a fresh process (DeepSpeed, FlagEmbedding, transformers:
what any use of them pays), the difference, the same work timed after the imports inside one fresh
process (the target: at most 3 s; medians of three interleaved rounds), and the same prediction in
a warm process; then one line per
configuration of a 17-point sweep (predicted peak, seconds, extrapolated or traced in full), and
the median and slowest time after the first call, and the median per method.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from m3lab.command import Rendering, render
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


# What the predictor imports before it can trace anything (a fresh process pays this whatever it
# does), in a process that then exits as `m3lab predict` does, without tearing the interpreter down
# (see cli.entry): so the difference is the prediction's own work
IMPORTS = "import os, deepspeed, transformers, FlagEmbedding.finetune.embedder.encoder_only.m3; os._exit(0)"


# The same imports, then `m3lab predict`'s own code timed from there to its end in that process:
# the prediction's work beyond the imports without the noise of a second process's imports
# (which alone vary by a second from run to run on this 2-core machine)
AFTER_IMPORTS = ("import os, sys, time, deepspeed, transformers, FlagEmbedding.finetune.embedder.encoder_only.m3\n"
                 "started = time.perf_counter()\n"
                 "from m3lab import cli\n"
                 "code = cli.main(sys.argv[1:])\n"
                 "sys.stdout.flush()\n"
                 "print(f'seconds after the imports: {time.perf_counter() - started}', file=sys.stderr, flush=True)\n"
                 "os._exit(code)")


def _fresh_process_seconds(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env=_quiet_env())
    return time.perf_counter() - started


def _seconds_after_imports(argv: list[str]) -> float:
    done = subprocess.run([sys.executable, "-c", AFTER_IMPORTS, *argv], check=True, capture_output=True, text=True,
                          env=_quiet_env())
    return float(done.stderr.rsplit("seconds after the imports: ", 1)[1])


def _quiet_env() -> dict:
    import os

    return {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}


# The two commands timed from a fresh shell: the common T4 advice with its ZeRO-1 JSON (its 5e8
# gradient bucket crossed: 2- and 3-layer copies with shrunken buckets, bounded), and the same
# without DeepSpeed (2 and 3 layers)
COLD_CASES = {"the common T4 advice (ZeRO-1)": {},
              "the common T4 advice without DeepSpeed (adamw_torch)": {"deepspeed_stage": None, "optim": "adamw_torch"}}


def cold_and_warm(rounds: int = 3) -> dict[str, dict[str, float]]:
    """For each of COLD_CASES, predicted for a T4: seconds from a fresh ``m3lab predict -- <command>``
    process, of the imports alone in a fresh process (the same round, interleaved), the median over
    ``rounds`` of the difference, and warm (this process, after its first prediction)."""
    results = {}
    for name, changes in COLD_CASES.items():
        config = TrainConfig.common_t4_advice(max_steps=100, **changes)
        json_path = str(_advice_json(config)) if config.deepspeed_stage is not None else None
        command = render(config, Rendering(deepspeed_json_path=json_path))
        arguments = ["predict", "--gpu", "t4", "--json", "--", *command]
        colds, imports, after = [], [], []
        for _ in range(rounds):
            colds.append(_fresh_process_seconds([sys.executable, "-m", "m3lab", *arguments]))
            imports.append(_fresh_process_seconds([sys.executable, "-c", IMPORTS]))
            after.append(_seconds_after_imports(arguments))
        predict(config, "t4")  # this process's first: imports, caches, workers if any
        started = time.perf_counter()
        predict(config, "t4")
        results[name] = {"cold": statistics.median(colds), "imports": statistics.median(imports),
                         "beyond_imports": statistics.median(c - i for c, i in zip(colds, imports)),
                         "after_imports": statistics.median(after), "warm": time.perf_counter() - started}
    return results


def _advice_json(advice: TrainConfig):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp(prefix="m3lab-bench-")) / "ds_stage1.json"
    path.write_text(advice.deepspeed_json())
    return path


def main() -> None:
    print(f"machine speed: the reference workload took {reference_seconds():.3f} s (smaller is faster)")
    for name, times in cold_and_warm().items():
        print(f"{name}, predicted for a T4, median of three: cold (a fresh `m3lab predict -- ...`) "
              f"{times['cold']:.1f} s, imports alone {times['imports']:.1f} s, {times['beyond_imports']:.1f} s "
              f"beyond them; timed after the imports in the same process {times['after_imports']:.2f} s "
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
