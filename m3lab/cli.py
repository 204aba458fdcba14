"""The ``m3lab`` command line: the main job, data checks and the commands to copy."""

from __future__ import annotations

import argparse
import sys


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
    args = parser.parse_args(argv)
    if args.verb is None:
        args = parser.parse_args(["run", *(argv or [])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
