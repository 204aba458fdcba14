"""The ``m3lab`` command line: the main job, data checks and the commands to copy."""

from __future__ import annotations

import argparse
import json
import os
import sys

from m3lab.gpus import PROFILES


def _run(args) -> int:
    from m3lab.lessons.main_job import run_main_job

    run_main_job(args.out, model=args.model)
    return 0


def _say_repository_copies(paths: list[str]) -> None:
    """One line on stderr for each path read from the m3lab repository, not from this folder."""
    from m3lab.data.jsonl import repository_copy_note

    for path in paths:
        if note := repository_copy_note(path):
            print(note, file=sys.stderr)


def _validate(args) -> int:
    from m3lab.data.jsonl import load_jsonl

    _say_repository_copies(args.files)
    records = load_jsonl(args.files)
    print(f"{len(records)} valid records in {len(args.files)} file(s)")
    return 0


def _command(args) -> int:
    from m3lab.command import shell_command
    from m3lab.config import TrainConfig

    presets = {"upstream-example": TrainConfig.upstream_example, "t4-advice": TrainConfig.common_t4_advice}
    config = presets[args.preset](model=args.model)
    print(shell_command(config))
    if config.deepspeed_stage is not None:
        print(f"\n# {config.deepspeed_file_name}\n{config.deepspeed_json()}", end="")
    return 0


# m3lab predict's own options and their defaults: FlagEmbedding 1.4.2's and HF Trainer's, so that
# leaving an option out means what leaving it out of a FlagEmbedding command means
# (tests/test_cli.py holds these to FlagEmbedding's argument classes).
FLAGEMBEDDING_DEFAULTS = {"per_device_train_batch_size": 8, "query_max_len": 32, "passage_max_len": 128,
                          "train_group_size": 8, "unified_finetuning": False, "use_self_distill": False,
                          "gradient_accumulation_steps": 1, "optim": "adamw_torch_fused", "sub_batch_size": None}


def _config_from_options(args):
    """The TrainConfig that ``m3lab predict``'s own options describe."""
    from m3lab.config import TrainConfig
    from m3lab.standin import REAL_MODEL

    optim = args.optim
    if args.deepspeed in (None, "none"):
        deepspeed = dict(deepspeed_stage=None, torch_adam=args.torch_adam)
    elif args.deepspeed in ("0", "1", "2"):
        deepspeed = dict(deepspeed_stage=int(args.deepspeed), torch_adam=args.torch_adam)
    else:
        from m3lab import deepspeed_json

        ds = deepspeed_json.read(args.deepspeed)
        deepspeed = dict(deepspeed_config_file=args.deepspeed, deepspeed_stage=ds.stage,
                         offload_optimizer=ds.offload_optimizer, reduce_bucket_size=ds.reduce_bucket_size,
                         torch_adam=ds.torch_adam if ds.names_optimizer else args.torch_adam)
    if deepspeed["deepspeed_stage"] is not None and optim == FLAGEMBEDDING_DEFAULTS["optim"]:
        optim = "adamw_torch"  # unused: HF hands DeepSpeed the JSON's optimizer (--optim stays at its default)
    if args.offload_optimizer:
        deepspeed["offload_optimizer"] = True
    return TrainConfig(
        model=REAL_MODEL if args.model_config == "bge-m3" else args.model_config, trainer=args.trainer,
        seq_len=args.seq_len, per_device_train_batch_size=args.batch_size, query_max_len=args.query_max_len,
        passage_max_len=args.passage_max_len, train_group_size=args.train_group_size,
        unified_finetuning=args.unified_finetuning, use_self_distill=args.use_self_distill,
        fix_encoder=args.fix_encoder, negatives_cross_device=args.negatives_cross_device,
        sub_batch_size=args.sub_batch_size, efficient_sparse_head=args.efficient_sparse_head,
        freeze_word_embeddings=args.freeze_word_embeddings, grad_cache_chunk_size=args.grad_cache_chunk_size,
        grad_cache_chunk_tokens=args.grad_cache_chunk_tokens,
        fp16=args.precision == "fp16", bf16=args.precision == "bf16", optim=optim,
        gradient_accumulation_steps=args.gradient_accumulation_steps, gradient_checkpointing=args.gradient_checkpointing,
        num_processes=args.num_gpus, attn_implementation=args.attn_implementation,
        max_steps=1000, **deepspeed)


