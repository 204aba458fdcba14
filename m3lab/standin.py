"""The BGE-M3 stand-ins: XLM-RoBERTa-shaped checkpoints built offline and deterministically.

The tiny stand-in has BGE-M3's architecture and files (config, safetensors weights, XLM-R special
tokens, ``colbert_linear.pt``, ``sparse_linear.pt``) at toy dimensions, so FlagEmbedding's own
loading and training code runs on it unchanged on a CPU. ``resolve_model`` makes choosing it one
argument; ``load_tokenizer`` picks the tokenizer lengths are counted with (BGE-M3's own where it
can be had). The full-size stand-in (``full_size_path``) has BGE-M3's exact dimensions and vocabulary
size with random weights: a GPU run of it uses the memory a run of the real checkpoint uses, with
no download (the GPU check, ``m3lab.evidence.gpu_check``, trains it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

REAL_MODEL = "BAAI/bge-m3"
STANDIN = "tiny-bge-m3"  # the name users pass instead of "BAAI/bge-m3"
FULL_SIZE_STANDIN = "bge-m3-shaped"  # random weights at BGE-M3's dimensions, for memory checks on a GPU

# BGE-M3's geometry, for reference and for the predictor: XLM-RoBERTa-large with 8194 positions.
BGE_M3_CONFIG = dict(
    vocab_size=250_002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
    intermediate_size=4096, max_position_embeddings=8194, type_vocab_size=1,
    pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5,
)

# The stand-in keeps everything but the sizes; max_position_embeddings stays 8194 so that the
# long-context lessons can run on it too.
STANDIN_SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
STANDIN_VOCAB_SIZE = 4000  # SentencePiece pieces; the tokenizer adds <s>, <pad>, </s>, <mask>
SPECIAL_TOKEN_IDS = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}  # XLM-R's; <mask> is the last id
SEED = 0
BUILD_VERSION = 3  # bump when the recipe changes, so cached builds are rebuilt (3: the tokenizer ships)


# The stand-in's tokenizer ships with m3lab, written once under transformers 4 by
# ``python -m m3lab.standin --write-tokenizer``: transformers 5 converts the same SentencePiece model
# into a different fast tokenizer (about 6% fewer tokens on the corpus) whose config transformers 4
# cannot read, so a tokenizer built at run time would make the stand-in differ from stack to stack.
# Both majors read these files the same way (tested: the same ids).
TOKENIZER_DIR = Path(__file__).resolve().parent / "standin_tokenizer"
TOKENIZER_FILES = ("sentencepiece.bpe.model", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json")


def _corpus_texts(corpus_path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in corpus_path.read_text(encoding="utf-8").splitlines()]


def default_corpus_path() -> Path:
    from m3lab.data.sample import DATA_DIR

    return DATA_DIR / "corpus.jsonl"


def default_cache_dir() -> Path:
    return Path(os.environ.get("M3LAB_CACHE", Path.home() / ".cache" / "m3lab"))


def write_tokenizer(target: Path = TOKENIZER_DIR, corpus_path: Path | None = None) -> Path:
    """Train the stand-in's tokenizer on the bundled corpus and write its files into ``target``.

    An XLM-R tokenizer over a SentencePiece Unigram model: SentencePiece is what XLM-R's own
    tokenizer was trained with, and with one thread it learns the same model every time (the
    ``tokenizers`` Unigram trainer does not: tie-scored pieces come out in hash order).
    ``XLMRobertaTokenizerFast`` adds XLM-R's fairseq numbering, <s>=0, <pad>=1, </s>=2, <unk>=3,
    <mask> last, and converts it to a ``tokenizers`` fast tokenizer; that conversion changed in
    transformers 5, so this runs under transformers 4 only.
    """
    import sentencepiece
    import transformers
    from transformers import XLMRobertaTokenizerFast

    if int(transformers.__version__.split(".")[0]) >= 5:
        raise SystemExit("write the stand-in's tokenizer under transformers 4 (make setup's .venv): transformers "
                         f"{transformers.__version__} converts SentencePiece models differently.")
    texts = _corpus_texts(corpus_path or default_corpus_path())
    with tempfile.TemporaryDirectory() as scratch:
        model_file = Path(scratch) / "sentencepiece.bpe.model"  # the file name XLM-R checkpoints use
        with model_file.open("wb") as handle:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=iter(texts), model_writer=handle, vocab_size=STANDIN_VOCAB_SIZE,
                model_type="unigram", character_coverage=1.0, num_threads=1, max_sentence_length=1 << 20,
                unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, minloglevel=2,
            )
        tokenizer = XLMRobertaTokenizerFast.from_pretrained(
            scratch, model_max_length=BGE_M3_CONFIG["max_position_embeddings"] - 2)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    expected = STANDIN_VOCAB_SIZE + 2  # XLM-R's numbering of the pieces, as transformers 4 builds it
    if len(tokenizer) != expected:
        raise RuntimeError(f"the stand-in's tokenizer ({folder}) has {len(tokenizer)} tokens instead of {expected}: "
                           "this transformers version reads it differently; report it with your versions.")
    return tokenizer


def build(target: Path, full_size: bool = False) -> Path:
    """Build the stand-in checkpoint into ``target`` (which must not exist) and return it.

    ``full_size``: BGE-M3's dimensions and its 250,002-row vocabulary (2.3 GB of fp32 weights),
    with the tiny stand-in's tokenizer, whose ids all fall inside that vocabulary.
    """
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    target = Path(target)
    if target.exists():
        raise FileExistsError(f"{target} already exists; pass a new folder or delete it first.")
    staging = Path(tempfile.mkdtemp(dir=target.parent if target.parent.exists() else None,
                                    prefix=f".{target.name}."))
    try:
        for name in TOKENIZER_FILES:
            shutil.copyfile(TOKENIZER_DIR / name, staging / name)
        tokenizer = _load_tokenizer(staging)
        sizes = {} if full_size else {**STANDIN_SIZES, "vocab_size": len(tokenizer)}
        config = XLMRobertaConfig(**{**BGE_M3_CONFIG, **sizes})
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(SEED)
        try:
            model = XLMRobertaModel(config, add_pooling_layer=True)
            colbert_linear = torch.nn.Linear(config.hidden_size, config.hidden_size)
            sparse_linear = torch.nn.Linear(config.hidden_size, 1)
        finally:
            torch.random.set_rng_state(generator_state)
        model.save_pretrained(staging, safe_serialization=True)
        torch.save(colbert_linear.state_dict(), staging / "colbert_linear.pt")
        torch.save(sparse_linear.state_dict(), staging / "sparse_linear.pt")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staging, target)
        except OSError as error:
            if not target.exists():
                raise
            # another process finished the same build first (os.replace onto a non-empty folder)
            raise FileExistsError(f"{target} was built by another process meanwhile") from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _cache_key() -> str:
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        digest.update((TOKENIZER_DIR / name).read_bytes())
    digest.update(json.dumps([STANDIN_SIZES, SEED, BUILD_VERSION]).encode())
    return digest.hexdigest()[:12]


def standin_path(cache_dir: Path | None = None, full_size: bool = False) -> Path:
    """The cached stand-in checkpoint (tiny, or ``full_size``), built on first use."""
    name = FULL_SIZE_STANDIN if full_size else STANDIN
    target = (cache_dir or default_cache_dir()) / f"{name}-{_cache_key()}"
    if not target.exists():
        try:
            build(target, full_size=full_size)
        except FileExistsError:  # another process built it meanwhile
            pass
    return target


def full_size_path(cache_dir: Path | None = None) -> Path:
    """The cached full-size stand-in: BGE-M3's shapes, random weights (2.3 GB on disk)."""
    return standin_path(cache_dir, full_size=True)


