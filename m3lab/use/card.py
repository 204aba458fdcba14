"""The model card a fine-tuned folder is uploaded with: what it was fine-tuned from, on which data,
with which command, how to load it, and its held-out scores before and after, labelled with where they
were measured. Written as the folder's README.md, which the hub shows as the model's page.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from m3lab.io import write_text_atomic
from m3lab.use.evaluate import RetrievalScores


@dataclass(frozen=True)
class TrainingRecord:
    """What the card says of the fine-tune."""

    base_model: str
    train_data: Path
    command: str  # as it ran
    before: RetrievalScores | None = None
    after: RetrievalScores | None = None
    measured_on: str = ""  # where the scores were measured, e.g. "Tesla T4 (Colab)"


def _data_line(path: Path) -> str:
    data = path.read_bytes()
    lines = sum(1 for line in data.splitlines() if line.strip())
    return f"`{path.name}`: {lines} lines, sha256 `{hashlib.sha256(data).hexdigest()[:16]}`"


def card_text(record: TrainingRecord) -> str:
    """The card, Markdown with the hub's metadata block."""
    parts = ["---", f"base_model: {record.base_model}", "library_name: sentence-transformers", "tags:",
             "- sentence-transformers", "- feature-extraction", "- bge-m3", "- flagembedding",
             "pipeline_tag: sentence-similarity", "---", "",
             f"# {record.base_model}, fine-tuned", "",
             f"Fine-tuned from `{record.base_model}` with FlagEmbedding's M3 trainer (dense, sparse and ColBERT "
             "heads together, with self-distillation).", "",
             "## Data", "", _data_line(record.train_data), "",
             "## Training command", "", "```bash", record.command.strip(), "```", "",
             "## Loading", "",
             "```python",
             "from FlagEmbedding import BGEM3FlagModel  # all three heads: colbert_linear.pt, sparse_linear.pt",
             "model = BGEM3FlagModel(\"THIS_REPO\")",
             "from sentence_transformers import SentenceTransformer  # the dense vector: CLS pooling, normalised",
             "model = SentenceTransformer(\"THIS_REPO\")",
             "```", ""]
    if record.before is not None and record.after is not None:
        parts += ["## Held-out retrieval", "",
                  f"{record.after.queries} held-out queries against {record.after.corpus} passages, "
                  f"measured on {record.measured_on or 'the machine that trained it'}; combined is BGE-M3's weighted "
                  "sum (dense 0.4, sparse 0.2, ColBERT 0.4).", "",
                  "```", record.before.table(record.after), "```", ""]
    else:
        parts += ["## Held-out retrieval", "", "Not measured.", ""]
    return "\n".join(parts)


def write_model_card(folder: str | Path, record: TrainingRecord) -> Path:
    """The card written as ``folder``/README.md (replacing one a previous run left)."""
    path = Path(folder) / "README.md"
    write_text_atomic(path, card_text(record))
    return path
