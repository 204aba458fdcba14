"""The command line: bad input ends in one sentence on stderr and exit status 2, never a traceback;
``m3lab predict``'s own defaults are FlagEmbedding's."""

import dataclasses
import json
from pathlib import Path

import pytest

from m3lab import cli
from m3lab.config import FLAGEMBEDDING_M3_MODULE

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PASTE = ["predict", "--gpu", "t4", "--", "torchrun", "--nproc_per_node", "1", "-m", FLAGEMBEDDING_M3_MODULE,
         "--model_name_or_path", "BAAI/bge-m3", "--output_dir", "out"]


def _json_file(tmp_path, name, content) -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


# (arguments, a phrase the message must hold); tmp_path-dependent files are made by _case
MISTAKES = {
    "unknown GPU": (["predict", "--gpu", "tpu"], "unknown GPU; choose one of t4, t4x2"),
    "group 1 with nothing to contrast": (["predict", "--gpu", "t4", "--train-group-size", "1", "--batch-size", "1"],
                                         "train_group_size is 1 (no negatives of its own)"),
    "length 0": (["predict", "--gpu", "t4", "--query-max-len", "0"], "query_max_len is 0; it must be at least 1"),
    "length beyond the model": (["predict", "--gpu", "t4", "--passage-max-len", "9000"],
                                "passage_max_len is 9,000, beyond the model's 8,192 positions"),
    "DeepSpeed JSON missing": (["predict", "--gpu", "t4", "--deepspeed", "{tmp}/nope.json"], "no such file"),
    "DeepSpeed JSON not JSON": (["predict", "--gpu", "t4", "--deepspeed", "{broken.json}"], "broken.json:2: not valid JSON"),
    "DeepSpeed ZeRO-3": (["predict", "--gpu", "t4", "--deepspeed", "{zero3.json}"], "ZeRO stage 3 is not modelled"),
    "DeepSpeed optimizer not modelled": (["predict", "--gpu", "t4", "--deepspeed", "{lamb.json}"],
                                         "optimizer type 'Lamb' is not modelled"),
    "config.json without model_type": (["predict", "--gpu", "t4", "--model-config", "{notconfig.json}"],
                                       "does not look like a transformers config.json"),
    "config.json not JSON": (["predict", "--gpu", "t4", "--model-config", "{broken.json}"], "not valid JSON"),
    "pasted unknown flag": ([*PASTE, "--frobnicate", "3"], "--frobnicate: " + FLAGEMBEDDING_M3_MODULE
                            + " has no such argument"),
    "pasted lever without m3lab.run_m3": ([*PASTE, "--efficient_sparse_head", "True"], "launch with -m m3lab.run_m3"),
    "pasted flag not modelled": ([*PASTE, "--torch_compile", "True"], "does not model"),
    "pasted other trainer": (["predict", "--gpu", "t4", "--", "torchrun", "--nproc_per_node", "1", "-m",
                              "FlagEmbedding.finetune.embedder.decoder_only.base"], "predicts FlagEmbedding's M3 trainer"),
    "pasted hub model": ([*PASTE[:-4], "--model_name_or_path", "intfloat/e5-large", "--output_dir", "o"],
                         "does not download"),
    "pasted nproc not a number": (["predict", "--gpu", "t4", "--", "torchrun", "--nproc_per_node", "gpu", "-m",
                                   FLAGEMBEDDING_M3_MODULE], "give the number of GPUs"),
    "pasted contradiction": ([*PASTE, "--fp16", "--bf16"], "fp16 and bf16 are both on"),
    "pasted batch against the JSON": ([*PASTE, "--deepspeed", "{micro4.json}"],
                                      "train_micro_batch_size_per_gpu is 4 but this configuration gives 8"),
    "own options and a pasted command": (["predict", "--gpu", "t4", "--query-max-len", "64", "--", *PASTE[4:]],
                                         "--query-max-len and a pasted command both describe the run"),
    "fix_encoder without unified fine-tuning": (["predict", "--gpu", "t4", "--fix-encoder"],
                                                "fix_encoder freezes everything but colbert_linear"),
    "not an integer": (["predict", "--gpu", "t4", "--batch-size", "x"], "invalid int value: 'x'"),
    "fit: unknown GPU": (["fit", "--gpu", "tpu"], "unknown GPU"),
    "fit: coverage out of range": (["fit", "--coverage", "3"], "--coverage between 0 and 1"),
    "fit: LoRA is not stock": (["fit", "--stock", "--lora"], "LoRA is m3lab's lever"),
    "fit: chunk tokens without per-length batches": (["fit", "--grad-cache-chunk-tokens", "4096"],
                                                      "sizes the chunks of a per-length plan"),
    "fit: stock per length with the cache": (["fit", "--stock", "--buckets", "{tmp}/b", "--grad-cache-chunk-tokens",
                                              "8192"], "FlagEmbedding as it is (--stock) has no gradient cache"),
    "fit: stock per length with LoRA": (["fit", "--stock", "--lora", "--buckets", "{tmp}/b"],
                                         "FlagEmbedding as it is (--stock) has no LoRA for M3"),
    "fit: chunk tokens below 0": (["fit", "--buckets", "{tmp}/b", "--grad-cache-chunk-tokens", "-1"],
                                  "give the tokens a chunk"),
    "fit: missing data": (["fit", "--data", "{tmp}/none.jsonl"], "none.jsonl"),
    "fit: unknown platform": (["fit", "--platform", "colab"], "unknown platform; choose one of colab-t4"),
    "fit: platform and GPU": (["fit", "--platform", "kaggle-t4x2", "--gpu", "t4"], "leave out --gpu"),
    "fit: no host RAM": (["fit", "--gpu", "t4", "--host-ram-gib", "0"], "more than 0 GiB"),
    "validate: missing file": (["validate", "{tmp}/none.jsonl"], "none.jsonl"),
    "command: unknown preset": (["command", "fastest"], "invalid choice: 'fastest'"),
}


