"""The ``m3lab`` command line: the main job, data checks and the commands to copy."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _run(args) -> int:
    from m3lab.report import run_main_job

    run_main_job(args.out, model=args.model)
    return 0


def _validate(args) -> int:
    from m3lab.data import DataError, load_jsonl

    try:
        records = load_jsonl(args.files)
    except DataError as err:
        print(err, file=sys.stderr)
        return 1
    print(f"{len(records)} valid records in {len(args.files)} file(s)")
    return 0


def _command(args) -> int:
    from m3lab.config import TrainConfig

    presets = {"upstream-example": TrainConfig.upstream_example, "t4-advice": TrainConfig.common_t4_advice}
    config = presets[args.preset](model=args.model)
    print(config.shell_command(deepspeed_json_path=f"ds_stage{config.deepspeed_stage}.json"))
    if config.deepspeed_stage is not None:
        print(f"\n# ds_stage{config.deepspeed_stage}.json\n{config.deepspeed_json()}", end="")
    return 0


def _predict_spec(args):
    """A PredictSpec from ``m3lab predict``'s options (FlagEmbedding's and HF's defaults)."""
    from m3lab.config import TrainConfig
    from m3lab.memory import PredictSpec, bge_m3_config, load_model_config

    model_config = bge_m3_config() if args.model_config == "bge-m3" else load_model_config(args.model_config)
    if args.deepspeed in (None, "none"):
        deepspeed = None
    elif args.deepspeed in ("0", "1", "2"):
        precision = args.precision
        deepspeed = TrainConfig(deepspeed_stage=int(args.deepspeed), offload_optimizer=args.offload_optimizer,
                                fp16=precision == "fp16", bf16=precision == "bf16",
                                per_device_train_batch_size=args.batch_size,
                                gradient_accumulation_steps=args.gradient_accumulation_steps,
                                num_processes=args.num_gpus).deepspeed_config()
    else:
        deepspeed = json.loads(Path(args.deepspeed).read_text())
        if args.offload_optimizer:
            deepspeed.setdefault("zero_optimization", {})["offload_optimizer"] = {"device": "cpu"}
    if deepspeed is not None and "optimizer" in deepspeed and args.optim != "adamw_torch":
        raise SystemExit(f"m3lab predict: --optim {args.optim} has no effect with --deepspeed {args.deepspeed}: the "
                         "DeepSpeed JSON names its own optimizer and HF Trainer ignores --optim. Use --deepspeed none.")
    return PredictSpec(
        trainer=args.trainer, model_config=model_config, batch_size=args.batch_size,
        query_max_len=args.query_max_len, passage_max_len=args.passage_max_len,
        train_group_size=args.train_group_size, unified_finetuning=args.unified_finetuning,
        use_self_distill=args.use_self_distill, fix_encoder=args.fix_encoder,
        negatives_cross_device=args.negatives_cross_device, efficient_sparse_head=args.efficient_sparse_head,
        freeze_word_embeddings=args.freeze_word_embeddings, grad_cache_chunk_size=args.grad_cache_chunk_size,
        task=args.task, seq_len=args.seq_len,
        precision=args.precision, optim=args.optim, gradient_accumulation_steps=args.gradient_accumulation_steps,
        gradient_checkpointing=args.gradient_checkpointing, attn_implementation=args.attn_implementation,
        deepspeed=deepspeed, num_gpus=args.num_gpus)


def _predict(args) -> int:
    from m3lab.memory import GIB, predict

    import contextlib

    # DeepSpeed prints progress to stdout; with --json, stdout must hold the JSON object alone.
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        report = predict(gpu=args.gpu, spec=_predict_spec(args), record_events=bool(args.snapshot),
                         exact=args.exact)
    if args.snapshot:
        report.save_snapshot(args.snapshot)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    print(report.summary())
    print("breakdown at the peak: " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in report.breakdown.items()))
    print(f"first step {report.first_step_peak_bytes / GIB:.2f} GiB, steady state "
          f"{report.steady_step_peak_bytes / GIB:.2f} GiB; attention kernel: {report.attention_kernel}; "
          f"{report.method}, {report.seconds:.1f} s")
    for rank in report.per_rank if len(report.per_rank) > 1 else []:
        print(f"  rank {rank.rank}: peak {rank.peak_allocated_bytes / GIB:.2f} GiB, total {rank.total_bytes / GIB:.2f} GiB")
    return 0


