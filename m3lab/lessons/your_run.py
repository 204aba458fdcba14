"""The learner's run, from the lesson: where it keeps its files, the command for this machine, and
running it with its progress in the notebook.

On Colab or Kaggle the command is the answer's resume command as printed (``Answer.resume_command``):
the same command serves every session, the first included, since it goes on from the newest
checkpoint or starts from the beginning when there is none. On a machine without a GPU (CI, a
laptop) the same command trains the offline stand-in for a few steps at small lengths, in fp32 and
on the CPU: the environment picks sizes, the cells are the same.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from m3lab import command as commands
from m3lab.lessons import Environment
from m3lab.standin import resolve_model

COLAB_DRIVE = "/content/drive"
KAGGLE_WORKING = "/kaggle/working"
CPU_OUTPUT_DIR = "results/your-run"  # on a machine without a GPU: beside the lesson, not on a platform's disk
CPU_SIZES = dict(query_max_len=32, passage_max_len=128, per_device_train_batch_size=1)


def platform_here() -> str | None:
    """"colab-t4" on Colab, "kaggle-t4x2" on Kaggle, None elsewhere."""
    if Path(KAGGLE_WORKING).is_dir():
        return "kaggle-t4x2"
    if "google.colab" in sys.modules or Path("/content").is_dir() and os.environ.get("COLAB_RELEASE_TAG"):
        return "colab-t4"
    return None


def keep_outputs(platform: str | None) -> str:
    """Make the run's folder outlive the session where the platform needs it: Drive mounted on Colab,
    /kaggle/working checked on Kaggle; says what it did."""
    if platform == "colab-t4":
        from google.colab import drive  # Colab's own module

        drive.mount(COLAB_DRIVE)
        return f"Google Drive mounted at {COLAB_DRIVE}: checkpoints written under it outlive the session"
    if platform == "kaggle-t4x2":
        if not os.access(KAGGLE_WORKING, os.W_OK):
            raise RuntimeError(f"{KAGGLE_WORKING} is not writable: run this notebook on Kaggle as a notebook "
                               "(not a script from a dataset)")
        return (f"{KAGGLE_WORKING} is writable: save a version (Save & Run All) to keep it; in the next session "
                "add that version's output as input and run the same cells")
    return f"no GPU platform here: the run goes to {CPU_OUTPUT_DIR} (nothing to mount)"


def scores_label(env: Environment) -> str:
    """Where the learner's before/after was measured, and what it can say."""
    if env.on_gpu:
        return f"measured on {env.gpu_name} with {env.model}"
    return f"measured on CPU with the stand-in {env.model}: the pipeline runs, not quality"


@dataclass(frozen=True)
class Check:
    """One item of a new session's checklist: done or not, and what it found (or what to do)."""

    item: str
    done: bool
    found: str

    def line(self) -> str:
        return f"{'[x]' if self.done else '[ ]'} {self.item}: {self.found}"


def checklist(run: YourRun, data: str | os.PathLike, platform: str | None,
              previous_output_dirs: tuple[str, ...] = ()) -> list[Check]:
    """What a new session must have done before the run, each item checked here: m3lab installed, the
    run's folder kept (Drive mounted on Colab; /kaggle/working on Kaggle), the data valid, and where the
    run goes on from."""
    import importlib.metadata

    from m3lab.data.jsonl import DataError, load_jsonl
    from m3lab.train.resume import latest_checkpoint, where_it_looked

    installed = Check("install (the first cell)", True, f"m3lab {importlib.metadata.version('m3lab')}, FlagEmbedding "
                                                         f"{importlib.metadata.version('FlagEmbedding')}")
    if platform == "colab-t4":
        mounted = os.path.ismount(COLAB_DRIVE)
        kept = Check("mount Drive (the cell above)", mounted, f"{COLAB_DRIVE} " + (
            "is mounted" if mounted else "is not mounted: run the cell above, or the run is lost with the session"))
    elif platform == "kaggle-t4x2":
        writable = os.access(KAGGLE_WORKING, os.W_OK)
        kept = Check("/kaggle/working (the cell above)", writable, f"{KAGGLE_WORKING} is "
                     + ("writable" if writable else "not writable: run this as a notebook on Kaggle"))
    else:
        kept = Check("where the run goes", True, f"{run.output_dir}, on this machine (no platform to mount)")
    try:
        data_check = Check("your data (MY_DATA)", True, f"{data}: {len(load_jsonl(data))} valid lines")
    except DataError as error:
        more = f" (and {len(error.problems) - 1} more: run the data cell)" if len(error.problems) > 1 else ""
        data_check = Check("your data (MY_DATA)", False, f"{error.problems[0]}{more}")
    except (ValueError, OSError) as error:
        data_check = Check("your data (MY_DATA)", False, str(error).splitlines()[0])
    found = latest_checkpoint(run.output_dir, list(previous_output_dirs))
    resume = Check("resume", True, f"goes on from step {found.step} ({found.folder})" if found else
                   f"no checkpoint yet in {where_it_looked(run.output_dir, list(previous_output_dirs))}: "
                   "starts from the beginning")
    return [installed, kept, data_check, resume]


