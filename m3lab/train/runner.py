"""FlagEmbedding's M3 fine-tuning entry point with m3lab's step recorder attached.

``torchrun -m m3lab.run_m3 ARGS`` (which runs this module's ``main``) takes the arguments of
``torchrun -m FlagEmbedding.finetune.embedder.encoder_only.m3 ARGS`` and runs the same runner,
model and trainer; it adds ``meter.StepRecorder`` (when M3LAB_METRICS_DIR is set), turns a CUDA
out-of-memory error into a record and exit code ``OOM_EXIT_CODE`` instead of a traceback, resumes
from FlagEmbedding's own M3 checkpoints (``resuming``: FlagEmbedding 1.4.2's runner cannot, without
DeepSpeed), finds the newest one itself (``--resume_from_checkpoint latest``, ``m3lab.train.resume``),
writes sentence-transformers' module files beside the saved model (``m3lab.train.saved_model``), and
takes m3lab's own levers as extra arguments (``--efficient_sparse_head True``,
``--grad_cache_chunk_size 1`` or ``--grad_cache_chunk_tokens 8192``, ``--use_lora True``: ``m3lab.train.lora``).
"""

from __future__ import annotations

import sys

from m3lab.config import RESUME_LATEST, M3LabArguments
from m3lab.errors import ConfigError
from m3lab.train import resume

OOM_EXIT_CODE = 86


def apply_levers(model, m3lab_args: M3LabArguments, base_model: str | None = None):
    """m3lab's levers on a built FlagEmbedding M3 model (the runner and the predictor both use this);
    ``base_model``: the command's --model_name_or_path, which a LoRA adapter names as its base."""
    if m3lab_args.efficient_sparse_head:
        from m3lab.train.sparse_head import use_efficient_sparse_head

        use_efficient_sparse_head(model)
    if m3lab_args.grad_cache_chunk_size or m3lab_args.grad_cache_chunk_tokens:
        from m3lab.train.grad_cache import use_grad_cache

        use_grad_cache(model, m3lab_args.grad_cache_chunk_size, m3lab_args.grad_cache_chunk_tokens)
    if m3lab_args.freeze_word_embeddings:
        model.model.get_input_embeddings().weight.requires_grad_(False)
    if m3lab_args.use_lora:
        from m3lab.train.lora import use_lora

        use_lora(model, m3lab_args.lora_rank, m3lab_args.lora_alpha, m3lab_args.lora_dropout, m3lab_args.target_modules,
                 base_model)
    return model


def load_m3_checkpoint(model, folder: str) -> None:
    """A checkpoint of FlagEmbedding's M3 model, loaded where FlagEmbedding saved each part: the encoder
    as a transformers model (``save_pretrained``, read back with ``from_pretrained``, which knows how
    the installed transformers names what it saved, sharded or not), the ColBERT and sparse heads as
    .pt files beside it; under LoRA, the encoder's adapter as peft saved it."""
    import os

    import torch

    from m3lab.train import lora

    encoder = model.model
    if lora.is_adapter(encoder):
        lora.load_adapter_weights(encoder, folder)
    else:
        encoder.load_state_dict(type(encoder).from_pretrained(folder).state_dict())
    for head in ("colbert_linear", "sparse_linear"):
        path = os.path.join(folder, f"{head}.pt")
        if getattr(model, head, None) is not None and os.path.isfile(path):
            getattr(model, head).load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def resuming(trainer_class):
    """FlagEmbedding's trainer, able to resume from its own checkpoints. HF Trainer loads a checkpoint's
    weights into the model it trains by their names; FlagEmbedding's M3 model wraps the encoder and
    saves it apart, so HF finds none of its names and stops in its warning about them ("...has no
    attribute '_keys_to_ignore_on_save'": the wrapper is a plain module). With DeepSpeed, DeepSpeed
    loads its own checkpoint and this is not called. (Trainer._load_from_checkpoint: m3lab.compat's TARGETS)"""
    class ResumingTrainer(trainer_class):
        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            load_m3_checkpoint(model if model is not None else self.model, resume_from_checkpoint)

    return ResumingTrainer


