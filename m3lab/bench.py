"""How fast the predictor is: a 17-point sweep at full BGE-M3 size, seconds per configuration.

``python -m m3lab.bench`` prints how fast the machine is right now (a fixed pure-Python workload:
shared machines vary by a third from hour to hour), one line per configuration (predicted peak
for a T4, seconds, and whether the step was extrapolated from shallow traces or traced layer by
layer), then the median and the slowest time after the first call, which pays for imports and
caches (and starts the two worker processes that trace shallow copies side by side), and the
median per method.
"""

from __future__ import annotations

import statistics
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


def main() -> None:
    print(f"machine speed: the reference workload took {reference_seconds():.3f} s (smaller is faster)")
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
