"""The folder a run saves, as other tools load it: sentence-transformers, with BGE-M3's pooling.

FlagEmbedding 1.4.2 saves the encoder and its two heads but not sentence-transformers' module files
(its code for them is commented out), and ``SentenceTransformer(folder)`` then loads the folder
silently with mean pooling and no normalisation: other vectors than BGE-M3's dense ones. BGE-M3's
dense vector is the first token's hidden state ([CLS]), normalised; ``write_sentence_transformers_files``
writes the files that say so, as BAAI/bge-m3 on the hub has them (``modules.json``, ``1_Pooling/``,
``2_Normalize/``, ``sentence_bert_config.json``). The two heads' files stay for FlagEmbedding.
"""

from __future__ import annotations

import json
from pathlib import Path

from m3lab.io import write_text_atomic

MAX_SEQ_LENGTH = 8192  # BGE-M3's longest input

MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]


def write_sentence_transformers_files(folder: str | Path) -> list[Path]:
    """Write the module files into a saved model's ``folder``; returns what it wrote."""
    folder = Path(folder)
    hidden = json.loads((folder / "config.json").read_text())["hidden_size"]
    pooling = {"word_embedding_dimension": hidden, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False,
               "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}
    files = {
        folder / "modules.json": MODULES,
        folder / "1_Pooling" / "config.json": pooling,
        folder / "sentence_bert_config.json": {"max_seq_length": MAX_SEQ_LENGTH, "do_lower_case": False},
    }
    (folder / "2_Normalize").mkdir(exist_ok=True)  # Normalize has no settings: the folder is all it needs
    for path, content in files.items():
        path.parent.mkdir(exist_ok=True)
        write_text_atomic(path, json.dumps(content, indent=2) + "\n")
    return [*files, folder / "2_Normalize"]


def main(argv: list[str] | None = None) -> int:
    """``python -m m3lab.train.saved_model FOLDER``: the files written into a folder FlagEmbedding saved."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not (Path(args[0]) / "config.json").is_file():
        print("m3lab: give the folder a run saved its model in (it holds config.json), e.g. "
              "python -m m3lab.train.saved_model bge-m3-finetuned", file=sys.stderr)
        return 2
    write_sentence_transformers_files(args[0])
    print(f"{args[0]} now also loads in sentence-transformers with BGE-M3's pooling (CLS, normalised)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