def resolve_model(model: str) -> str:
    """What FlagEmbedding's ``--model_name_or_path`` gets for ``model``: a hub id, a folder, or the stand-in."""
    if model == STANDIN:
        return str(standin_path())
    return model


def is_standin(model: str) -> bool:
    return model == STANDIN or Path(model).name.startswith(STANDIN + "-")


def hub_reachable(timeout_s: float = 2.0) -> bool:
    """Whether the Hugging Face hub answers at all (offline machines fail at once, not after retries)."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


class CountingTokenizer(NamedTuple):
    """The tokenizer lengths are counted with, and its name (which every count's label carries)."""

    tokenizer: Any
    name: str


def load_tokenizer() -> CountingTokenizer:
    """BGE-M3's own tokenizer where it is cached or the hub answers, else the stand-in's."""
    from transformers import AutoTokenizer

    try:
        return CountingTokenizer(AutoTokenizer.from_pretrained(REAL_MODEL, local_files_only=not hub_reachable()),
                                 REAL_MODEL)
    except (OSError, ValueError):
        return CountingTokenizer(AutoTokenizer.from_pretrained(resolve_model(STANDIN)), STANDIN)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m m3lab.standin", description=__doc__.splitlines()[0])
    parser.add_argument("--write-tokenizer", action="store_true",
                        help=f"retrain the stand-in's tokenizer on data/corpus.jsonl into {TOKENIZER_DIR.name}/")
    if parser.parse_args().write_tokenizer:
        print(write_tokenizer())
    else:
        print(standin_path())
