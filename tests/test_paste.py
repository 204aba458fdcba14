"""``m3lab predict -- <your command>``: FlagEmbedding's own example and JSON files, pasted verbatim."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from m3lab.cli import main as cli_main
from m3lab.command import Rendering, render
from m3lab.command import parse as parse_command
from m3lab.config import FLAGEMBEDDING_M3_MODULE, ConfigError, TrainConfig
from m3lab.predict import predict

UPSTREAM = Path(__file__).resolve().parent.parent / "data" / "upstream"


def _m3_sh_words(workdir: Path, num_gpus: int = 1) -> list[str]:
    """The words FlagEmbedding's m3.sh hands to torchrun, as bash expands them (num_gpus set to
    ``num_gpus``; the script is otherwise run as it is, from ``workdir``)."""
    script = (UPSTREAM / "m3.sh").read_text()
    assert "num_gpus=2\n" in script and script.rstrip().endswith("echo $cmd\neval $cmd")
    script = script.replace("num_gpus=2\n", f"num_gpus={num_gpus}\n")
    script = script.replace("echo $cmd\neval $cmd", 'eval "set -- $cmd"; printf "%s\\0" "$@"')
    out = subprocess.run(["bash", "-c", script], cwd=workdir, capture_output=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(workdir)})
    return out.stdout.decode().split("\0")[:-1]


@pytest.fixture
def example_dir(tmp_path, monkeypatch):
    """Where m3.sh runs: examples/finetune/embedder/encoder_only/, two levels below the JSON files."""
    for name in ("ds_stage0.json", "ds_stage1.json"):
        shutil.copyfile(UPSTREAM / name, tmp_path / name)
    workdir = tmp_path / "embedder" / "encoder_only"
    workdir.mkdir(parents=True)
    monkeypatch.chdir(workdir)
    return workdir


def test_flagembeddings_example_is_read_as_flagembedding_reads_it(example_dir):
    words = _m3_sh_words(example_dir)
    assert words[:5] == ["torchrun", "--nproc_per_node", "1", "-m", FLAGEMBEDDING_M3_MODULE]
    pasted = parse_command(words)
    config = pasted.config
    assert (config.train_group_size, config.query_max_len, config.passage_max_len) == (8, 512, 512)
    assert config.per_device_train_batch_size == 2 and config.fp16 and config.gradient_checkpointing
    assert config.unified_finetuning and config.use_self_distill and not config.fix_encoder
    assert config.pad_to_multiple_of == 8 and config.num_train_epochs == 4 and config.learning_rate == 1e-5
    # upstream's ds_stage0.json: ZeRO-0, DeepSpeed's own AdamW (FusedAdam, no torch_adam)
    assert config.deepspeed_stage == 0 and config.torch_adam is False
    assert config.deepspeed_config_file == "../../ds_stage0.json"
    # one process: nothing to share across devices, said so
    assert config.negatives_cross_device is False and config.num_processes == 1
    assert any("negatives_cross_device" in note for note in pasted.notes)


def test_flagembeddings_example_predicted_for_a_t4(example_dir, capsys):
    """The example as upstream ships it (FusedAdam, WarmupDecayLR scheduler): OOM on a T4."""
    words = _m3_sh_words(example_dir)
    assert cli_main(["predict", "--gpu", "t4", "--json", "--", *words]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["provenance"] == "predicted for Tesla T4 (Colab)"
    assert not out["fits"] and out["verdict"].startswith("out of memory in step 1 at ")
    assert out["spec"]["deepspeed"]["optimizer"]["type"] == "AdamW"
    assert "torch_adam" not in out["spec"]["deepspeed"]["optimizer"]["params"]  # upstream's file, as given


BF16_KEYS = ["hysteresis", "initial_scale_power", "loss_scale", "loss_scale_window", "min_loss_scale"]
ADVICE = (f"torchrun --nproc_per_node 1 -m {FLAGEMBEDDING_M3_MODULE} --model_name_or_path BAAI/bge-m3 "
          "--train_data ../example_data/retrieval --train_group_size 6 --query_max_len 64 "
          "--passage_max_len 392 --output_dir ./out --learning_rate 1e-5 --fp16 --num_train_epochs 1 "
          "--per_device_train_batch_size 1 --gradient_checkpointing --deepspeed ../../ds_stage1.json "
          "--negatives_cross_device False --unified_finetuning True --use_self_distill True --warmup_steps 100")


def test_upstreams_stage1_json_is_refused_naming_the_keys_to_delete(example_dir):
    """FlagEmbedding master's ds_stage1.json keeps fp16's loss-scale keys under "bf16", which DeepSpeed
    0.17.1 and later refuse at launch, in fp16 too (FlagEmbedding issue #1487)."""
    with pytest.raises(ConfigError) as caught:
        parse_command(ADVICE)
    (problem,) = caught.value.problems
    assert problem.startswith("../../ds_stage1.json: DeepSpeed refuses ") and "under \"bf16\"" in problem
    assert all(repr(key) in problem for key in BF16_KEYS) and "delete them from \"bf16\"" in problem


def test_deepspeed_itself_still_refuses_upstreams_stage1_json():
    """Holds upstream to the trap: DeepSpeed's own config class refuses master's file as it is (when
    DeepSpeed or FlagEmbedding changes, this fails and the lesson's warning goes)."""
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    settings = json.loads((UPSTREAM / "ds_stage1.json").read_text())
    assert sorted(set(settings["bf16"]) - {"enabled"}) == BF16_KEYS
    settings.update(train_batch_size=1, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    settings["fp16"]["enabled"] = True
    settings["bf16"]["enabled"] = False
    with pytest.raises(pydantic.ValidationError, match="5 validation errors for DeepSpeedBF16Config"):
        DeepSpeedConfig(settings)


def test_the_common_advice_with_upstreams_stage1_json_mended(example_dir):
    """The T4 advice as people run it: upstream's ds_stage1.json (ZeRO-1, torch_adam), 64/392, group 6,
    with the five keys deleted from "bf16": predicted as m3lab renders the same advice."""
    path = example_dir.parent.parent / "ds_stage1.json"
    settings = json.loads(path.read_text())
    settings["bf16"] = {"enabled": settings["bf16"]["enabled"]}
    path.write_text(json.dumps(settings))
    config = parse_command(ADVICE).config
    assert config.deepspeed_stage == 1 and config.torch_adam and config.reduce_bucket_size == 500_000_000
    report = predict(config, "t4")
    ours = predict(TrainConfig.common_t4_advice(), "t4")  # m3lab's rendering of the same advice
    assert report.peak_allocated_bytes == pytest.approx(ours.peak_allocated_bytes, rel=0.01)


def test_upstreams_scheduler_without_warmup_is_refused_as_deepspeed_refuses_it(example_dir):
    """Found by pasting: upstream's JSON files name WarmupDecayLR, HF fills its warmup_num_steps
    from the command (0 without --warmup_steps/--warmup_ratio) and DeepSpeed 0.19.8 refuses 0.
    transformers 5.18 fills at least 1 (a fix upstream): there the command runs, and m3lab, which fills
    the JSON with HF's own code, predicts it."""
    import transformers
    from packaging.version import Version

    command = (f"torchrun --nproc_per_node 1 -m {FLAGEMBEDDING_M3_MODULE} --model_name_or_path BAAI/bge-m3 "
               "--output_dir ./out --fp16 --deepspeed ../../ds_stage0.json")
    if Version(transformers.__version__) >= Version("5.18"):
        assert predict(parse_command(command).config, "t4").peak_allocated_bytes > 0  # no refusal
        return
    with pytest.raises(ConfigError, match="WarmupDecayLR scheduler gets warmup_num_steps 0"):
        predict(parse_command(command).config, "t4")


@pytest.mark.parametrize("spelling", [["--fp16"], ["--fp16", "True"], ["--fp16", "true"], ["--fp16=True"]])
def test_boolean_flags_mean_what_they_mean_to_flagembedding(spelling):
    words = ["torchrun", "--nproc_per_node", "1", "-m", FLAGEMBEDDING_M3_MODULE, "--model_name_or_path",
             "BAAI/bge-m3", "--output_dir", "out", *spelling, "--gradient_checkpointing"]
    config = parse_command(words).config
    assert config.fp16 is True and config.gradient_checkpointing is True and config.deepspeed_stage is None


@pytest.mark.parametrize("config", [
    TrainConfig.common_t4_advice(max_steps=20),
    # torch_adam names DeepSpeed's optimizer: without DeepSpeed it is not in the command
    TrainConfig.upstream_example(max_steps=20, deepspeed_stage=None, optim="adamw_bnb_8bit", sub_batch_size=4,
                                 torch_adam=True),
    TrainConfig.common_t4_advice(max_steps=20, efficient_sparse_head=True, grad_cache_chunk_size=2,
                                 freeze_word_embeddings=True),
])
def test_a_rendered_command_reads_back_as_the_same_config(config, tmp_path, monkeypatch):
    """One configuration: TrainConfig -> the command it renders -> parse_command -> the same TrainConfig."""
    monkeypatch.chdir(tmp_path)
    if config.deepspeed_stage is not None:
        (tmp_path / "ds.json").write_text(config.deepspeed_json())
    back = parse_command(render(config, Rendering(deepspeed_json_path="ds.json"))).config
    expected = config.replace(warmup_ratio=0.0, warmup_steps=config.warmup_step_count(),  # rendered as --warmup_steps
                              num_train_epochs=back.num_train_epochs,  # not rendered: max_steps rules
                              deepspeed_config_file="ds.json" if config.deepspeed_stage is not None else None)
    assert back == expected


def test_sub_batch_size_with_unified_finetuning_is_noted_as_failing_on_real_data():
    words = ["torchrun", "--nproc_per_node", "1", "-m", FLAGEMBEDDING_M3_MODULE, "--model_name_or_path",
             "BAAI/bge-m3", "--output_dir", "out", "--sub_batch_size", "1"]
    assert not parse_command(words).notes  # unified fine-tuning is off by default
    notes = parse_command(words + ["--unified_finetuning", "True"]).notes
    assert any("--sub_batch_size 1 with unified fine-tuning fails" in note for note in notes)


def test_one_string_as_copied_from_a_script():
    text = (f"CUDA_VISIBLE_DEVICES=0 torchrun --standalone --nproc_per_node 1 \\\n    -m {FLAGEMBEDDING_M3_MODULE} \\\n"
            "    --model_name_or_path BAAI/bge-m3 \\\n    --output_dir out --sub_batch_size 4 --train_group_size 4")
    config = parse_command(text).config
    assert config.sub_batch_size == 4 and config.train_group_size == 4


def test_python_dash_m_is_one_process():
    config = parse_command(["python", "-m", FLAGEMBEDDING_M3_MODULE, "--model_name_or_path", "BAAI/bge-m3",
                            "--output_dir", "o"]).config
    assert config.num_processes == 1 and config.query_max_len == 32  # FlagEmbedding's default


def test_flags_without_memory_effect_are_accepted_and_others_named():
    base = ["torchrun", "--nproc_per_node", "1", "-m", FLAGEMBEDDING_M3_MODULE, "--model_name_or_path", "BAAI/bge-m3",
            "--output_dir", "o"]
    parse_command(base + ["--save_steps", "50", "--report_to", "none", "--seed", "7", "--lr_scheduler_type", "cosine"])
    with pytest.raises(ConfigError) as caught:
        parse_command(base + ["--torch_compile", "True", "--fix_position_embedding", "True", "--frobnicate", "2"])
    text = str(caught.value)
    assert "--frobnicate: " in text and "--torch_compile True" in text and "--fix_position_embedding True" in text


def test_same_dataset_within_batch_without_an_instruction_gets_a_note():
    """FlagEmbedding 1.4.2 prefixes every query with "None" then (tests/test_batching.py shows it)."""
    base = (f"torchrun --nproc_per_node 1 -m {FLAGEMBEDDING_M3_MODULE} --model_name_or_path BAAI/bge-m3 "
            "--output_dir ./out --same_dataset_within_batch True")
    assert any('prefixed with the text "None"' in note for note in parse_command(base).notes)
    assert not any('"None"' in note for note in parse_command(base + " --query_instruction_for_retrieval ''").notes)
    assert not any('"None"' in note for note in parse_command(base.replace("True", "False")).notes)


def test_the_command_line_names_the_keys_in_one_line_with_status_2(example_dir, capsys):
    assert cli_main(["predict", "--gpu", "t4", "--", *ADVICE.split()]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("m3lab predict: ../../ds_stage1.json: DeepSpeed refuses ")
    assert "'min_loss_scale'" in err[0]
