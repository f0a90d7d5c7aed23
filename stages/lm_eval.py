"""Stage lm_eval: one model (a teacher's card or a trained student's folder) through
lm-evaluation-harness on the run's prepared rows → eval/lm_eval/<model>.json, the harness's
own scores per task."""

from kava.cli import add_model_arguments, json_arg, run_stage, stage_parser
from kava.environment import compute_dtype, job_device
from kava.harness import run_harness, task_config
from kava.io import read_json, write_json


def main(args):
    model_dir = read_json(args.card)["dir"] if args.card else args.model_dir
    dtype = compute_dtype(args.eval["dtype"])[1]
    data_files = {"train": args.train_data, "test": args.test_data}
    scores = {task: run_harness(model_dir, task_config(path, data_files), job_device(), dtype,
                                args.eval["batch_size"], args.eval["max_new_tokens"])
              for task, path in zip(args.eval["lm_eval"], args.task_yamls, strict=True)}
    write_json(args.out, {"model": args.name, "tasks": scores})


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    add_model_arguments(parser)
    parser.add_argument("--eval", type=json_arg, required=True,
                        help="the eval keys lm_eval, dtype, batch_size, max_new_tokens, JSON")
    parser.add_argument("--task-yamls", nargs="+", required=True,
                        help="each task's YAML, in the order of eval.lm_eval")
    parser.add_argument("--train-data", required=True, help="data/train.parquet (few-shot)")
    parser.add_argument("--test-data", required=True, help="data/test.parquet")
    parser.add_argument("--out", required=True)
    run_stage(main, parser)
