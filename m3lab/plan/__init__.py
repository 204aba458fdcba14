"""What to run: the platforms a learner trains on (``platforms``), the best configuration a platform
holds for the learner's data (``fit``), the answer per platform with its command (``recipes``),
per-length batches (``buckets``; a pasted per-length command predicted file by file: ``per_file``), a run split across sessions (``sessions``), and the series' path
from FlagEmbedding's example to the recipe, one knob a step (``ledger``)."""

__all__ = ["platforms", "fit", "recipes", "buckets", "per_file", "sessions", "ledger"]