def _predicted(args):
    """The prediction ``m3lab predict`` prints: of the pasted command, or of the options."""
    from m3lab.errors import ConfigError
    from m3lab.gpus import gpu_profile
    from m3lab.predict import predict

    if args.command:
        from m3lab.command import parse

        own = [dest for dest, default in args.defaults.items() if getattr(args, dest) != default]
        if own:
            raise ConfigError([f"{', '.join('--' + d.replace('_', '-') for d in own)} and a pasted command both "
                               "describe the run; put every setting in the command after --."])
        pasted = parse(args.command)
        config = pasted.config
        for note in pasted.notes:
            print(f"note: {note}", file=sys.stderr)
    else:
        config = _config_from_options(args)
    card = gpu_profile(args.gpu)
    if config.bf16 and not card.supports_bf16:
        print(f"note: {card.name} has no bf16 units (compute capability {card.compute_capability[0]}."
              f"{card.compute_capability[1]}, bf16 needs 8.0): the run works, emulated and slow; --fp16 is the "
              "half precision it runs fast.", file=sys.stderr)
    if args.command:
        from m3lab.plan import per_file

        if per_file.carries_batch_sizes(config):  # per-length files: each file is its own run
            found = per_file.tightest(config, args.gpu, per_file.file_runs(config))
            print(f"note: {found.describe()}", file=sys.stderr)
            config = found.run.config(config)
            if not args.snapshot:
                return found.report
    # One prediction per process: one_shot forks helpers that start with what is imported here,
    # instead of a lasting pool of workers that import everything again (see m3lab.predict.pool).
    return predict(config, args.gpu, record_events=bool(args.snapshot), exact=True if args.exact else None,
                   one_shot=True)


def _predict(args) -> int:
    import contextlib

    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    # DeepSpeed logs to stdout (on import, and while it runs); with --json, stdout must hold the JSON
    # object alone, so everything before it goes to stderr, DeepSpeed's first import included.
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        report = _predicted(args)
    from m3lab.predict import GIB, steptime

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
        print(f"  rank {rank.rank}: peak {rank.peak_allocated_bytes / GIB:.2f} GiB, needs {rank.total_bytes / GIB:.2f} GiB")
    print(f"time: {steptime.describe(report)}")
    return 0


def _fit(args) -> int:
    import contextlib

    from m3lab.data.jsonl import load_jsonl
    from m3lab.errors import ConfigError
    from m3lab.plan.fit import fit
    from m3lab.plan.platforms import platform_for
    from m3lab.plan.recipes import answer

    # an unknown GPU or platform is a mistake to report before the data is read
    platform_for(args.platform, args.gpu, args.host_ram_gib)
    if args.margin_gib < 0 or not 0 < args.coverage <= 1 or args.max_group < 2:
        raise ConfigError(["--margin-gib must be 0 or more, --coverage between 0 and 1 (e.g. 0.95), --max-group 2 or "
                       f"more; got {args.margin_gib:g}, {args.coverage:g}, {args.max_group}."])

    if args.grad_cache_chunk_tokens is not None and not args.buckets:
        raise ConfigError(["--grad-cache-chunk-tokens sizes the chunks of a per-length plan; the one-length search "
                           "tries its own gradient cache settings. Add --buckets DIR, or leave it out."])
    _say_repository_copies(args.data)
    if args.buckets:
        return _fit_buckets(args)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's progress; stdout is for the result
        result = fit(args.data, gpu=args.gpu, margin_gib=args.margin_gib, coverage=args.coverage,
                     max_group=args.max_group, log=lambda line: print(line, file=sys.stderr),
                     platform=args.platform, host_ram_gib=args.host_ram_gib, stock=args.stock, lora=args.lora)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0 if result.best is not None else 1
    print(result.table())
    if result.best is None:
        from m3lab.plan.fit import SHORTEST_PASSAGES

        short = ("the host's RAM is short in every trial" if not any(t.host_fits for t in result.trials) else
                 f"the GPU is short even with passages cut to {SHORTEST_PASSAGES} tokens")
        print(f"\nNothing fits {result.platform.name} with {args.margin_gib:g} GiB to spare on the GPU, even "
              f"with group 2 and every {'stock knob' if args.stock else 'lever'} (all figures predicted): "
              f"{short}. Use a bigger card, or one with more host RAM (--gpu, --host-ram-gib).")
        return 1
    print(f"(margin asked: {args.margin_gib:g} GiB on the GPU)\n")
    run = answer(result, len(load_jsonl(args.data)), output_dir=args.output_dir)
    if args.write_json and run.config.deepspeed_stage is not None:
        print(f"wrote {run.write_deepspeed_json()}", file=sys.stderr)
    print(run.card())  # last: the command (and its JSON) is what a reader copies
    return 0


