"""Real training: the FlagEmbedding M3 trainer launched with torchrun in a child process (``launch``),
the runner that process runs with m3lab's levers and resuming (``runner``; where a resumed run goes on
from: ``resume``; the saved folder made loadable by sentence-transformers too: ``saved_model``), the
memory meter inside it (``meter``), and the levers themselves: the sparse head in O(batch x vocab) (``sparse_head``) and
gradient caching (``grad_cache``)."""

__all__ = ["launch", "runner", "resume", "saved_model", "meter", "record", "sparse_head", "grad_cache"]
