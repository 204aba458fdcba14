"""LoRA on BGE-M3's encoder, its sparse and ColBERT heads trained in full; all three vectors trained.

BGE-M3's dense vector is the encoder's first ([CLS]) output, with no weights of its own: under LoRA it
changes through the adapter. The sparse and ColBERT vectors have their own layers, trained in full.

``--use_lora True`` (FlagEmbedding's own flag names for decoder-only models, which its M3 runner does
not take) wraps the XLM-R encoder with peft: each targeted weight is frozen and a low-rank update
(rank ``--lora_rank``, scaled by ``--lora_alpha / --lora_rank``) is trained beside it. The two heads
FlagEmbedding's M3 model keeps outside the encoder (``colbert_linear``, ``sparse_linear``) are not
wrapped and train as before, with unified fine-tuning and self-distillation unchanged. The targets
(``m3lab.config.LORA_TARGETS``) are
the encoder layers' attention and feed-forward projections, named so that the pooler (which BGE-M3
never uses) is left out; peft's own default for XLM-R would take only query and value.

FlagEmbedding's ``save()`` then writes ``adapter_config.json`` and ``adapter_model.safetensors`` (peft's
files) and the two heads' .pt files; ``BGEM3FlagModel(folder)`` loads it through transformers' peft
integration. ``merge`` (``--save_merged_lora_model True`` at the end of a run, or
``python -m m3lab.train.lora FOLDER`` for a folder already saved) writes ``FOLDER/merged_model``: the
encoder with the adapter folded into its weights, the tokenizer, both heads and sentence-transformers'
module files, for tools that know no adapters.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HEAD_FILES = ("colbert_linear.pt", "sparse_linear.pt")
MERGED_FOLDER = "merged_model"  # where FlagEmbedding's decoder-only runner writes its merged model too
ADAPTER_CONFIG = "adapter_config.json"


def use_lora(model, rank: int, alpha: float, dropout: float, targets: list[str] | tuple[str, ...],
             base_model: str | None = None) -> None:
    """Wrap ``model.model`` (FlagEmbedding's M3 encoder) with a LoRA adapter; the two heads stay trainable.

    ``base_model``: the name the command gave (``--model_name_or_path``), written into the saved
    adapter's config. Without it peft writes the folder the encoder was read from, which for a hub id
    is FlagEmbedding's download cache (its runner swaps ``BAAI/bge-m3`` for the snapshot folder): a path
    that a new Colab or Kaggle session, or another machine, does not have."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(task_type=TaskType.FEATURE_EXTRACTION, r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=list(targets), base_model_name_or_path=base_model)
    model.model = get_peft_model(model.model, config)
    if base_model:  # peft fills the field from the encoder only where it is empty
        model.model.peft_config["default"].base_model_name_or_path = base_model


def is_adapter(encoder) -> bool:
    from peft import PeftModel

    return isinstance(encoder, PeftModel)


def load_adapter_weights(encoder, folder: str | Path) -> None:
    """A saved adapter's weights into a wrapped encoder (resuming from a checkpoint); refused in a
    sentence when they are not the same adapter (peft's own load skips what does not match)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from m3lab.errors import ConfigError

    result = set_peft_model_state_dict(encoder, load_file(str(Path(folder) / "adapter_model.safetensors")))
    missing = [key for key in result.missing_keys if "lora_" in key]
    if result.unexpected_keys or missing:
        raise ConfigError([f"{folder} holds an adapter on other layers than this run wraps ({len(missing)} of its "
                           f"tensors missing, {len(result.unexpected_keys)} not this run's): resume with the "
                           "--target_modules and --lora_rank the checkpoint was trained with, or start a new run."])


def merge(folder: str | Path, base_model: str | None = None) -> Path:
    """``folder``'s adapter folded into its base model, written with the tokenizer and both heads to
    ``folder/merged_model``; returns that folder. ``base_model``: where the base weights are, when not
    where the adapter's config says."""
    import json

    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    from m3lab.io import replace_folder_atomic
    from m3lab.train.saved_model import write_sentence_transformers_files

    folder = Path(folder)
    base = base_model or json.loads((folder / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    merged = PeftModel.from_pretrained(AutoModel.from_pretrained(base), str(folder)).merge_and_unload()

    def write(target: Path) -> None:
        merged.save_pretrained(target)
        AutoTokenizer.from_pretrained(str(folder)).save_pretrained(target)
        for head in HEAD_FILES:
            if (folder / head).is_file():
                shutil.copy2(folder / head, target / head)
        write_sentence_transformers_files(target)

    return replace_folder_atomic(folder / MERGED_FOLDER, write)


def main(argv: list[str] | None = None) -> int:
    """``python -m m3lab.train.lora FOLDER [BASE_MODEL]``: a saved adapter folder merged."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2) or not (Path(args[0]) / ADAPTER_CONFIG).is_file():
        print(f"m3lab: give the folder a LoRA run saved its adapter in (it holds {ADAPTER_CONFIG}), e.g. "
              "python -m m3lab.train.lora bge-m3-finetuned", file=sys.stderr)
        return 2
    target = merge(args[0], args[1] if len(args) == 2 else None)
    print(f"m3lab: {target} holds the merged model (loads in BGEM3FlagModel and sentence-transformers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
