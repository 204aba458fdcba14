"""FlagEmbedding's traps a learner meets before memory matters, each held to upstream: when FlagEmbedding
(or DeepSpeed, or HF) changes, these fail, and the lesson that teaches the trap must change with it.
(The "None" + query trap is held in tests/test_batching.py; master's ds_stage1.json in tests/test_paste.py.)"""

import importlib.metadata
import re
from pathlib import Path

import pytest
import torch

from m3lab.config import ConfigError, Hardware, TrainConfig

REPO = Path(__file__).resolve().parent.parent


def test_a_second_run_into_a_full_output_folder_is_refused_only_with_do_train(tmp_path, standin_dir):
    """FlagEmbedding 1.4.2's runner refuses an output folder that holds files unless the command resumes,
    and only when --do_train is on (HF's default is off: a second run then writes over the first).
    m3lab's commands say --do_train True."""
    from FlagEmbedding.finetune.embedder.encoder_only.m3 import (
        EncoderOnlyEmbedderM3Runner,
    )
    from transformers import HfArgumentParser

    from m3lab import command
    from m3lab.command import _argument_parser

    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    words = command.render(TrainConfig.common_t4_advice(deepspeed_stage=None, max_steps=4),
                           command.Rendering(output_dir=str(out)))
    arguments = words[words.index("-m") + 2:]
    assert "--do_train" in arguments
    assert isinstance(_argument_parser(command.FLAGEMBEDDING_M3_MODULE), HfArgumentParser)
    model_args, data_args, training_args = _argument_parser(command.FLAGEMBEDDING_M3_MODULE).parse_args_into_dataclasses(
        arguments)
    with pytest.raises(ValueError, match="already exists and is not empty. Please use a new output directory or set "
                                         "--resume_from_checkpoint"):
        EncoderOnlyEmbedderM3Runner(model_args, data_args, training_args)
    training_args.resume_from_checkpoint = str(out / "checkpoint-2")
    model_args.model_name_or_path = str(standin_dir)  # past the check it loads the model: the stand-in
    runner = EncoderOnlyEmbedderM3Runner(model_args, data_args, training_args)
    assert runner.training_args.resume_from_checkpoint == str(out / "checkpoint-2")


def test_the_finetune_extra_still_pulls_flash_attn_and_the_install_never_asks_for_it():
    """FlagEmbedding's own instruction, `pip install FlagEmbedding[finetune]`, builds flash-attn, which
    fails on Colab and on CPU machines (FlagEmbedding #1273, #1432, #1501): m3lab installs FlagEmbedding
    without the extra (its training needs nothing the extra brings but DeepSpeed, which m3lab names)."""
    requires = importlib.metadata.requires("FlagEmbedding") or []
    finetune = [r for r in requires if re.search(r'extra\s*==\s*"finetune"', r)]
    assert any(r.lower().startswith("flash-attn") for r in finetune), finetune
    assert any(r.lower().startswith("deepspeed") for r in finetune)
    asked = [path.name for path in [REPO / "README.md", REPO / "pyproject.toml", *(REPO / "notebooks").glob("*.py")]
             if "FlagEmbedding[finetune]" in path.read_text().replace("`pip install FlagEmbedding[finetune]`", "")]
    assert not asked, f"{asked} install FlagEmbedding's [finetune] extra"


def test_the_none_query_trap_is_refused_at_launch_and_predicted_anyway():
    trap = TrainConfig.common_t4_advice(same_dataset_within_batch=True, fp16=False)
    with pytest.raises(ConfigError, match=r'trains as "None" \+ query'):
        trap.check(Hardware())
    trap.check()  # the predictor: memory is the same either way
    trap.replace(query_instruction_for_retrieval="").check(Hardware())
    assert not TrainConfig.common_t4_advice().same_dataset_within_batch


def _loss(parts, tokenizer, queries: list[str], passages: list[str]) -> torch.Tensor:
    from FlagEmbedding.finetune.embedder.encoder_only.m3.modeling import (
        EncoderOnlyEmbedderM3Model,
    )

    model = EncoderOnlyEmbedderM3Model(parts, tokenizer=tokenizer, temperature=0.02, normalize_embeddings=True,
                                       unified_finetuning=False, use_self_distill=False).eval()
    batch = {"queries": dict(tokenizer(queries, padding=True, return_tensors="pt")),
             "passages": dict(tokenizer(passages, padding=True, return_tensors="pt"))}
    model.train()
    return model(**batch).loss.detach()


def test_group_one_trains_on_in_batch_negatives_and_contrasts_nothing_alone(standin_dir):
    """FlagEmbedding trains train_group_size 1 (BGE-M3's unsupervised stage did, at batch 700): each
    query's negatives are the other queries' positives. With one query on one process there is
    nothing to contrast, and FlagEmbedding's loss is exactly 0: m3lab refuses that run."""
    from FlagEmbedding.finetune.embedder.encoder_only.m3.runner import (
        EncoderOnlyEmbedderM3Runner,
    )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(standin_dir))
    parts = EncoderOnlyEmbedderM3Runner.get_model(str(standin_dir), False, -1)
    torch.manual_seed(0)
    alone = _loss(parts, tokenizer, ["what is a decorator"], ["A decorator wraps a function."])
    assert alone.item() == 0.0
    together = _loss(parts, tokenizer, ["what is a decorator", "wie bindet Python Namen?"],
                     ["A decorator wraps a function.", "Namen werden an Objekte gebunden."])
    assert together.item() > 0
    with pytest.raises(ConfigError, match="contrast each query's positive with nothing"):
        TrainConfig(train_group_size=1, per_device_train_batch_size=1).check()
    TrainConfig(train_group_size=1, per_device_train_batch_size=2).check()
    TrainConfig(train_group_size=1, per_device_train_batch_size=1, num_processes=2, negatives_cross_device=True).check()


