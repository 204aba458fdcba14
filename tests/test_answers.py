"""The answer per platform, as a learner uses it: the printed command copied into a shell, run from the
learner's own folder on their own file, stopped when a session ends, resumed, and run again by mistake.

On this CPU machine a command cannot run exactly as printed, and the tests change only this, each
visibly (``on_this_cpu``): the model is the offline stand-in (no hub here), fp16 is off (a CPU has no
fp16 training; in the DeepSpeed JSON too, where there is one), ``--use_cpu True`` for several processes
(without it HF runs them on a CPU as independent copies, not one data-parallel run), and a few steps
replace the epochs. Everything else (the data's path, the output
folder, the DeepSpeed JSON's name, every FlagEmbedding flag) is the printed text.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from m3lab.data.jsonl import REPO_ROOT
from m3lab.plan import recipes

TRAIN = REPO_ROOT / "data" / "train.jsonl"


@pytest.fixture
def learners_folder(tmp_path, monkeypatch):
    """A folder outside the repository holding the learner's own file (a copy of the series' data)."""
    folder = tmp_path / "learner"
    folder.mkdir()
    (folder / "my_train.jsonl").write_text(TRAIN.read_text())
    monkeypatch.chdir(folder)
    return folder


def _printed_command(card: str) -> str:
    """The command block of a card, as printed: the lines after "# Run it from this folder" up to a blank line."""
    lines = card.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Run it from this folder")) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return "\n".join(lines[start:end])


def on_this_cpu(command: str, standin: Path, steps: int, extra: str = "") -> str:
    """The printed command with what a CPU machine without the hub cannot run changed, and only that."""
    assert "--model_name_or_path BAAI/bge-m3 \\" in command and "--fp16 True \\" in command
    command = command.replace("--model_name_or_path BAAI/bge-m3 \\", f"--model_name_or_path {standin} \\")
    command = command.replace("--fp16 True \\", "--fp16 False \\")
    if "--nproc_per_node 1 " not in command:
        command += " \\\n    --use_cpu True"
    return command + f" \\\n    --max_steps {steps}" + extra


def _shell_environment() -> dict:
    """A learner's shell after the install: torchrun (installed with torch) on the PATH; no hub here."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(command: str, folder: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = _shell_environment()
    return subprocess.run(["bash", "-c", command], cwd=folder, capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def answers_for_my_file(tmp_path_factory):
    """Both platforms' answers with FlagEmbedding as it is, fitted on a file outside the repository (the
    series' data: lesson 07 fits the same, so its traces are read back)."""
    folder = tmp_path_factory.mktemp("fit")
    (folder / "my_train.jsonl").write_text(TRAIN.read_text())
    here = os.getcwd()
    os.chdir(folder)
    try:
        return {key: recipes.answer_for(key, stock=True, data="my_train.jsonl", output_dir="out")
                for key in ("colab-t4", "kaggle-t4x2")}
    finally:
        os.chdir(here)


def test_the_answer_names_the_data_as_the_learners_folder_sees_it(answers_for_my_file):
    for answer in answers_for_my_file.values():
        command = _printed_command(answer.card())
        assert "--train_data my_train.jsonl \\" in command and "--output_dir out \\" in command
        assert "--save_strategy steps" in command and f"--save_steps {answer.plan.save_steps}" in command
        assert "--do_train True" in command  # FlagEmbedding then refuses to write over a finished run
        steps = answer.plan.steps_per_epoch * 2  # two epochs
        assert answer.plan.steps == steps and f"--warmup_steps {-(-steps // 10)}" in command


def test_a_relative_path_given_from_another_folder_is_printed_from_here(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert recipes.as_seen_from_here("data/train.jsonl") == os.path.relpath(TRAIN)
    assert recipes.as_seen_from_here("/kaggle/input/mine/train.jsonl") == "/kaggle/input/mine/train.jsonl"


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["colab-t4", "kaggle-t4x2"])
def test_the_printed_command_runs_as_copied(platform, answers_for_my_file, learners_folder, standin_dir):
    """Kaggle's card runs for real on two CPU processes (gloo), as its two T4s would."""
    answer = answers_for_my_file[platform]
    card = answer.card()
    if answer.config.deepspeed_stage is not None:
        written = answer.write_deepspeed_json(learners_folder)
        settings = json.loads(written.read_text())
        settings["fp16"]["enabled"] = False  # as the command's --fp16 on this CPU (HF checks the two agree)
        written.write_text(json.dumps(settings))
    done = _run(on_this_cpu(_printed_command(card), standin_dir, steps=2), learners_folder)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    saved = learners_folder / "out"
    assert (saved / "model.safetensors").exists() or any(saved.glob("*.safetensors"))
    assert (saved / "colbert_linear.pt").exists() and (saved / "sparse_linear.pt").exists()
    # FlagEmbedding 1.4.2 writes no sentence-transformers module files (m3lab's runner does): held, so that
    # an upstream fix shows
    assert not (saved / "modules.json").exists()


@pytest.mark.slow
def test_a_run_stopped_after_a_checkpoint_resumes_from_it_and_ends_at_the_same_step(answers_for_my_file,
                                                                                    learners_folder, standin_dir):
    answer = answers_for_my_file["colab-t4"]
    cpu = dict(standin=standin_dir, steps=4, extra="")
    first = on_this_cpu(_printed_command(answer.card()), **cpu).replace(
        f"--save_steps {answer.plan.save_steps} \\", "--save_steps 2 \\")
    # the session ends right after the run's first checkpoint (stopping it by a signal instead races
    # with the next checkpoint, which then deletes this one: --save_total_limit 1)
    ended = _run(first.replace("--max_steps 4", "--max_steps 2"), learners_folder)
    assert ended.returncode == 0, ended.stdout[-3000:] + ended.stderr[-3000:]
    state = learners_folder / "out" / "checkpoint-2" / "trainer_state.json"
    at_checkpoint = json.loads(state.read_text())["epoch"]
    # run again by mistake, as printed: FlagEmbedding refuses to write over it and says what to do
    again = _run(first, learners_folder)
    assert again.returncode != 0
    assert "already exists and is not empty. Please use a new output directory or set --resume_from_checkpoint" in (
        again.stdout + again.stderr)
    # the resume command, as printed: the same command on m3lab's runner, which finds the newest checkpoint
    resume = answer.resume_command()
    printed = _printed_command(answer.card())
    assert resume == printed.replace("-m FlagEmbedding.finetune.embedder.encoder_only.m3", "-m m3lab.run_m3") + (
        " \\\n    --resume_from_checkpoint latest")

    def on_cpu(command: str, steps: int = 4) -> str:
        return on_this_cpu(command, standin_dir, steps).replace(f"--save_steps {answer.plan.save_steps} \\",
                                                                "--save_steps 2 \\")

    # FlagEmbedding 1.4.2's own runner cannot resume its M3 checkpoints (without DeepSpeed): held here, so
    # that an upstream fix shows (and the lesson's warning goes)
    stock = _run(on_cpu(printed) + " \\\n    --resume_from_checkpoint out/checkpoint-2", learners_folder)
    assert stock.returncode != 0
    assert "object has no attribute '_keys_to_ignore_on_save'" in stock.stdout + stock.stderr
    done = _run(on_cpu(resume), learners_folder)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "m3lab: going on from step 2: out/checkpoint-2" in done.stdout
    # it went on from the checkpoint: every loss it logged is past the checkpoint's epoch (a run from
    # scratch would log step 1's too)
    logged = [float(e) for e in re.findall(r"\{'loss': [^}]*'epoch': ([\d.]+)\}", done.stdout)]
    assert logged and all(epoch > at_checkpoint for epoch in logged), (at_checkpoint, done.stdout[-3000:])
    final = json.loads((learners_folder / "out" / "checkpoint-4" / "trainer_state.json").read_text())
    assert final["global_step"] == 4 == final["max_steps"]
    assert (learners_folder / "out" / "modules.json").exists()  # m3lab's runner: loadable by sentence-transformers

    # Kaggle's next session: the working folder starts empty, and the last version's output comes back as
    # input, read-only (here: nothing under it may change); the resume command looks there too
    given_back = learners_folder.parent / "input" / "my-notebook"
    given_back.mkdir(parents=True)
    shutil.move(learners_folder / "out", given_back / "out")
    before = _tree(given_back)
    more = _run(on_cpu(resume, steps=6) + " \\\n    --previous_output_dirs ../input", learners_folder)
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    assert "m3lab: going on from step 4: ../input/my-notebook/out/checkpoint-4" in more.stdout
    assert _tree(given_back) == before
    final = json.loads((learners_folder / "out" / "checkpoint-6" / "trainer_state.json").read_text())
    assert final["global_step"] == 6


def _tree(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` with its size and modification time, to show nothing was written."""
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.slow
def test_the_lessons_run_cell_trains_the_answer_here_and_ends_with_a_checkpoint(answers_for_my_file, tmp_path):
    """Lesson 08's run cells on a machine without a GPU: the same command, sized for the CPU."""
    from m3lab.lessons import environment, your_run

    env = environment()
    assert your_run.platform_here() is None and not env.on_gpu
    assert your_run.keep_outputs(None) == "no GPU platform here: the run goes to results/your-run (nothing to mount)"
    (tmp_path / "my_train.jsonl").write_text(TRAIN.read_text())
    from m3lab.plan import choice

    kaggle = choice.from_answer("FlagEmbedding as it is", answers_for_my_file["kaggle-t4x2"], {}, lines=251)
    mine = your_run.your_run(kaggle, env, folder=tmp_path)
    assert "--nproc_per_node 2" in mine.command and "--resume_from_checkpoint latest" in mine.command
    printed = []
    assert your_run.run(mine.command, cwd=tmp_path, log=printed.append) == 0, "\n".join(printed[-40:])
    assert any(line.startswith("m3lab: no checkpoint yet in results/your-run") for line in printed)
    state = json.loads((tmp_path / "results" / "your-run" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
