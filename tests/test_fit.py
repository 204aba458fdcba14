"""m3lab fit: lengths from the data, the largest group that fits with the margin, the encoder trained,
and a command that FlagEmbedding's (and m3lab's) argument parser takes as it is printed."""

import json
import shlex

import numpy as np
import pytest

from m3lab import cli
from m3lab.data import length_covering_tokens, load_jsonl, token_lengths
from m3lab.fit import MEMORY_SETTINGS, fit
from m3lab.gpus import GIB


def test_length_covering_tokens_by_hand():
    # nine texts of 10 tokens and one of 100: 190 tokens; keeping 95% (180.5) needs
    # 90 + min(100, L) >= 180.5, so L >= 90.5: 96 as a multiple of 8
    assert length_covering_tokens([10] * 9 + [100], 0.95) == 96
    assert length_covering_tokens([10] * 9 + [100], 1.0) == 104  # everything: 100, rounded up to 8
    assert length_covering_tokens([5], 0.95, multiple_of=1) == 5
    with pytest.raises(ValueError, match="no texts"):
        length_covering_tokens([], 0.95)


@pytest.fixture(scope="module")
def fitted():
    lines = []
    result = fit("data/train.jsonl", gpu="t4", margin_gib=1.0, log=lines.append)
    return result, lines


@pytest.mark.slow
def test_fit_keeps_95_percent_of_the_tokens(fitted):
    from m3lab.lessons import load_tokenizer

    result, _ = fitted
    tokenizer, _ = load_tokenizer()
    records = load_jsonl("data/train.jsonl")
    passages = list(dict.fromkeys(t for r in records for t in r["pos"] + r["neg"]))
    for texts, limit in (([r["query"] for r in records], result.query_max_len), (passages, result.passage_max_len)):
        lengths = token_lengths(texts, tokenizer)

        def kept(cap):
            return np.minimum(lengths, cap).sum() / lengths.sum()

        assert kept(limit) >= 0.95 > kept(limit - 8)  # the smallest multiple of 8 that does


@pytest.mark.slow
def test_fit_returns_the_largest_group_that_fits_with_the_encoder_trained(fitted):
    result, lines = fitted
    best = result.best
    assert best is not None and lines
    config, report = best.config, best.report
    assert not config.fix_encoder and not config.freeze_word_embeddings and config.use_self_distill
    assert report.total_bytes <= report.usable_bytes - GIB  # the margin
    assert report.provenance == "predicted for Tesla T4 (Colab)"
    group = config.train_group_size
    frugal = [t for t in result.trials if t.setting == MEMORY_SETTINGS[-1][0]]
    assert any(t.fits and t.config.train_group_size == group for t in frugal)
    # no bigger group fitted: either it is the data's cap, or the most frugal setting failed at group + 1
    assert group == result.max_group or any(not t.fits and t.config.train_group_size == group + 1 for t in frugal)
    assert result.max_group == 11  # data/train.jsonl: ten negatives per line
    # the settings tried before the best one, at its group, did not fit (faster settings come first)
    order = [name for name, _ in MEMORY_SETTINGS]
    for trial in result.trials:
        if trial.config.train_group_size == group and order.index(trial.setting) < order.index(best.setting):
            assert not trial.fits


@pytest.mark.slow
def test_fit_prints_a_command_that_parses(capsys):
    from transformers import HfArgumentParser

    from FlagEmbedding.finetune.embedder.encoder_only.m3 import (
        EncoderOnlyEmbedderM3DataArguments, EncoderOnlyEmbedderM3ModelArguments,
        EncoderOnlyEmbedderM3TrainingArguments)

    from m3lab.run_m3 import M3LabArguments

    assert cli.main(["fit", "--gpu", "t4", "--data", "data/train.jsonl"]) == 0
    out = capsys.readouterr().out
    assert "<- best" in out and "predicted for Tesla T4" in out
    command = out[out.index("torchrun"):].split("\n\n# ds_stage")[0]
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[:5] == ["torchrun", "--standalone", "--nproc_per_node", "1", "-m"]
    parser = HfArgumentParser((EncoderOnlyEmbedderM3ModelArguments, EncoderOnlyEmbedderM3DataArguments,
                               EncoderOnlyEmbedderM3TrainingArguments, M3LabArguments))
    if argv[5] == "m3lab.run_m3":
        model_args, data_args, training_args, m3lab_args = parser.parse_args_into_dataclasses(argv[6:])
        assert m3lab_args.efficient_sparse_head
    else:
        pytest.fail(f"expected m3lab's runner (the efficient sparse head is on), got {argv[5]}")
    assert model_args.model_name_or_path == "BAAI/bge-m3" and data_args.train_data == ["data/train.jsonl"]
    assert not model_args.fix_encoder if hasattr(model_args, "fix_encoder") else not training_args.fix_encoder


@pytest.mark.slow
def test_nothing_fits_says_so(capsys):
    assert cli.main(["fit", "--gpu", "t4", "--data", "data/train.jsonl", "--margin-gib", "14"]) == 1
    assert "Nothing fits Tesla T4 (Colab) with 14 GiB to spare" in capsys.readouterr().out


def test_bad_data_is_reported_with_its_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "q", "pos": ["p"], "neg": ["n"]}) + "\n{not json\n")
    assert cli.main(["fit", "--data", str(bad)]) == 2  # bad input: exit status 2
    assert f"{bad}:2" in capsys.readouterr().err
