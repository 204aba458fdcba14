"""How the figures are checked: the GPU check that measures real steps (``gpu_check``), the files it
writes (``measurements``), measured against predicted (``compare``), and the benchmarks of the
predictor (``bench``), of per-length batches (``bench_buckets``) and of gradient caching
(``side_by_side``)."""

__all__ = ["gpu_check", "measurements", "compare", "bench", "bench_buckets", "side_by_side"]
