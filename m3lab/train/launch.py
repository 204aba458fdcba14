"""Launching the real FlagEmbedding M3 trainer with torchrun in a child process, and its result.

``train(config)`` checks the configuration and the data, writes the DeepSpeed JSON, runs
``torchrun -m m3lab.run_m3`` (FlagEmbedding's entry point plus the step recorder) and returns a
``TrainResult``: per-step loss, time and peak memory for every rank, or the OOM and where it hit.
The notebook kernel never trains, so an out-of-memory error cannot take it down.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from m3lab.command import Rendering, format_command, render
from m3lab.config import Hardware, TrainConfig
from m3lab.data.jsonl import load_jsonl, resolve_data_path
from m3lab.errors import ConfigError
from m3lab.gpus import GIB
from m3lab.io import write_json_atomic, write_text_atomic
from m3lab.standin import resolve_model
from m3lab.tensors import MEMORY_LIMIT_ENV
from m3lab.train.meter import METRICS_DIR_ENV
from m3lab.train.record import Event, Outcome, StepRecord
from m3lab.train.runner import OOM_EXIT_CODE

CHILD_MODULE = "m3lab.run_m3"
RUNS_DIR_ENV = "M3LAB_RUNS"


class TrainingFailed(RuntimeError):
    """The child process failed for a reason other than running out of memory."""

    def __init__(self, result: "TrainResult"):
        self.result = result
        super().__init__(
            f"Training failed (exit code {result.returncode}); full log: {result.log_path}\n"
            f"--- last lines of the log ---\n{result.log_tail()}"
        )


@dataclass
class RankResult:
    rank: int
    device: str = "unknown"
    total_params: int = 0
    trainable_params: int = 0
    model_bytes: int = 0
    steps: list[StepRecord] = field(default_factory=list)
    oom_step: int | None = None
    oom_message: str | None = None


@dataclass
class TrainResult:
    status: Outcome
    config: TrainConfig
    command: str
    run_dir: Path
    returncode: int
    wall_time_s: float
    ranks: list[RankResult]

    @property
    def log_path(self) -> Path:
        return self.run_dir / "train.log"

    @property
    def device(self) -> str:
        return self.ranks[0].device if self.ranks else "unknown"

    @property
    def provenance(self) -> str:
        """How to label these numbers in a table or a plot legend."""
        where = "CPU" if self.device == "cpu" else self.device
        return f"measured on {where}" + (" (tiny stand-in)" if "tiny-bge-m3" in self.command else "")

    @property
    def steps(self) -> list[StepRecord]:
        return self.ranks[0].steps if self.ranks else []

    @property
    def losses(self) -> list[float]:
        return [s.loss for s in self.steps if s.loss is not None]

    @property
    def peak_allocated_bytes(self) -> int:
        """The highest per-step peak on any rank."""
        return max((s.peak_allocated_bytes for r in self.ranks for s in r.steps), default=0)

    @property
    def oom_step(self) -> int | None:
        return next((r.oom_step for r in self.ranks if r.oom_step is not None), None)

    @property
    def oom_message(self) -> str | None:
        return next((r.oom_message for r in self.ranks if r.oom_message is not None), None)

    def optimizer_state_bytes(self, rank: int = 0) -> int:
        """Bytes of the optimizer's state tensors on ``rank`` after its last step."""
        steps = self.ranks[rank].steps
        return steps[-1].optimizer_state_bytes if steps else 0

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log was written)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def summary(self) -> str:
        if self.status is Outcome.OUT_OF_MEMORY:
            where = f"at step {self.oom_step}" if self.oom_step else "before the first step (loading the model)"
            return (f"OUT OF MEMORY {where} ({self.provenance}): "
                    f"{(self.oom_message or '').splitlines()[0][:300]}")
        gib = self.peak_allocated_bytes / GIB
        loss = f"loss {self.losses[0]:.4f} -> {self.losses[-1]:.4f}, " if self.losses else ""
        return (f"{self.status}: {len(self.steps)} steps, {loss}peak {gib:.3f} GiB per step "
                f"({self.provenance}), {self.wall_time_s:.0f} s")

    def error(self) -> str | None:
        """The exception the training process raised, as its log gives it ("RuntimeError: ...")."""
        import re

        for line in (self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []):
            found = re.search(r"\b(\w+(?:Error|Exception)): (.+)", line)
            if found and found.group(1) != "ChildFailedError":
                return f"{found.group(1)}: {found.group(2).strip()}"
        return None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["run_dir"] = str(self.run_dir)
        return data


def _new_run_dir(run_dir: str | os.PathLike | None, runs_root: str | os.PathLike | None = None) -> Path:
    if run_dir is None:
        root = Path(runs_root or os.environ.get(RUNS_DIR_ENV, "runs"))
        run_dir = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    run_dir = Path(run_dir).resolve()
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"{run_dir} already holds a run; m3lab never overwrites one. Pass a new "
                              "run_dir, or leave run_dir out to get a fresh timestamped folder.")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _torchrun() -> str:
    # The torchrun next to this interpreter, so the child uses the same environment.
    beside = Path(sys.executable).with_name("torchrun")
    return str(beside) if beside.exists() else (shutil.which("torchrun") or "torchrun")