def _case(args, tmp_path):
    files = {"broken.json": '{\n  "zero_optimization": {,\n}', "zero3.json": {"zero_optimization": {"stage": 3}},
             "lamb.json": {"optimizer": {"type": "Lamb", "params": {}}}, "notconfig.json": {"hidden_size": 4},
             "micro4.json": {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 0}}}
    out = []
    for arg in args:
        if arg.startswith("{") and arg.endswith("}") and arg[1:-1] in files:
            arg = _json_file(tmp_path, arg[1:-1], files[arg[1:-1]])
        out.append(arg.replace("{tmp}", str(tmp_path)))
    return out


def _status(argv) -> int:
    """m3lab's exit status: what main returns, or what argparse exits with."""
    try:
        return cli.main(argv)
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize("name", [n for n, (_, phrase) in MISTAKES.items() if phrase])
def test_a_mistake_is_one_sentence_and_exit_status_2(name, tmp_path, capsys):
    args, phrase = MISTAKES[name]
    assert _status(_case(args, tmp_path)) == 2
    err = capsys.readouterr().err
    assert phrase in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3, err  # a sentence (a list only when several things are wrong)


def test_at_least_fifteen_mistakes_are_covered():
    assert len([phrase for _, phrase in MISTAKES.values() if phrase]) >= 15


