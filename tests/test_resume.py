"""``--resume_from_checkpoint latest``: the newest complete checkpoint in the output folder or where a
platform gives the last session's output back (Kaggle's read-only /kaggle/input), or none."""

import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace

from m3lab.config import M3LabArguments
from m3lab.train import resume
from m3lab.train.runner import _resolve_latest


def _checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def _read_only(folder: Path) -> None:
    for here, folders, files in os.walk(folder):
        for name in files:
            os.chmod(Path(here) / name, stat.S_IRUSR)
        os.chmod(here, stat.S_IRUSR | stat.S_IXUSR)


def test_the_newest_complete_checkpoint_by_step_not_by_name(tmp_path):
    out = tmp_path / "out"
    _checkpoint(out, 2), _checkpoint(out, 10)
    _checkpoint(out, 12, complete=False)  # the session ended while it was written
    assert resume.latest_checkpoint(out) == resume.Checkpoint(out / "checkpoint-10", 10)


def test_none_yet_starts_from_the_beginning_and_says_so(tmp_path):
    said = []
    assert resume.resolve(str(tmp_path / "out"), ["/kaggle/input"], log=said.append) is None
    assert said == [f"m3lab: no checkpoint yet in {tmp_path / 'out'} or a folder named out under /kaggle/input: "
                    "the run starts from the beginning."]


def test_the_last_versions_output_is_found_read_only_under_the_input_folder(tmp_path):
    out = tmp_path / "working" / "bge-m3-finetuned"
    given_back = tmp_path / "input" / "my-notebook" / "bge-m3-finetuned"
    _checkpoint(given_back, 40), _checkpoint(given_back, 20)
    _checkpoint(tmp_path / "input" / "other-run", 99)  # another folder's checkpoints are not this run's
    _read_only(tmp_path / "input")
    try:
        said = []
        found = resume.resolve(str(out), [str(tmp_path / "input")], log=said.append)
        assert found == str(given_back / "checkpoint-40") and said == [f"m3lab: going on from step 40: {found}"]
        # a checkpoint written since in this session's output folder is newer
        _checkpoint(out, 50)
        assert resume.latest_checkpoint(out, [str(tmp_path / "input")]).step == 50
    finally:
        for here, folders, files in os.walk(tmp_path / "input"):
            os.chmod(here, stat.S_IRWXU)


def test_the_output_folders_own_checkpoint_wins_a_tie(tmp_path):
    out = tmp_path / "out"
    _checkpoint(out, 8), _checkpoint(tmp_path / "input" / "v1" / "out", 8)
    assert resume.latest_checkpoint(out, [str(tmp_path / "input")]).folder == out / "checkpoint-8"


def test_a_folder_with_files_but_no_checkpoint_is_refused_in_a_sentence(tmp_path):
    out = tmp_path / "out"
    _checkpoint(out, 4, complete=False)
    arguments = SimpleNamespace(output_dir=str(out), resume_from_checkpoint="latest")
    refusal = _resolve_latest(arguments, M3LabArguments())
    assert refusal == (f"m3lab: {out} holds files but no complete checkpoint to go on from (one has "
                       "trainer_state.json): move them elsewhere or give another --output_dir, then run the command "
                       "again.")
    # an empty or missing folder: the run starts, from the beginning
    arguments = SimpleNamespace(output_dir=str(tmp_path / "new"), resume_from_checkpoint="latest")
    assert _resolve_latest(arguments, M3LabArguments()) is None and arguments.resume_from_checkpoint is None


def test_where_to_look_is_not_a_lever():
    assert M3LabArguments(previous_output_dirs=["/kaggle/input"]).levers == M3LabArguments()
    assert M3LabArguments(efficient_sparse_head=True).levers != M3LabArguments()
