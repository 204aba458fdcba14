"""The learner's training data: FlagEmbedding's JSONL format, read and checked (``jsonl``), the bundled
sample and how it is built (``sample``), and which texts FlagEmbedding's own datasets put in one
batch (``batching``)."""

__all__ = ["jsonl", "sample", "batching"]
