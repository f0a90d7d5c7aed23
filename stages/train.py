"""Stage train: one arm x seed → a trained student, its projectors, metrics.jsonl, train.json.

Under torchrun (`torchrun --nproc_per_node N -m stages.train ...`) each process trains on its
slice of every step's examples (DDP); process 0 writes the outputs. A SIGTERM, SIGUSR1 or
SIGINT checkpoints at the next step and exits non-zero; rerunning resumes from the checkpoint.
"""

import os

import pyarrow.parquet as pq
import torch

from kava.cli import add_prompt_format_argument, json_arg, run_stage, stage_parser
from kava.data import read_split
from kava.io import read_json
from kava.models import load_tokenizer
from kava.prompts import render_rows
from kava.train import train


def main(args):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # The job's threads are shared by its processes.
    torch.set_num_threads(max(1, args.threads // world))
    teachers = [{"card": read_json(card), "dims": read_json(dims), "manifest": manifest}
                for card, dims, manifest in zip(args.teacher_cards, args.teacher_dims,
                                                args.manifests, strict=True)]
    student_card = read_json(args.student_card)
    columns = ("id", "question", "answer")

    def rendered(path):
        return render_rows(read_split(path, columns), load_tokenizer(student_card["dir"]),
                           args.prompt_format, student_card["name"])

    train(args.train, job=args.job, arm=args.arm, seed=args.seed,
          student_card=student_card, student_dims=read_json(args.student_dims),
          teachers=teachers, rows=rendered(args.data),
          # The rows were rendered so: train.json and the model card say it with the data.
          data_info={**read_json(args.data_info), "prompt_format": args.prompt_format},
          env=read_json(args.env),
          max_length=args.max_length,
          outputs={"student": args.student_out, "projector": args.projector_out,
                   "metrics": args.metrics_out, "summary": args.summary_out},
          checkpoint_dir=args.checkpoint_dir, tracker_dir=args.tracker_dir,
          cka_maps=read_json(args.cka_maps) if args.cka_maps else None,
          # data.validation_size 0 writes an empty table: no validation, the last step's weights.
          validation_rows=(rendered(args.validation_data)
                           if pq.read_metadata(args.validation_data).num_rows else []))


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--arm", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--train", type=json_arg, required=True,
                        help="the arm's train config (train keys with the arm's overrides), JSON")
    parser.add_argument("--job", type=json_arg, required=True,
                        help="the train_job section (how the job runs, not what it computes), JSON")
    parser.add_argument("--student-card", required=True)
    parser.add_argument("--student-dims", required=True)
    parser.add_argument("--teacher-cards", nargs="+", required=True)
    parser.add_argument("--teacher-dims", nargs="+", required=True)
    parser.add_argument("--manifests", nargs="+", required=True,
                        help="each teacher's train-split KV manifest, in teacher order")
    parser.add_argument("--data", required=True, help="data/train.parquet")
    parser.add_argument("--validation-data", required=True,
                        help="data/validation.parquet: the rows train.eval_every scores")
    parser.add_argument("--data-info", required=True, help="data/data.json")
    parser.add_argument("--env", required=True, help="env.json (precision, micro-batch)")
    parser.add_argument("--max-length", type=int, required=True)
    add_prompt_format_argument(parser)
    parser.add_argument("--cka-maps", help="layer maps from the cka stage (layer_map: cka)")
    parser.add_argument("--checkpoint-dir", required=True, help="not an output: survives reruns")
    parser.add_argument("--tracker-dir", required=True,
                        help="the live curves' folder (train_job.tracker); not an output: a "
                             "resumed job keeps the curves of the steps it does not redo")
    parser.add_argument("--student-out", required=True)
    parser.add_argument("--projector-out", required=True)
    parser.add_argument("--metrics-out", required=True)
    parser.add_argument("--summary-out", required=True)
    run_stage(main, parser)