def _fit(args) -> int:
    import contextlib

    from m3lab.data import DataError
    from m3lab.fit import fit
    from m3lab.memory import GIB

    try:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's progress; stdout is for the result
            result = fit(args.data, gpu=args.gpu, margin_gib=args.margin_gib, coverage=args.coverage,
                         max_group=args.max_group, log=lambda line: print(line, file=sys.stderr))
    except DataError as err:
        print(err, file=sys.stderr)
        return 1
    print(result.table())
    if result.best is None:
        print(f"\nNothing fits {result.gpu} with {args.margin_gib:g} GiB to spare, even with group 2 and every "
              f"lever (all figures predicted). Shorten the lengths (--coverage), or use a bigger card.")
        return 1
    config, report = result.best.config, result.best.report
    print(f"\nbest: {result.best.setting}, train_group_size {config.train_group_size}, query_max_len "
          f"{config.query_max_len}, passage_max_len {config.passage_max_len}; every parameter trained")
    print(report.summary())
    print(f"(margin asked: {args.margin_gib:g} GiB; total {report.total_bytes / GIB:.2f} GiB of "
          f"{report.usable_bytes / GIB:.2f} GiB)\n")
    ds_file = f"ds_stage{config.deepspeed_stage}.json"
    print(config.shell_command(deepspeed_json_path=ds_file))
    if config.deepspeed_stage is not None:
        print(f"\n# {ds_file}\n{config.deepspeed_json()}", end="")
    return 0


def _add_predict_options(parser) -> None:
    from m3lab.memory import OPTIMIZERS

    parser.add_argument("--trainer", choices=["flagembedding-m3", "hf"], default="flagembedding-m3")
    parser.add_argument("--model-config", default="bge-m3", help='"bge-m3" (built in) or a config.json path')
    parser.add_argument("--batch-size", type=int, default=8, help="per_device_train_batch_size (HF default 8)")
    parser.add_argument("--task", default="sequence-classification", choices=["sequence-classification"])
    parser.add_argument("--seq-len", type=int, default=512, help="hf: tokens per example")
    parser.add_argument("--query-max-len", type=int, default=32, help="FlagEmbedding's default 32")
    parser.add_argument("--passage-max-len", type=int, default=128, help="FlagEmbedding's default 128")
    parser.add_argument("--train-group-size", type=int, default=8)
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--optim", choices=list(OPTIMIZERS), default="adamw_torch")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--attn-implementation", choices=["eager", "sdpa"], default="sdpa")
    parser.add_argument("--deepspeed", default="none", help="none, 0, 1, 2, or a DeepSpeed JSON path")
    parser.add_argument("--offload-optimizer", action="store_true")
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument("--fix-encoder", action="store_true")
    parser.add_argument("--unified-finetuning", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--use-self-distill", action="store_true")
    parser.add_argument("--negatives-cross-device", action="store_true")
    parser.add_argument("--efficient-sparse-head", action="store_true",
                        help="m3lab's O(batch x vocab) sparse head (training runs use m3lab.run_m3)")
    parser.add_argument("--freeze-word-embeddings", action="store_true",
                        help="keep the word-embedding matrix fixed while the rest trains")
    parser.add_argument("--grad-cache-chunk-size", type=int, default=0, metavar="N",
                        help="gradient caching: encode N texts at a time (0: off; training runs use m3lab.run_m3)")
    parser.add_argument("--gpu", required=True, help="t4, t4x2, l4, a10g, v100, a100-40, a100-80, h100")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--snapshot", help="save the simulated allocation trace (memory_viz pickle)")
    parser.add_argument("--exact", action="store_true", help="trace every layer instead of extrapolating (slower)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="m3lab", description="Fine-tune BGE-M3 on a T4 without OOM.")
    sub = parser.add_subparsers(dest="verb")
    run = sub.add_parser("run", help="the main job: data check, measured runs, fine-tuning, report")
    run.add_argument("--out", default="results", help="where the report and plots go (default: results)")
    run.add_argument("--model", default="auto",
                     help='"auto" (BAAI/bge-m3 on a GPU, the tiny stand-in on CPU), "tiny-bge-m3", or a model id/path')
    run.set_defaults(func=_run)
    validate = sub.add_parser("validate", help="check JSONL training files and report every bad line")
    validate.add_argument("files", nargs="+")
    validate.set_defaults(func=_validate)
    command = sub.add_parser("command", help="print a FlagEmbedding command and DeepSpeed JSON to copy")
    command.add_argument("preset", choices=["upstream-example", "t4-advice"])
    command.add_argument("--model", default="BAAI/bge-m3")
    command.set_defaults(func=_command)
    predict = sub.add_parser("predict", help="predict the peak GPU memory of one training step")
    _add_predict_options(predict)
    predict.set_defaults(func=_predict)
    fit = sub.add_parser("fit", help="search the best configuration that fits a GPU and print its command")
    fit.add_argument("--gpu", default="t4", help="t4, l4, a10g, v100, a100-40, a100-80, h100 (default t4)")
    fit.add_argument("--data", nargs="+", default=["data/train.jsonl"], help="FlagEmbedding JSONL training file(s)")
    fit.add_argument("--margin-gib", type=float, default=1.0, help="GiB to leave free on the card (default 1.0)")
    fit.add_argument("--coverage", type=float, default=0.95,
                     help="share of the data's tokens the max lengths keep (default 0.95)")
    fit.add_argument("--max-group", type=int, default=16, help="largest train_group_size to consider (default 16)")
    fit.set_defaults(func=_fit)
    args = parser.parse_args(argv)
    if args.verb is None:
        args = parser.parse_args(["run", *(argv or [])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