def _read_ranks(run_dir: Path) -> list[RankResult]:
    ranks: dict[int, RankResult] = {}
    for path in sorted(run_dir.glob("metrics-rank*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            rank = ranks.setdefault(record["rank"], RankResult(record["rank"]))
            event = Event(record.pop("event"))
            record.pop("rank")
            if event is Event.START:
                rank.device = record["device"]
                rank.total_params = record["total_params"]
                rank.trainable_params = record["trainable_params"]
                rank.model_bytes = record["model_bytes"]
            elif event is Event.STEP:
                rank.steps.append(StepRecord(**record))
            elif event is Event.OOM:
                rank.oom_step, rank.oom_message = record["step"], record["message"]
    return [ranks[r] for r in sorted(ranks)]


def train(config: TrainConfig, run_dir: str | os.PathLike | None = None, *,
          runs_root: str | os.PathLike | None = None, memory_limit_bytes: int | None = None, timeout_s: float = 3600.0,
          hardware: Hardware | None = None) -> TrainResult:
    """Run FlagEmbedding's M3 trainer for ``config`` in a torchrun child and return what it measured.

    The run's files (command, DeepSpeed JSON, log, per-rank metrics, result.json, the model) go to
    ``run_dir``, which must be new or empty; without one, a fresh timestamped folder under
    ``runs_root`` (default ``$M3LAB_RUNS`` or ``./runs``).

    ``memory_limit_bytes`` caps the child's memory: on CUDA through
    ``torch.cuda.set_per_process_memory_fraction`` (to imitate a T4 on a bigger card), on CPU by
    raising ``torch.OutOfMemoryError`` once live tensors pass it. Raises ConfigError or DataError
    before launching anything when the configuration or the data is wrong, and TrainingFailed when
    the child fails for any reason but memory.
    """
    hardware = hardware or Hardware.detect()
    config.check(hardware)
    train_data = [str(resolve_data_path(p)) for p in config.train_data]
    for path in train_data:
        load_jsonl(path, knowledge_distillation=config.knowledge_distillation,
                   need_negatives=config.train_group_size > 1)
    run_dir = _new_run_dir(run_dir, runs_root)
    model_path = resolve_model(config.model)

    ds_path = None
    if config.deepspeed_stage is not None and config.deepspeed_config_file is None:
        ds_path = run_dir / config.deepspeed_file_name
        write_text_atomic(ds_path, config.deepspeed_json())
    elif config.deepspeed_config_file is not None:
        ds_path = Path(config.deepspeed_config_file).resolve()
    write_json_atomic(run_dir / "config.json", config.to_dict())

    argv = render(config.replace(train_data=train_data),
                  Rendering(str(run_dir / "model"), str(ds_path) if ds_path else None, model_path), CHILD_MODULE)
    argv[0] = _torchrun()
    if hardware.device == "cpu" and (config.bf16 or config.num_processes > 1):
        # HF refuses bf16 without a GPU unless told to run on the CPU (CPU autocast); and without it, several
        # processes on a CPU are as many independent runs (HF's parallel mode NOT_PARALLEL), not one
        # data-parallel run over gloo
        argv += ["--use_cpu", "True"]
    child_env = {METRICS_DIR_ENV: str(run_dir)}
    if memory_limit_bytes:
        child_env[MEMORY_LIMIT_ENV] = str(int(memory_limit_bytes))
    env = {**os.environ, **child_env, "TOKENIZERS_PARALLELISM": "false"}
    if Path(model_path).exists():
        env["HF_HUB_OFFLINE"] = "1"  # a local checkpoint needs no hub; don't wait on one
    # The child must import this m3lab even when it is not installed.
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    command = format_command(argv, child_env)
    write_text_atomic(run_dir / "command.sh", command + "\n")

    started = time.perf_counter()
    with (run_dir / "train.log").open("w") as log:
        child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=run_dir,
                                 start_new_session=True)
        try:
            returncode = child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            log.write(f"\nm3lab: killed after {timeout_s:.0f} s (timeout_s)\n")
            returncode = -signal.SIGKILL
    ranks = _read_ranks(run_dir)
    oom = any(r.oom_step is not None for r in ranks) or returncode == OOM_EXIT_CODE
    status = Outcome.OUT_OF_MEMORY if oom else (Outcome.RAN if returncode == 0 else Outcome.FAILED)
    result = TrainResult(status, config, command, run_dir, returncode, time.perf_counter() - started, ranks)
    write_json_atomic(run_dir / "result.json", result.to_dict())
    if status is Outcome.FAILED:
        raise TrainingFailed(result)
    return result


__all__ = ["train", "TrainResult", "RankResult", "StepRecord", "Outcome", "TrainingFailed", "ConfigError"]
