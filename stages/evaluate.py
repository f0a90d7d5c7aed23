"""Stage evaluate: one model on the test split → eval/<model>.json (accuracy, answer NLL and,
for a trained student, held-out KV cosine, with every per-example value) and
eval/<model>/predictions.jsonl (every generation, for a person to read).

The model is a card (`--card`: the student before training, a teacher) or a trained student
folder (`--model-dir`, with `--projector`, `--train-info` and the teachers' test-split
`--manifests` for the held-out KV cosine)."""

import json

import torch

from kava.cli import json_arg, run_stage, stage_parser
from kava.data import read_split
from kava.evaluate import (answer_nll, at_word_boundary, eval_record, generate_answers,
                           heldout_kv_cosine, prediction_lines, tokenizer_fingerprint)
from kava.io import atomic_path, read_json, write_json
from kava.models import load_model, load_tokenizer, materialize
from kava.precompute import compute_dtype
from kava.projector import load_projectors


def main(args):
    cfg = args.eval
    rows = read_split(args.data, ("id", "question", "answer", "final", "prompt", "text"))
    card = read_json(args.card) if args.card else materialize(args.name, {"path": args.model_dir},
                                                              None)
    tokenizer = load_tokenizer(card["dir"])
    dtype_name, dtype = compute_dtype(cfg["dtype"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(card, dtype=dtype, device=device)
    prompts, answers = zip(*(at_word_boundary(row["prompt"], row["answer"]) for row in rows))
    generated = generate_answers(model, tokenizer, prompts, cfg["max_new_tokens"],
                                 cfg["batch_size"], cfg["stop"])
    nlls = answer_nll(model, tokenizer, prompts, answers, cfg["batch_size"])
    cosine = None
    if args.projector:
        cosine = heldout_kv_cosine(model, tokenizer, load_projectors(args.projector),
                                   read_json(args.train_info), args.manifests, rows,
                                   args.max_length, cfg["batch_size"])
    record = eval_record([row["id"] for row in rows], generated, [row["final"] for row in rows],
                         nlls, cosine, tokenizer_fingerprint(tokenizer))
    record["model"] = {key: card[key] for key in ("name", "dir", "weights_sha256", "quantize")}
    record["settings"] = {**cfg, "dtype": dtype_name, "device": device, "test_rows": len(rows)}
    with atomic_path(args.predictions) as tmp:
        tmp.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n"
                               for line in prediction_lines(record, [r["question"] for r in rows])))
    write_json(args.out, record)
    print(f"{args.name}: accuracy {record['accuracy']:.3f}, answer NLL {record['nll']:.4f}"
          + (f", held-out KV cosine {cosine['overall']:.4f}" if cosine else ""))


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--name", required=True, help="the evaluated model's name in outputs")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--card", help="a model card (init, teachers)")
    model.add_argument("--model-dir", help="a trained student's HF folder")
    parser.add_argument("--projector", help="the trained student's projectors")
    parser.add_argument("--train-info", help="the trained student's train.json")
    parser.add_argument("--manifests", nargs="*", default=[],
                        help="every teacher's test-split KV manifest")
    parser.add_argument("--data", required=True, help="data/test.parquet")
    parser.add_argument("--eval", type=json_arg, required=True, help="the eval section, JSON")
    parser.add_argument("--max-length", type=int, required=True,
                        help="data.max_length: the student's tokens per example, as in training")
    parser.add_argument("--out", required=True, help="eval/<model>.json")
    parser.add_argument("--predictions", required=True, help="eval/<model>/predictions.jsonl")
    run_stage(main, parser)