def test_m3labs_runner_loads_each_part_of_a_flagembedding_checkpoint_where_it_was_saved(standin_dir, tmp_path):
    """What resuming needs: the encoder and both heads as FlagEmbedding's M3 model saved them (the run
    itself, stopped and resumed, is tests/test_answers.py)."""
    from FlagEmbedding.finetune.embedder.encoder_only.m3.modeling import (
        EncoderOnlyEmbedderM3Model,
    )
    from FlagEmbedding.finetune.embedder.encoder_only.m3.runner import (
        EncoderOnlyEmbedderM3Runner,
    )
    from transformers import AutoTokenizer

    from m3lab.train.runner import load_m3_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(str(standin_dir))

    def model():
        return EncoderOnlyEmbedderM3Model(EncoderOnlyEmbedderM3Runner.get_model(str(standin_dir), False, -1),
                                          tokenizer=tokenizer, unified_finetuning=True)

    trained = model()
    with torch.no_grad():
        for param in trained.parameters():
            param.add_(0.5)
    trained.save(str(tmp_path))
    fresh = model()
    assert not torch.equal(fresh.colbert_linear.weight, trained.colbert_linear.weight)
    load_m3_checkpoint(fresh, str(tmp_path))
    for (name, mine), (_, theirs) in zip(fresh.state_dict().items(), trained.state_dict().items()):
        assert torch.equal(mine, theirs), name


def test_flagembeddings_example_flags_meet_the_installed_transformers_as_the_lessons_say():
    """m3.sh's training flags, verbatim, through FlagEmbedding's own parser: on the installed transformers
    exactly the changes ``UPSTREAM_FLAG_CHANGES`` dates at or before it are refused or warned (the lanes
    run this on Colab's 5.15, Kaggle's 5.0 and a fresh install's newest; CI's lock is 4.57.6)."""
    import warnings

    import transformers
    from packaging.version import Version

    from m3lab.command import (
        FLAGEMBEDDING_M3_MODULE,
        UPSTREAM_FLAG_CHANGES,
        _argument_parser,
    )

    installed = Version(transformers.__version__)
    script = (REPO / "data" / "upstream" / "m3.sh").read_text()
    for change in UPSTREAM_FLAG_CHANGES:
        assert f"    {change.flag} \\\n" in script, f"m3.sh no longer has {change.flag}"
    arguments = ["--model_name_or_path", "BAAI/bge-m3", "--train_data", str(REPO / "data" / "train.jsonl"),
                 "--output_dir", "out"]
    arguments += [word for change in UPSTREAM_FLAG_CHANGES for word in change.flag.split()]
    parser = _argument_parser(FLAGEMBEDDING_M3_MODULE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        *_, leftover = parser.parse_args_into_dataclasses(arguments, return_remaining_strings=True)
        parser.parse_args_into_dataclasses(["--model_name_or_path", "m", "--train_data", str(REPO / "data" / "train.jsonl"), "--output_dir", "o",
                                            "--gradient_checkpointing"])
    refused = {word for word in leftover if word.startswith("--")}
    expected = {c.flag.split()[0] for c in UPSTREAM_FLAG_CHANGES if c.refused and installed >= Version(c.since)}
    assert refused == expected, f"transformers {installed} refuses {refused}"
    warned = any("gradient_checkpointing" in str(w.message) and "deprecated" in str(w.message) for w in caught)
    assert warned == (installed >= Version("5.23")), f"transformers {installed}: the deprecation warning {warned}"


def test_flagembeddings_evaluation_scores_the_dense_vector_only_and_caches_by_the_folders_last_name():
    """FlagEmbedding's `python -m FlagEmbedding.evaluation.custom` (read in its code: importing it needs
    faiss and pytrec_eval, which m3lab does not install): its retriever is dense only, its results are
    kept under the model folder's last name (`os.path.basename` of the model's path) and reused while
    `--overwrite` is False, its default; so a base model and a fine-tuned one in folders of the same
    name share results without a word. Lesson 07 says so; m3lab's evaluation scores all three heads
    and keeps nothing between runs."""
    import ast
    import importlib.util

    root = Path(importlib.util.find_spec("FlagEmbedding").origin).parent / "abc" / "evaluation"
    searcher = (root / "searcher.py").read_text()
    assert "return os.path.basename(self.embedder.model.config._name_or_path)" in searcher
    assert 'corpus_emb = corpus_emb["dense_vecs"]' in searcher and "lexical_weights" not in searcher
    runner = (root / "runner.py").read_text()
    assert "retriever = EvalDenseRetriever(" in runner and "EvalSparseRetriever" not in runner
    evaluator = (root / "evaluator.py").read_text()
    assert "search_results_save_dir, str(retriever), \"NoReranker\"" in evaluator
    assert "if not os.path.exists(split_no_reranker_search_results_save_path) or self.overwrite:" in evaluator
    arguments = ast.parse((root / "arguments.py").read_text())
    (overwrite,) = [node for node in ast.walk(arguments) if isinstance(node, ast.AnnAssign)
                    and getattr(node.target, "id", "") == "overwrite"]
    default = [k.value.value for k in overwrite.value.keywords if k.arg == "default"]
    assert default == [False]