def test_predict_options_default_to_flagembeddings_defaults():
    from FlagEmbedding.finetune.embedder.encoder_only.m3 import (
        EncoderOnlyEmbedderM3DataArguments,
        EncoderOnlyEmbedderM3TrainingArguments,
    )
    from transformers import TrainingArguments

    upstream = {f.name: f.default for cls in (EncoderOnlyEmbedderM3DataArguments, EncoderOnlyEmbedderM3TrainingArguments,
                                              TrainingArguments) for f in dataclasses.fields(cls)}
    for name, value in cli.FLAGEMBEDDING_DEFAULTS.items():
        assert upstream[name] == value or (name == "sub_batch_size" and upstream[name] is None), name
    # and the parser uses them
    parser_defaults = {"batch_size": "per_device_train_batch_size", "query_max_len": "query_max_len",
                       "passage_max_len": "passage_max_len", "train_group_size": "train_group_size",
                       "unified_finetuning": "unified_finetuning", "optim": "optim"}
    args = _parsed(["predict", "--gpu", "t4"])
    for dest, name in parser_defaults.items():
        assert getattr(args, dest) == cli.FLAGEMBEDDING_DEFAULTS[name], dest


def _parsed(argv):
    seen = {}

    def capture(args):
        seen["args"] = args
        return 0

    original = cli._predict
    cli._predict = capture
    try:
        cli.main(argv)
    finally:
        cli._predict = original
    return seen["args"]


def test_the_command_exits_quickly_with_everything_printed():
    """``python -m m3lab predict`` exits without tearing the interpreter down (cli.entry): its
    report must still be complete on stdout, and a mistake still one line with status 2."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    base = [sys.executable, "-m", "m3lab", "predict", "--trainer", "hf", "--model-config",
            str(FIXTURES / "bert-tiny-config.json"), "--seq-len", "64"]
    done = subprocess.run([*base, "--gpu", "t4", "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["gpu"] == "t4"  # the whole JSON object arrived
    wrong = subprocess.run([*base, "--gpu", "tpu"], capture_output=True, text=True, env=env, timeout=600)
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines()[-1].startswith("m3lab predict: --gpu tpu: unknown GPU")


def test_the_text_report_ends_with_the_estimated_step_time(capsys):
    assert cli.main(["predict", "--trainer", "hf", "--model-config", str(FIXTURES / "bert-tiny-config.json"),
                     "--seq-len", "64", "--gpu", "t4"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("time: ") and "TFLOP per step with every text at full length (an upper bound)" in last
    assert "s per step on Tesla T4 (Colab), estimated at 13% to 24% of its datasheet peak" in last


def test_predict_json_with_a_deepspeed_file_prints_only_json_on_stdout(tmp_path):
    """DeepSpeed logs "Setting accelerator to CPU" to stdout when its JSON is read; `m3lab predict --json`
    sends that to stderr, so that its stdout pipes into `jq` or json.loads."""
    import os
    import subprocess
    import sys

    # DeepSpeed looking for its accelerator, as a learner's shell has it (the lessons name it; not here)
    env = {name: value for name, value in os.environ.items() if name != "DS_ACCELERATOR"}
    command = PASTE[PASTE.index("--") + 1:]
    command[command.index("BAAI/bge-m3")] = "tiny-bge-m3"
    done = subprocess.run([sys.executable, "-m", "m3lab", "predict", "--gpu", "t4", "--json", "--", *command,
                           "--deepspeed", str(FIXTURES.parent.parent / "data" / "upstream" / "ds_stage0.json"),
                           "--fp16", "--train_group_size", "2", "--query_max_len", "32", "--passage_max_len", "64",
                           "--warmup_steps", "1"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Setting accelerator" in done.stderr  # DeepSpeed did speak, on stderr
    assert json.loads(done.stdout)["peak_allocated_bytes"] > 0


def test_bf16_on_a_card_without_bf16_units_is_said_not_refused(capsys):
    """HF and FlagEmbedding accept --bf16 on a T4 (sm75), which then runs it emulated: m3lab says so."""
    assert cli.main(["predict", "--gpu", "t4", "--model-config", "tiny-bge-m3", "--precision", "bf16",
                     "--query-max-len", "32", "--passage-max-len", "64"]) == 0
    err = capsys.readouterr().err
    assert "Tesla T4 (Colab) has no bf16 units" in err and "--fp16 is the half precision it runs fast" in err
