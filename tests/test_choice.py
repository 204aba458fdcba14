"""The series' one answer per platform: the rule, read in order, and other runs shown as what they change."""

import pytest

from m3lab.config import TrainConfig
from m3lab.gpus import CLOSE_CALL_BYTES, GIB
from m3lab.plan import choice
from m3lab.plan.platforms import PLATFORMS

COLAB = PLATFORMS["colab-t4"]
BASE = TrainConfig(model="BAAI/bge-m3", train_data=["my.jsonl"], train_group_size=4, passage_max_len=2048, max_steps=100,
                   unified_finetuning=True, use_self_distill=True, fp16=True, gradient_checkpointing=True)


def _candidate(name, group=4, spare_gib=2.0, kept=0.95, hours=(0.5, 1.0), host_fits=True, **changes):
    config = BASE.replace(train_group_size=group, **changes)
    seconds = None if hours is None else tuple(h * 3600 for h in hours)
    return choice.Candidate(name, COLAB, config, int(spare_gib * GIB), host_fits, kept, seconds, (), "out", "cmd")


def test_the_largest_group_wins_among_runs_that_fit_and_end_in_a_session():
    picked = choice.choose(COLAB, [_candidate("small", group=2), _candidate("large", group=11),
                                   _candidate("whole", group=6, kept=1.0)])
    assert picked.chosen.name == "large"


def test_a_close_call_a_host_too_small_or_a_frozen_encoder_is_never_the_answer():
    close = _candidate("close", group=16, spare_gib=CLOSE_CALL_BYTES / GIB - 0.01)
    host = _candidate("host", group=15, host_fits=False)
    frozen = _candidate("frozen", group=14, fix_encoder=True)
    no_heads = _candidate("dense only", group=13, unified_finetuning=False)
    assert choice.choose(COLAB, [close, host, frozen, no_heads, _candidate("ok", group=2)]).chosen.name == "ok"
    with pytest.raises(ValueError, match="no run for free Colab"):
        choice.choose(COLAB, [close, frozen])


def test_a_run_longer_than_a_session_loses_to_one_that_ends_in_it_and_otherwise_the_shortest_wins():
    long = _candidate("long", group=11, hours=(10, 13))
    assert choice.choose(COLAB, [long, _candidate("short", group=2)]).chosen.name == "short"
    longer = _candidate("longer", group=11, hours=(20, 30))
    assert choice.choose(COLAB, [long, longer]).chosen.name == "long"


def test_at_the_same_group_more_tokens_then_the_shorter_run():
    a, b = _candidate("cut", group=6, kept=0.9), _candidate("whole", group=6, kept=1.0, hours=(0.8, 1.2))
    assert choice.choose(COLAB, [a, b]).chosen.name == "whole"
    c = _candidate("whole, faster", group=6, kept=1.0, hours=(0.5, 0.9))
    assert choice.choose(COLAB, [a, b, c]).chosen.name == "whole, faster"


def test_another_run_is_shown_as_the_flags_it_changes():
    levers = BASE.replace(train_group_size=11, efficient_sparse_head=True)
    stock = BASE.replace(train_group_size=2, save_steps=7, warmup_steps=3)
    lines = choice.changes(levers, stock)
    assert lines == ["-m m3lab.run_m3 -> -m FlagEmbedding.finetune.embedder.encoder_only.m3",
                     "--train_group_size: 11 -> 2", "--efficient_sparse_head: True -> (not given)"]
    assert choice.changes(levers, levers) == []
    picked = choice.choose(COLAB, [_candidate("a", group=11, efficient_sparse_head=True), _candidate("b", group=2)])
    assert picked.others() == ("# b (comes later by the rule), against the answer:\n"
                               "  -m m3lab.run_m3 -> -m FlagEmbedding.finetune.embedder.encoder_only.m3\n"
                               "  --train_group_size: 11 -> 2\n  --efficient_sparse_head: True -> (not given)")


def test_the_answers_card_gives_one_command_for_every_session():
    card = choice.choose(COLAB, [_candidate("a")]).card()
    assert card.count("\ncmd") == 1 and choice.SAME_COMMAND in card and "mount Google Drive" in card
