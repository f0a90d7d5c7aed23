"""What every stage's command line shares: threads, JSON arguments, and how errors end it."""

import argparse
import json
import os
import sys

from kava.config import schema_defaults, schema_enum
from kava.errors import KavaError


def stage_parser(description):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="CPU threads for torch (Snakemake passes the rule's threads)")
    return parser


def add_model_arguments(parser):
    """--name, and the evaluated model: --card (the untrained student, a teacher) or --model-dir
    (a trained student's HF folder). Shared by every stage that evaluates one model."""
    parser.add_argument("--name", required=True, help="the evaluated model's name in outputs")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--card", help="a model card (the untrained student, a teacher)")
    model.add_argument("--model-dir", help="a trained student's HF folder")


def add_prompt_format_argument(parser):
    """--prompt-format, data.prompt_format (kava.prompts): every stage that renders rows for a
    model. Its default is the schema's."""
    from kava.config import schema_defaults, schema_enum

    parser.add_argument("--prompt-format", choices=schema_enum("prompt_format"),
                        default=schema_defaults("data")["prompt_format"],
                        help="data.prompt_format: plain, or each model's own chat template")


def json_arg(text):
    """argparse type for the config sections Snakemake passes as JSON."""
    return json.loads(text)


def run_stage(main, parser):
    """Parse, size the thread pools, run; a KavaError ends as one line and exit status 2.

    torch sizes its pool from OMP_NUM_THREADS when it first builds it, so a stage that imports
    torch only later (or never: the report, a model card, whose jobs would otherwise spend two
    seconds importing it) gets the same size; one that has imported it already is sized here."""
    args = parser.parse_args()
    threads = max(1, args.threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    try:
        main(args)
    except KavaError as err:
        print(f"kava: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
