import json

import pytest

from m3lab.command import Rendering, format_command, render, shell_command
from m3lab.config import ConfigError, Hardware, TrainConfig

T4 = Hardware("cuda", "Tesla T4", 1, supports_bf16=False)
CPU = Hardware()


def _args(argv):
    """Option -> value(s) of a rendered command."""
    options, key = {}, None
    for arg in argv[argv.index("-m") + 2:]:
        if arg.startswith("--"):
            key = arg[2:]
            options[key] = []
        else:
            options[key].append(arg)
    return {k: v[0] if len(v) == 1 else v for k, v in options.items()}


def test_command_is_torchrun_on_flagembeddings_m3_module():
    argv = render(TrainConfig.common_t4_advice(), Rendering(deepspeed_json_path="ds_stage1.json"))
    assert argv[:5] == ["torchrun", "--standalone", "--nproc_per_node", "1", "-m"]
    assert argv[5] == "FlagEmbedding.finetune.embedder.encoder_only.m3"
    args = _args(argv)
    assert args["train_group_size"] == "6"
    assert (args["query_max_len"], args["passage_max_len"]) == ("64", "392")
    assert args["per_device_train_batch_size"] == "1"
    assert args["fp16"] == "True" and args["gradient_checkpointing"] == "True"
    assert args["deepspeed"] == "ds_stage1.json"
    assert args["negatives_cross_device"] == "False"
    assert args["same_dataset_within_batch"] == "False"  # FlagEmbedding's default: no "None" + query trap
    assert args["model_name_or_path"] == "BAAI/bge-m3"


def test_every_argument_is_one_flagembedding_accepts():
    from FlagEmbedding.finetune.embedder.encoder_only.m3 import (
        EncoderOnlyEmbedderM3DataArguments,
        EncoderOnlyEmbedderM3ModelArguments,
        EncoderOnlyEmbedderM3TrainingArguments,
    )
    from transformers import HfArgumentParser

    config = TrainConfig.upstream_example(fp16=False, max_steps=7, deepspeed_stage=None, fix_encoder=True,
                                          gradient_accumulation_steps=3)
    argv = render(config, Rendering("/tmp/never-used"))
    parser = HfArgumentParser((EncoderOnlyEmbedderM3ModelArguments, EncoderOnlyEmbedderM3DataArguments,
                               EncoderOnlyEmbedderM3TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv[6:])
    assert data_args.train_group_size == 8 and data_args.passage_max_len == 512
    # m3.sh leaves same_dataset_within_batch off, as FlagEmbedding's default
    assert data_args.same_dataset_within_batch is False and data_args.pad_to_multiple_of == 8
    assert training_args.max_steps == 7 and training_args.gradient_accumulation_steps == 3
    assert training_args.unified_finetuning and training_args.use_self_distill and training_args.fix_encoder
    assert training_args.deepspeed is None and training_args.fp16 is False
    assert training_args.warmup_steps == 1  # 10% of 7 steps, rounded up as HF Trainer rounds a ratio


def test_warmup_is_a_step_count_on_both_transformers_majors(tmp_path):
    """transformers 5 has no --warmup_ratio; the ratio becomes the steps HF would derive from it."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"query": "q", "pos": ["p"], "neg": ["n"]}\n' * 50 + "\n")
    config = TrainConfig(train_data=[str(data)], per_device_train_batch_size=2, num_processes=2,
                         num_train_epochs=3, warmup_ratio=0.1)
    assert "--warmup_ratio" not in render(config)
    assert _args(render(config))["warmup_steps"] == "4"  # ceil(0.1 * (50 // 4) * 3 epochs)
    assert config.replace(max_steps=60).warmup_step_count() == 6 and config.replace(warmup_ratio=0).warmup_step_count() == 0
    assert config.replace(warmup_steps=7).warmup_step_count() == 7  # given steps, as they are
    with pytest.raises(ValueError, match="--train_data .*missing.jsonl: not found.*set max_steps"):
        render(config.replace(train_data=[str(tmp_path / "missing.jsonl")]))


def test_deepspeed_json_mirrors_the_config():
    ds = TrainConfig.common_t4_advice(gradient_accumulation_steps=4).deepspeed_config()
    assert ds["zero_optimization"]["stage"] == 1
    assert ds["zero_optimization"]["reduce_bucket_size"] == 500_000_000
    assert ds["train_micro_batch_size_per_gpu"] == 1 and ds["gradient_accumulation_steps"] == 4
    assert "train_batch_size" not in ds  # DeepSpeed derives it; see deepspeed_config's docstring
    assert ds["fp16"]["enabled"] is True and ds["bf16"]["enabled"] is False
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert TrainConfig(deepspeed_stage=None).deepspeed_config() is None
    offload = TrainConfig(deepspeed_stage=2, offload_optimizer=True).deepspeed_config()
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_shell_command_round_trips_through_the_shell():
    import shlex

    config = TrainConfig(train_data=["my data/train.jsonl"], max_steps=100)
    text = shell_command(config)
    assert shlex.split(text.replace("\\\n", " ")) == render(config)
    assert "\n    --train_group_size 8" in text


def test_format_command_puts_env_first():
    assert format_command(["torchrun", "-m", "x", "--a", "1"], {"K": "v w"}) == \
        "K='v w' torchrun \\\n    -m x \\\n    --a 1"


@pytest.mark.parametrize("changes, hardware, words", [
    (dict(fix_encoder=True, unified_finetuning=False, use_self_distill=False), None, "nothing would train"),
    (dict(negatives_cross_device=True, num_processes=1), None, "no effect"),
    (dict(bf16=True), T4, "no bf16"),
    (dict(fp16=True, bf16=True), None, "choose one"),
    (dict(fp16=True), CPU, "needs a CUDA GPU"),
    (dict(num_processes=2), T4, "has 1 GPU"),
    (dict(offload_optimizer=True, deepspeed_stage=0), None, "needs DeepSpeed ZeRO stage 1 or 2"),
    (dict(deepspeed_stage=3), None, "stages 0, 1 and 2"),
    (dict(deepspeed_stage=2, gradient_checkpointing=True), None, "Gradient computed twice"),
    (dict(train_group_size=0), None, "train_group_size is 0"),
    (dict(use_self_distill=True, unified_finetuning=False), None, "use_self_distill needs unified_finetuning"),
    (dict(max_steps=-1, num_train_epochs=0), None, "nothing would train"),
])
def test_invalid_combinations_are_refused_with_a_fix(changes, hardware, words):
    config = TrainConfig(**changes)
    with pytest.raises(ConfigError) as caught:
        config.check(hardware)
    assert words in str(caught.value)


def test_all_problems_are_listed_together():
    config = TrainConfig(fix_encoder=True, unified_finetuning=False, negatives_cross_device=True, bf16=True)
    assert len(config.problems(T4)) == 3


def test_the_presets_pass_on_a_t4():
    TrainConfig.common_t4_advice().check(T4)
    TrainConfig.upstream_example().check(T4)


def test_deepspeed_file_whose_batch_figures_disagree(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": "auto",
                                "train_batch_size": 8, "zero_optimization": {"stage": 1}}))
    config = TrainConfig(per_device_train_batch_size=2, deepspeed_stage=1, deepspeed_config_file=str(path))
    problems = config.problems()
    assert any("train_micro_batch_size_per_gpu is 4 but this configuration gives 2" in p for p in problems)
    assert any("train_batch_size is 8" in p for p in problems)
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 1}}))
    assert config.problems() == []
    path.write_text('{"zero_optimization": {"stage": 1},\n  oops}')
    assert any(f"{path}:2:" in p for p in config.problems())
