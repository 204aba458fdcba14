"""A run per platform: the card says what to run and what it costs, each figure labelled, and its
command, pasted back into ``m3lab predict --``, describes the very configuration that was predicted."""

import dataclasses

import pytest

from m3lab.command import parse as parse_command
from m3lab.plan import recipes
from m3lab.predict import steptime


@pytest.fixture(scope="module")
def kaggle_stock():
    return recipes.answer_for("kaggle-t4x2", stock=True)


def _command(card: str) -> str:
    lines = card.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Run it from this folder")) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return "\n".join(lines[start:end])


def test_card_names_the_platform_and_labels_every_figure(kaggle_stock):
    card = kaggle_stock.card()
    assert card.startswith("## Kaggle: 2 x Tesla T4, 29.0 GB host RAM; FlagEmbedding as it is")
    assert "GPU, predicted for 2 x Tesla T4 (Kaggle)" in card and "host, predicted:" in card
    assert "estimated at 13% to 24% of its datasheet peak" in card and "training time, estimated:" in card
    # the work counted at the lengths this data's batches pad to, and the two GPUs' gradient exchange
    assert "at the lengths your data's batches pad to" in card and "the gradients' exchange between the GPUs" in card
    assert "torchrun --standalone --nproc_per_node 2" in card  # two T4s, two processes
    assert "--output_dir /kaggle/working/bge-m3-finetuned" in card and "Save Version" in card
    # the resume finds the newest checkpoint itself, also where Kaggle gives the last version's output back
    assert kaggle_stock.resume_command().endswith(
        "--resume_from_checkpoint latest \\\n    --previous_output_dirs /kaggle/input")


def test_card_command_is_the_predicted_configuration(kaggle_stock):
    best = kaggle_stock.fitted.best
    pasted = parse_command(_command(kaggle_stock.card())).config
    # the run adds what the prediction does not depend on: epochs, warm-up and checkpoints
    assert pasted == kaggle_stock.config.replace(warmup_ratio=0.0)
    assert pasted.replace(num_train_epochs=best.config.num_train_epochs, warmup_ratio=best.config.warmup_ratio,
                          warmup_steps=None, save_steps=None, save_total_limit=None,
                          train_data=best.config.train_data) == best.config
    assert best.config.negatives_cross_device  # shared across the two GPUs, as m3.sh runs it
    assert steptime.step_time(best.report).fastest_seconds > 0


def test_deepspeed_card_prints_the_json_its_command_names(tmp_path):
    answer = recipes.answer_for("colab-t4", stock=True)
    # the run as found may not use DeepSpeed; swap in a ZeRO-1 configuration to check the card's JSON
    zero1 = dataclasses.replace(answer, config=answer.config.replace(deepspeed_stage=1, optim="adamw_torch"))
    card = zero1.card()
    assert "--deepspeed ds_stage1.json" in card
    assert "# ds_stage1.json (write it beside the command)" in card and '"stage": 1' in card
    assert zero1.write_deepspeed_json(tmp_path).read_text() == zero1.config.deepspeed_json()


def test_card_without_the_hosts_ram_says_it_was_not_checked(kaggle_stock):
    """``m3lab fit --gpu t4`` (no --platform, no --host-ram-gib) prints the same card: the host's
    figure stands alone, labelled unchecked."""
    platform = dataclasses.replace(kaggle_stock.platform, host_ram_bytes=None)
    figures = dataclasses.replace(kaggle_stock, platform=platform).figures()
    assert any(line.startswith("host, predicted: ") and "(the host's RAM was not given: not checked)" in line
               for line in figures)