@dataclass(frozen=True)
class YourRun:
    """The command to run here and what it is."""

    command: str
    output_dir: str
    what: str
    model: str = ""  # the model it fine-tunes, as this folder reaches it (the "before" of its judgement)

    def finished_model(self) -> Path | None:
        """The fine-tuned model the run saved at its end (None: it has not finished)."""
        folder = Path(self.output_dir)
        return folder if (folder / "config.json").is_file() and (folder / "sparse_linear.pt").is_file() else None


def your_run(answer, env: Environment, cpu_steps: int = 4, folder: str | os.PathLike = ".") -> YourRun:
    """The answer's run (a ``m3lab.plan.choice.Candidate``) as this machine runs it (see the module
    docstring), from ``folder``; its DeepSpeed JSON, if it names one, is written there. On a CPU,
    ``cpu_steps`` steps into a fresh ``CPU_OUTPUT_DIR``, a checkpoint every 2."""
    if env.on_gpu:
        answer.write_deepspeed_json(folder)
        return YourRun(answer.command, answer.output_dir, f"{answer.title}: the printed command, as it is",
                       answer.config.model)
    # the answer's warm-up counts its own steps: a few steps take one, or they would barely move the weights
    config = env.sized(answer.config, **CPU_SIZES, train_group_size=min(answer.config.train_group_size, 4),
                       max_steps=cpu_steps, save_steps=2, warmup_steps=1)
    if "bnb" in config.optim:  # bitsandbytes' 8-bit AdamW runs on a GPU only
        config = config.replace(optim="adamw_torch")
    # a demonstration: each time the lesson runs on a CPU it starts afresh
    shutil.rmtree(Path(folder) / CPU_OUTPUT_DIR, ignore_errors=True)
    if config.deepspeed_stage is not None:
        (Path(folder) / config.deepspeed_file_name).write_text(config.deepspeed_json())
    # the stand-in, linked beside the output folder: the command names it as this folder sees it
    model = Path(CPU_OUTPUT_DIR).parent / config.model
    (Path(folder) / model).parent.mkdir(parents=True, exist_ok=True)
    (Path(folder) / model).unlink(missing_ok=True)
    (Path(folder) / model).symlink_to(resolve_model(config.model), target_is_directory=True)
    rendering = commands.Rendering(CPU_OUTPUT_DIR, model_path=str(model))
    command = commands.resume_command(config, rendering, answer.platform.previous_output_dirs)
    if config.num_processes > 1:  # without it HF runs CPU processes as independent copies, not data-parallel
        command += " \\\n    --use_cpu True"
    return YourRun(command, CPU_OUTPUT_DIR, f"{answer.title}, sized for this CPU: the stand-in {config.model}, "
                                            f"{cpu_steps} steps at small lengths, fp32", str(model))


# What the run's output shows as it goes (everything: ``run(..., everything=True)``): m3lab's lines, the
# loss each logging step, the checkpoints saved, the end
SHOWN = ("m3lab:", "{'loss'", "{'train_runtime'", "Saving model checkpoint")


def run(command: str, cwd: str | os.PathLike = ".", log=print, everything: bool = False) -> int:
    """Run ``command`` in a shell, printing its progress as it comes (``SHOWN``; if it fails, its last
    lines). Interrupted (the notebook's stop button), it stops the run and says how to go on; the newest
    checkpoint stays."""
    from collections import deque

    bin_dir = str(Path(sys.executable).parent)  # torchrun, installed with torch, beside this Python
    env = {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
           "TOKENIZERS_PARALLELISM": "false"}
    child = subprocess.Popen(["bash", "-c", command], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=env, start_new_session=True)
    last = deque(maxlen=60)
    try:
        for line in child.stdout:
            last.append(line.rstrip("\n"))
            if everything or any(mark in line for mark in SHOWN):
                log(line.rstrip("\n").split("\r")[-1].strip())
        code = child.wait()
        if code != 0 and not everything:
            log(f"the run failed (exit status {code}); its last lines:")
            for line in last:
                log(line)
        return code
    except KeyboardInterrupt:
        os.killpg(child.pid, signal.SIGINT)
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        log("stopped. Run the same cell again (in this session or the next) to go on from the newest checkpoint.")
        return child.returncode