def _runner_class(m3lab_args: M3LabArguments):
    """FlagEmbedding's runner, or a subclass that switches the model it builds to m3lab's levers."""
    from FlagEmbedding.finetune.embedder.encoder_only.m3 import (
        EncoderOnlyEmbedderM3Runner,
    )

    if m3lab_args.levers == M3LabArguments():
        return EncoderOnlyEmbedderM3Runner

    class M3LabRunner(EncoderOnlyEmbedderM3Runner):
        def load_tokenizer_and_model(self):
            tokenizer, model = super().load_tokenizer_and_model()
            return tokenizer, apply_levers(model, m3lab_args, base_model=self.model_args.model_name_or_path)

    return M3LabRunner


def _resolve_latest(training_args, m3lab_args: M3LabArguments) -> str | None:
    """``--resume_from_checkpoint latest`` made the newest checkpoint's folder, or nothing (the run
    starts from the beginning); a refusal in a sentence where FlagEmbedding would refuse the folder."""
    import os

    rank = os.environ.get("RANK", "0")
    found = resume.resolve(training_args.output_dir, m3lab_args.previous_output_dirs,
                           log=print if rank == "0" else lambda line: None)
    training_args.resume_from_checkpoint = found
    output = training_args.output_dir
    if found is None and os.path.isdir(output) and os.listdir(output):
        return (f"m3lab: {output} holds files but no complete checkpoint to go on from (one has trainer_state.json): "
                f"move them elsewhere or give another --output_dir, then run the command again.")
    return None


def _for_other_tools(output_dir: str) -> None:
    """sentence-transformers' module files beside the saved model (m3lab.train.saved_model), by rank 0."""
    import os

    if os.environ.get("RANK", "0") == "0" and os.path.isfile(os.path.join(output_dir, "config.json")):
        from m3lab.train.saved_model import write_sentence_transformers_files

        write_sentence_transformers_files(output_dir)
        print(f"m3lab: {output_dir} also loads in sentence-transformers with BGE-M3's pooling (CLS, normalised)")


def main() -> int:
    import os

    import torch
    from FlagEmbedding.finetune.embedder.encoder_only.m3 import (
        EncoderOnlyEmbedderM3DataArguments,
        EncoderOnlyEmbedderM3ModelArguments,
        EncoderOnlyEmbedderM3TrainingArguments,
    )
    from transformers import HfArgumentParser

    from m3lab.train.meter import StepRecorder, limit_sdpa_kernels

    parser = HfArgumentParser((EncoderOnlyEmbedderM3ModelArguments, EncoderOnlyEmbedderM3DataArguments,
                               EncoderOnlyEmbedderM3TrainingArguments, M3LabArguments))
    model_args, data_args, training_args, m3lab_args = parser.parse_args_into_dataclasses()
    if training_args.resume_from_checkpoint == RESUME_LATEST:
        refusal = _resolve_latest(training_args, m3lab_args)
        if refusal:
            print(refusal, file=sys.stderr, flush=True)
            return 2
    limit_sdpa_kernels()
    recorder = StepRecorder.from_env()
    if recorder is not None:
        recorder.apply_cuda_limit()
    try:
        runner = _runner_class(m3lab_args)(model_args=model_args, data_args=data_args, training_args=training_args)
        runner.trainer.__class__ = resuming(type(runner.trainer))
        if recorder is not None:
            runner.trainer.add_callback(recorder)
        runner.run()
        _for_other_tools(training_args.output_dir)
        if m3lab_args.save_merged_lora_model and os.environ.get("RANK", "0") == "0":
            from m3lab.train.lora import merge

            merged = merge(training_args.output_dir, base_model=model_args.model_name_or_path)
            print(f"m3lab: {merged} holds the merged model (the adapter folded into the encoder, both heads beside)")
    except ConfigError as error:  # what the run found it cannot do as asked (e.g. a checkpoint of another adapter)
        print("\n".join(f"m3lab: {problem}" for problem in error.problems), file=sys.stderr, flush=True)
        return 2
    except torch.OutOfMemoryError as error:
        if recorder is None:
            raise
        recorder.record_oom(error)
        print(f"m3lab: out of memory at step {recorder.current_step}: {error}", file=sys.stderr, flush=True)
        return OOM_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
