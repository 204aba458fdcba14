"""Lesson 08's new-session checklist: each item checked on this machine, as a learner's session finds it."""

import json

from m3lab.data.jsonl import REPO_ROOT
from m3lab.lessons.your_run import YourRun, checklist


def test_each_item_says_what_it_found(tmp_path):
    data = tmp_path / "my train.jsonl"
    data.write_text((REPO_ROOT / "data" / "train.jsonl").read_text())
    run = YourRun("cmd", str(tmp_path / "out"), "what")
    install, kept, valid, resume = checklist(run, data, None)
    assert install.done and install.found.startswith("m3lab ") and "FlagEmbedding 1.4.2" in install.found
    assert kept.done and "no platform to mount" in kept.found
    assert valid.done and valid.found == f"{data}: 251 valid lines"
    assert resume.line().startswith("[x] resume: no checkpoint yet in ") and "starts from the beginning" in resume.found


def test_a_checkpoint_in_the_last_versions_output_is_where_the_run_goes_on(tmp_path):
    previous = tmp_path / "input" / "my-notebook" / "out" / "checkpoint-8"
    previous.mkdir(parents=True)
    (previous / "trainer_state.json").write_text(json.dumps({"global_step": 8}))
    run = YourRun("cmd", str(tmp_path / "working" / "out"), "what")
    *_, resume = checklist(run, REPO_ROOT / "data" / "train.jsonl", None, (str(tmp_path / "input"),))
    assert resume.found == f"goes on from step 8 ({previous})"


def test_bad_data_and_an_unmounted_drive_are_not_done(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"query": "q", "pos": []}\n')
    install, kept, valid, _ = checklist(YourRun("cmd", str(tmp_path / "out"), "what"), data, "colab-t4")
    assert not kept.done and kept.line().startswith("[ ] mount Drive") and "is not mounted" in kept.found
    assert not valid.done and str(data) in valid.found and "\n" not in valid.found