def _fit_buckets(args) -> int:
    """``m3lab fit --buckets DIR``: the per-length batches, their files in DIR and the command."""
    import contextlib

    from m3lab.errors import ConfigError
    from m3lab.plan import buckets
    from m3lab.plan.recipes import as_seen_from_here

    if args.gpu or args.json or args.write_json:
        raise ConfigError(["--buckets plans for a platform (--platform colab-t4 or kaggle-t4x2) and prints a table "
                           "and a command; leave out --gpu, --json and --write-json."])
    with contextlib.redirect_stdout(sys.stderr):
        plan = buckets.plan(args.data, args.platform or "colab-t4", stock=args.stock, margin_gib=args.margin_gib,
                            chunk_tokens=args.grad_cache_chunk_tokens, lora=args.lora,
                            log=lambda line: print(line, file=sys.stderr))
        costs = buckets.epoch_costs(plan)
    written = plan.write(args.buckets)
    print(plan.table())
    print()
    print(buckets.cost_table(costs))
    print(f"\n# {len(written)} files in {args.buckets}, one per bucket, each line carrying its batch_size.")
    print(plan.instructions(as_seen_from_here(args.buckets), args.output_dir))
    return 0


def _add_predict_options(parser) -> None:
    from m3lab.config import OPTIMIZERS

    d = FLAGEMBEDDING_DEFAULTS
    parser.add_argument("--gpu", required=True, help=", ".join(PROFILES))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--snapshot", help="save the simulated allocation trace (memory_viz pickle)")
    parser.add_argument("--exact", action="store_true", help="trace every layer instead of extrapolating (slower)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="after --: your training command as you run it (torchrun ... -m "
                             "FlagEmbedding.finetune.embedder.encoder_only.m3 ...); or describe the run with the "
                             "options below (FlagEmbedding's defaults)")
    run = parser.add_argument_group("the run, without a pasted command (defaults: FlagEmbedding's and HF Trainer's)")
    run.add_argument("--trainer", choices=["flagembedding-m3", "hf"], default="flagembedding-m3")
    run.add_argument("--model-config", default="bge-m3", help='"bge-m3" (built in) or a config.json path')
    run.add_argument("--batch-size", type=int, default=d["per_device_train_batch_size"],
                     help="per_device_train_batch_size (HF default 8)")
    run.add_argument("--seq-len", type=int, default=512, help="hf: tokens per example")
    run.add_argument("--query-max-len", type=int, default=d["query_max_len"], help="FlagEmbedding's default 32")
    run.add_argument("--passage-max-len", type=int, default=d["passage_max_len"], help="FlagEmbedding's default 128")
    run.add_argument("--train-group-size", type=int, default=d["train_group_size"])
    run.add_argument("--sub-batch-size", type=int, default=d["sub_batch_size"], metavar="N",
                     help="FlagEmbedding's --sub_batch_size: encode N texts at a time")
    run.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    run.add_argument("--optim", choices=list(OPTIMIZERS), default=d["optim"], help="without DeepSpeed (HF's default "
                     "adamw_torch_fused)")
    run.add_argument("--gradient-accumulation-steps", type=int, default=d["gradient_accumulation_steps"])
    run.add_argument("--gradient-checkpointing", action="store_true")
    run.add_argument("--attn-implementation", choices=["eager", "sdpa"], default="sdpa")
    run.add_argument("--deepspeed", default="none", help="none, 0, 1, 2 (m3lab's JSON), or your DeepSpeed JSON's path")
    run.add_argument("--torch-adam", action=argparse.BooleanOptionalAction, default=True,
                     help="with --deepspeed 0/1/2: torch's AdamW (default) or, --no-torch-adam, DeepSpeed's FusedAdam")
    run.add_argument("--offload-optimizer", action="store_true")
    run.add_argument("--num-gpus", type=int, default=1)
    run.add_argument("--fix-encoder", action="store_true")
    run.add_argument("--unified-finetuning", action=argparse.BooleanOptionalAction, default=d["unified_finetuning"])
    run.add_argument("--use-self-distill", action=argparse.BooleanOptionalAction, default=d["use_self_distill"])
    run.add_argument("--negatives-cross-device", action="store_true")
    run.add_argument("--efficient-sparse-head", action="store_true",
                     help="m3lab's O(batch x vocab) sparse head (training runs use m3lab.run_m3)")
    run.add_argument("--freeze-word-embeddings", action="store_true",
                     help="keep the word-embedding matrix fixed while the rest trains")
    run.add_argument("--grad-cache-chunk-size", type=int, default=0, metavar="N",
                     help="gradient caching: encode N texts at a time (0: off; training runs use m3lab.run_m3)")
    run.add_argument("--grad-cache-chunk-tokens", type=int, default=0, metavar="N",
                     help="gradient caching: encode about N tokens at a time, texts per chunk N // their length "
                          "(0: off; instead of --grad-cache-chunk-size)")
    parser.set_defaults(run_options=[action.dest for action in run._group_actions])


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake ends in one line that says what to do (exit status 2, as argparse's)."""

    def error(self, message):
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="m3lab", description="Fine-tune BGE-M3 on a T4 without OOM.")
    sub = parser.add_subparsers(dest="verb", parser_class=_Parser)
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
    fit = sub.add_parser("fit", help="search the best configuration that fits a platform and print its command")
    fit.add_argument("--platform", help="colab-t4 (one T4, 12.7 GB host RAM) or kaggle-t4x2 (two T4s, 29 GB)")
    fit.add_argument("--gpu", help=f"instead of --platform: {', '.join(PROFILES)} (default t4)")
    fit.add_argument("--host-ram-gib", type=float, help="with --gpu: the host's RAM in GiB (not checked without it)")
    fit.add_argument("--stock", action="store_true",
                     help="FlagEmbedding as it is: none of m3lab's levers (its own sparse head, no gradient cache)")
    fit.add_argument("--lora", action="store_true",
                     help="train a LoRA adapter on the encoder (rank 64) with the sparse and ColBERT heads in full")
    fit.add_argument("--json", action="store_true", help="print the chosen configuration and its report as JSON")
    fit.add_argument("--data", nargs="+", default=["data/train.jsonl"],
                     help="FlagEmbedding JSONL training file(s), as this folder sees them (they go into the command so)")
    fit.add_argument("--output-dir", help="where the run saves checkpoints and the model (default: the platform's "
                     "folder that outlives a session, e.g. Google Drive on Colab; ./bge-m3-finetuned with --gpu)")
    fit.add_argument("--write-json", action="store_true",
                     help="write the DeepSpeed JSON the command names into this folder")
    from m3lab.gpus import CLOSE_CALL_BYTES, GIB

    fit.add_argument("--margin-gib", type=float, default=CLOSE_CALL_BYTES / GIB,
                     help=f"GiB to leave free on the card (default {CLOSE_CALL_BYTES / GIB:g}: no close call)")
    fit.add_argument("--buckets", metavar="DIR",
                     help="per-length batches instead: split the data by length into files in DIR, each batched at "
                          "the largest size the platform holds (up to a cap on a step's tokens), nothing cut; print the table and the command")
    fit.add_argument("--grad-cache-chunk-tokens", type=int, metavar="N",
                     help="with --buckets: the gradient cache's tokens a chunk (default 8192 with m3lab's levers, "
                          "none with --stock; 0: no gradient cache)")
    fit.add_argument("--coverage", type=float, default=0.95,
                     help="share of the data's tokens the max lengths keep (default 0.95)")
    fit.add_argument("--max-group", type=int, default=16, help="largest train_group_size to consider (default 16)")
    fit.set_defaults(func=_fit)
    args = parser.parse_args(argv)
    if args.verb is None:
        args = parser.parse_args(["run", *(argv or [])])
    if args.verb == "predict":
        args.defaults = {dest: predict.get_default(dest) for dest in args.run_options}
    return _reporting_mistakes(args)


def entry() -> None:
    """The ``m3lab`` command and ``python -m m3lab``: ``main()``, and after a prediction an exit that
    skips tearing the interpreter down. Unloading what a prediction imported (torch, DeepSpeed,
    transformers, FlagEmbedding) took 1.3 to 1.5 s of every fresh process on this 2-core machine
    (measured 2026-11-29; ``python -m m3lab.evidence.bench``), more than half of what the prediction itself
    takes. Nothing is pending by then: the report is printed, the forked helper joined, no file
    open; output and logging are flushed first."""
    code = main()
    if len(sys.argv) > 1 and sys.argv[1] == "predict":
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _reporting_mistakes(args) -> int:
    """Run the verb; bad input (a ConfigError or DataError) ends in its message and exit status 2, a
    run the predictor finds would fail in 1."""
    from m3lab.data.jsonl import DataError
    from m3lab.errors import ConfigError

    try:
        return args.func(args)
    except (ConfigError, DataError) as error:
        one = isinstance(error, ConfigError) and len(error.problems) == 1
        print(f"m3lab {args.verb}: {error.problems[0] if one else error}", file=sys.stderr)
        return 2
    except Exception as error:  # the predictor's verdict that training itself fails
        from m3lab.predict import TrainingWouldFail

        if not isinstance(error, TrainingWouldFail):
            raise
        print(f"m3lab {args.verb}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
