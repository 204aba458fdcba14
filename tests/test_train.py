"""Real FlagEmbedding M3 fine-tuning of the tiny stand-in, launched with torchrun on CPU."""

import math

import pytest

from m3lab.config import ConfigError, TrainConfig
from m3lab.data.jsonl import DataError, load_jsonl
from m3lab.train.launch import TrainingFailed, train

pytestmark = pytest.mark.slow

# Small, fast and still every part of the M3 loss: dense, sparse, ColBERT, self-distillation.
TINY = TrainConfig(model="tiny-bge-m3", train_group_size=4, query_max_len=32, passage_max_len=64,
                   per_device_train_batch_size=2, max_steps=3, learning_rate=1e-4, deepspeed_stage=1,
                   reduce_bucket_size=1_000_000, use_self_distill=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, standin_dir):
    root = tmp_path_factory.mktemp("runs")
    return {
        "stage0": train(TINY.replace(deepspeed_stage=0), runs_root=root),
        "stage1": train(TINY.replace(max_steps=36, learning_rate=3e-4), runs_root=root),
        "stage1x2": train(TINY.replace(num_processes=2, negatives_cross_device=True,
                                       same_dataset_within_batch=True,
                                       query_instruction_for_retrieval=""), runs_root=root),
    }


def test_each_run_trains_with_finite_losses_and_measured_memory(runs):
    for name, result in runs.items():
        assert result.status == "ok", name
        assert result.device == "cpu"
        assert result.provenance == "measured on CPU (tiny stand-in)"
        assert len(result.steps) == result.config.max_steps
        assert all(math.isfinite(loss) for loss in result.losses)
        assert all(s.peak_allocated_bytes >= s.allocated_after_step_bytes > 0 for s in result.steps)
        assert all(s.step_time_s > 0 for s in result.steps)
        assert "-m m3lab.run_m3" in result.command and result.log_path.exists()


def test_loss_goes_down_over_a_few_dozen_steps(runs):
    losses = runs["stage1"].losses
    assert len(losses) == 36
    assert sum(losses[-6:]) / 6 < 0.8 * sum(losses[:6]) / 6


def test_zero1_on_two_processes_halves_the_optimizer_state_per_rank(runs):
    single = runs["stage1"].optimizer_state_bytes(0)
    two = runs["stage1x2"]
    assert [r.rank for r in two.ranks] == [0, 1]
    for rank in (0, 1):
        assert two.optimizer_state_bytes(rank) == pytest.approx(single / 2, rel=0.01)
    # ZeRO-0 keeps everything on every rank; the tiny model has 889,089 parameters, 2 fp32 moments each.
    trainable = runs["stage0"].ranks[0].trainable_params
    assert runs["stage0"].optimizer_state_bytes(0) == pytest.approx(8 * trainable, rel=0.001)
    assert single == pytest.approx(8 * trainable, rel=0.001)


def test_two_cpu_processes_are_one_data_parallel_run_not_two_copies(runs_root):
    """Without DeepSpeed too: every rank holds the same weights after each step, and an epoch takes half
    the steps (two copies would each walk the whole file, on different batches)."""
    two = train(TINY.replace(num_processes=2, deepspeed_stage=None, optim="adamw_torch", max_steps=2),
                runs_root=runs_root)
    assert two.status == "ok", two.log_path.read_text()[-3000:]
    first, second = (rank.steps for rank in two.ranks)
    assert [s.weights_sum for s in first] == [s.weights_sum for s in second]
    assert len({s.weights_sum for s in first}) == 2  # and they do change
    lines = len(load_jsonl(two.config.train_data))
    per_epoch = lines // (2 * TINY.per_device_train_batch_size)
    assert first[0].epoch == pytest.approx(1 / per_epoch, rel=0.01)


def test_without_unified_finetuning_the_heads_are_not_saved_and_load_at_random(runs_root):
    """FlagEmbedding's default --unified_finetuning False: no head files, and BGEM3FlagModel makes both
    heads up on every load (held, so that an upstream fix shows; the lessons warn of it)."""
    from FlagEmbedding import BGEM3FlagModel

    dense_only = train(TINY.replace(unified_finetuning=False, use_self_distill=False, max_steps=1), runs_root=runs_root)
    assert dense_only.status == "ok", dense_only.log_path.read_text()[-3000:]
    folder = dense_only.run_dir / "model"
    assert not (folder / "colbert_linear.pt").exists() and not (folder / "sparse_linear.pt").exists()
    loads = [BGEM3FlagModel(str(folder), use_fp16=False, devices="cpu").encode(
        ["the memory a T4 holds"], return_dense=False, return_colbert_vecs=True)["colbert_vecs"][0] for _ in range(2)]
    assert loads[0].shape == loads[1].shape and abs(loads[0] - loads[1]).max() > 1e-3


def test_command_that_ran_is_kept(runs):
    result = runs["stage1x2"]
    assert "--nproc_per_node 2" in result.command
    assert "--negatives_cross_device True" in result.command
    assert (result.run_dir / "command.sh").read_text().strip() == result.command
    assert (result.run_dir / "ds_stage1.json").exists()


def test_out_of_memory_comes_back_as_a_result_and_the_next_run_works(runs_root):
    result = train(TINY.replace(max_steps=2), runs_root=runs_root, memory_limit_bytes=30 * 2**20)
    assert result.status == "oom"
    assert result.oom_step == 1
    assert "memory limit" in result.oom_message
    assert "OUT OF MEMORY at step 1" in result.summary()
    assert result.log_path.exists()
    assert train(TINY.replace(max_steps=1), runs_root=runs_root).status == "ok"


def test_fix_encoder_trains_only_the_sparse_and_colbert_heads(runs_root, standin_dir):
    result = train(TINY.replace(max_steps=2, fix_encoder=True, gradient_checkpointing=True), runs_root=runs_root)
    hidden = 64
    assert result.ranks[0].trainable_params == (hidden * hidden + hidden) + (hidden + 1)
    assert result.optimizer_state_bytes(0) == pytest.approx(8 * result.ranks[0].trainable_params, rel=0.01)


def test_an_existing_run_folder_is_never_overwritten(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "result.json").write_text("{}")
    with pytest.raises(FileExistsError, match="never overwrites"):
        train(TINY, tmp_path / "old")
    assert (tmp_path / "old" / "result.json").read_text() == "{}"


def test_a_failing_child_shows_its_log(tmp_path):
    not_a_model = tmp_path / "empty-model"
    not_a_model.mkdir()
    with pytest.raises(TrainingFailed) as caught:
        train(TINY.replace(model=str(not_a_model)), tmp_path / "run")
    assert "last lines of the log" in str(caught.value)
    assert caught.value.result.status == "failed"
    assert (tmp_path / "run" / "train.log").exists()


def test_bad_config_and_bad_data_are_refused_before_launch(tmp_path):
    with pytest.raises(ConfigError):
        train(TINY.replace(negatives_cross_device=True), tmp_path / "a")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "pos": []}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        train(TINY.replace(train_data=[str(bad)]), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_zero2_with_optimizer_offload_runs(runs_root):
    result = train(TINY.replace(deepspeed_stage=2, offload_optimizer=True, max_steps=2), runs_root=runs_root)
    assert result.status == "ok"
    ds = (result.run_dir / "ds_stage2.json").read_text()
    assert '"offload_optimizer"' in ds and '"zero_force_ds_cpu_optimizer": false' in ds
    assert result.optimizer_state_bytes(0) == pytest.approx(8 * result.ranks[0].trainable_params, rel=0.001)
