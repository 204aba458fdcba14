"""The answers predicted on Colab's and Kaggle's own packages: the committed files, and how a lesson reads them."""

from dataclasses import dataclass

import pytest

from m3lab.evidence import platform_stack

GIB = 1024**3


@pytest.mark.parametrize("platform", ["colab-t4", "kaggle-t4x2"])
def test_the_committed_run_was_made_with_the_platforms_transformers(platform):
    found = platform_stack.load(platform)
    assert found.platform == platform
    assert found.packages["transformers"].startswith("5."), "made in CI's venv, not the platform lane's"
    assert [a.title.split("; ")[1] for a in found.answers] == ["FlagEmbedding as it is", "with m3lab's levers"]
    for answer in found.answers:
        assert 0 < answer.peak_bytes < answer.needs_bytes < answer.usable_bytes


@dataclass
class _Report:
    total_bytes: int
    usable_bytes: int
    provenance: str = "predicted for Tesla T4 (Colab)"

    @property
    def spare_bytes(self):
        return self.usable_bytes - self.total_bytes


@dataclass
class _Answer:
    title: str
    run: str
    report: _Report

    def figures(self):
        return [self.run, "GPU, ..."]


def _stack(run: str) -> platform_stack.StackAnswers:
    return platform_stack.StackAnswers("colab-t4", "2026-12-07", {"transformers": "5.15.0"}, "train.jsonl",
                                       [platform_stack.StackAnswer("free Colab; as it is", run, GIB, 12 * GIB, 15 * GIB)])


def test_the_same_run_is_set_beside_with_how_far_its_spare_moves():
    answer = _Answer("free Colab; as it is", "group 2, 2704 tokens", _Report(11 * GIB + GIB // 4, 15 * GIB))
    lines = _stack("group 2, 2704 tokens").beside(answer)
    assert "3.75 GiB to spare" in lines[1]
    assert lines[2].endswith("needs 12.00 GiB, 3.00 GiB to spare: the spare moves by -768 MiB")
    assert "free Colab's packages (transformers 5.15.0" in lines[2]
    assert all(line.startswith("  predicted for Tesla T4 (Colab), with ") for line in lines[1:])  # each figure labelled


def test_another_run_is_not_compared():
    answer = _Answer("free Colab; as it is", "group 4, 2704 tokens", _Report(11 * GIB, 15 * GIB))
    lines = _stack("group 2, 2704 tokens").beside(answer)
    assert "not on record for this run" in lines[2] and "moves" not in lines[2]
