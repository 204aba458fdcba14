"""m3lab fit: lengths from the data, the largest group that fits with the margin, the encoder trained,
and a command that FlagEmbedding's (and m3lab's) argument parser takes as it is printed."""

import json
import shlex

import numpy as np
import pytest

from m3lab import cli
from m3lab.config import ConfigError
from m3lab.data.jsonl import length_covering_tokens, load_jsonl, token_lengths
from m3lab.gpus import CLOSE_CALL_BYTES, GIB
from m3lab.plan.fit import MEMORY_SETTINGS, STOCK_SETTINGS, fit
from m3lab.plan.platforms import PLATFORMS, platform_for


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
    result = fit("data/train.jsonl", platform="colab-t4", margin_gib=1.0, log=lines.append)
    return result, lines


@pytest.mark.slow
def test_fit_keeps_95_percent_of_the_tokens(fitted):
    from m3lab.standin import load_tokenizer

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
    assert report.host.total_bytes <= PLATFORMS["colab-t4"].host_ram_bytes
    assert report.provenance == "predicted for Tesla T4 (Colab)"
    group = config.train_group_size
    # no bigger group fitted: either it is the data's cap, or every setting failed at group + 1 or below
    # (memory grows with the group)
    if group < result.max_group:
        for name, _ in MEMORY_SETTINGS:
            assert any(t.setting == name and not t.fits and t.config.train_group_size <= group + 1
                       for t in result.trials), name
    assert result.max_group == 11  # data/train.jsonl: ten negatives per line
    # the settings tried before the best one, at its group, did not fit (faster settings come first)
    order = [name for name, _ in MEMORY_SETTINGS]
    for trial in result.trials:
        if trial.config.train_group_size == group and order.index(trial.setting) < order.index(best.setting):
            assert not trial.fits


@pytest.mark.slow
def test_fit_prints_a_command_that_parses(capsys):
    from FlagEmbedding.finetune.embedder.encoder_only.m3 import (
        EncoderOnlyEmbedderM3DataArguments,
        EncoderOnlyEmbedderM3ModelArguments,
        EncoderOnlyEmbedderM3TrainingArguments,
    )
    from transformers import HfArgumentParser

    from m3lab.config import M3LabArguments

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


def test_platforms_are_the_runtimes_figures_and_bad_ones_are_named():
    colab, kaggle = PLATFORMS["colab-t4"], PLATFORMS["kaggle-t4x2"]
    assert (colab.gpu.count, colab.host_ram_bytes) == (1, 12_700_000_000)  # ../shared/colab/README.md
    assert (kaggle.gpu.count, kaggle.host_ram_bytes) == (2, 29_000_000_000)
    assert platform_for(gpu="l4", host_ram_gib=50).host_ram_bytes == 50 * GIB
    assert platform_for(gpu="l4").host_ram_bytes is None  # not given: not checked
    for kwargs, phrase in ((dict(platform="colab"), "unknown platform"),
                           (dict(platform="colab-t4", gpu="t4"), "leave out --gpu"),
                           (dict(gpu="t4", host_ram_gib=0), "more than 0 GiB")):
        with pytest.raises(ConfigError, match=phrase):
            platform_for(**kwargs)


@pytest.mark.slow
def test_fit_keeps_the_longest_queries_when_they_still_fit(fitted):
    result, _ = fitted
    assert result.longest_query > result.query_max_len  # the data has queries beyond the 95% length
    best = result.best.config
    assert best.query_max_len == result.longest_query
    # the same setting and group at the 95% length was tried first and fitted too
    assert any(t.setting == result.best.setting and t.config.train_group_size == best.train_group_size
               and t.config.query_max_len == result.query_max_len and t.fits for t in result.trials)


@pytest.mark.slow
def test_fit_never_proposes_what_the_host_cannot_hold():
    # 4 GiB of host RAM: less than any run needs (the fp32 weights alone are 2.1 GiB per process)
    result = fit("data/train.jsonl", gpu="t4", host_ram_gib=4, log=lambda line: None, max_group=3)
    assert result.best is None
    assert result.trials and all(not t.host_fits and not t.fits for t in result.trials)
    assert all(t.report.host.total_bytes > 4 * GIB for t in result.trials)


@pytest.mark.slow
def test_fit_stock_keeps_to_flagembedding_and_json_has_the_choice_and_host(capsys):
    assert cli.main(["fit", "--platform", "colab-t4", "--stock", "--json", "--max-group", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    best = out["best"]
    assert out["platform"] == "colab-t4" and out["host_ram_bytes"] == 12_700_000_000 and out["stock"]
    assert best["setting"] in dict(STOCK_SETTINGS)
    config = best["config"]
    assert not config["efficient_sparse_head"] and config["grad_cache_chunk_size"] == 0
    assert best["command"][4:6] == ["-m", "FlagEmbedding.finetune.embedder.encoder_only.m3"]
    report = best["report"]
    assert report["host_total_bytes"] <= out["host_ram_bytes"] and "host_peak_bytes" in report
    assert report["total_bytes"] <= report["usable_bytes"] - CLOSE_CALL_BYTES  # fit's default margin


@pytest.mark.slow
def test_when_the_datas_length_does_not_fit_the_passages_are_cut_to_the_longest_that_does(tmp_path):
    """Passages of some 6,000 words: FlagEmbedding as it is holds none of them at group 2 on a T4 (its
    sparse head alone is passages x length x vocabulary), so fit cuts them, says how much it kept, and
    the next length up (8 tokens longer) was tried and did not fit."""
    from m3lab.standin import load_tokenizer

    data = tmp_path / "long.jsonl"
    lines = [{"query": f"question {i}", "pos": [f"answer {i} " + "word " * 6000], "neg": [f"other {i} " + "text " * 6000]}
             for i in range(4)]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = fit(str(data), platform="colab-t4", stock=True, log=lambda line: None)
    assert result.best is not None and result.cut_from is not None
    cut = result.best.config.passage_max_len
    assert cut == result.passage_max_len < result.cut_from and cut % 8 == 0
    frugal = STOCK_SETTINGS[-1][0]
    tried = {(t.setting, t.config.train_group_size, t.config.passage_max_len): t.fits for t in result.trials}
    assert tried[(frugal, 2, cut)] and (cut + 8 == result.cut_from or tried[(frugal, 2, cut + 8)] is False)
    tokenizer = load_tokenizer().tokenizer
    passages = [text for line in lines for text in line["pos"] + line["neg"]]
    lengths = token_lengths(passages, tokenizer)
    assert result.tokens_kept == pytest.approx(np.minimum(lengths, cut).sum() / np.sum(lengths))
    assert f"passages cut to {cut} tokens, keeping {result.tokens_kept:.0%}" in result.cut()
