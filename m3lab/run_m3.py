"""FlagEmbedding's M3 fine-tuning entry point with m3lab's step recorder attached.

``torchrun -m m3lab.run_m3 ARGS`` takes exactly the arguments of
``torchrun -m FlagEmbedding.finetune.embedder.encoder_only.m3 ARGS`` and runs the same runner,
model and trainer; it only adds ``measure.StepRecorder`` (when M3LAB_METRICS_DIR is set) and turns
a CUDA out-of-memory error into a record and exit code ``OOM_EXIT_CODE`` instead of a traceback.
"""

from __future__ import annotations

import sys

OOM_EXIT_CODE = 86


def main() -> int:
    import torch
    from transformers import HfArgumentParser

    from FlagEmbedding.finetune.embedder.encoder_only.m3 import (
        EncoderOnlyEmbedderM3DataArguments,
        EncoderOnlyEmbedderM3ModelArguments,
        EncoderOnlyEmbedderM3Runner,
        EncoderOnlyEmbedderM3TrainingArguments,
    )

    from m3lab.measure import StepRecorder

    parser = HfArgumentParser((EncoderOnlyEmbedderM3ModelArguments, EncoderOnlyEmbedderM3DataArguments,
                               EncoderOnlyEmbedderM3TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    recorder = StepRecorder.from_env()
    if recorder is not None:
        recorder.apply_cuda_limit()
    try:
        runner = EncoderOnlyEmbedderM3Runner(model_args=model_args, data_args=data_args, training_args=training_args)
        if recorder is not None:
            runner.trainer.add_callback(recorder)
        runner.run()
    except torch.OutOfMemoryError as error:
        if recorder is None:
            raise
        recorder.record_oom(error)
        print(f"m3lab: out of memory at step {recorder.current_step}: {error}", file=sys.stderr, flush=True)
        return OOM_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
