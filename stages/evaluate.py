"""Stage evaluate: one model on the test split → eval/<model>.json (accuracy, answer NLL and,
for a trained student, held-out KV cosine, with every per-example value) and
eval/<model>/predictions.jsonl (every generation, for a person to read).

The model is a card (`--card`: the student before training, a teacher) or a trained student
folder (`--model-dir`, with `--projector`, `--train-info`, the train split and the teachers'
train- and test-split manifests for the held-out KV cosine and probe R², the student's card
and every teacher's dims for the probe's layer maps).

Answer NLL is computed in fp32 whatever eval.dtype says: rounding the weights to bf16 adds
per-example noise larger than the difference between two trained arms; `--noise-check` (the
init job) measures what noise is left. Generation runs in eval.dtype."""

import json

import torch

from kava.cli import (add_model_arguments, add_prompt_format_argument, json_arg, run_stage,
                      stage_parser)
from kava.data import read_split
from kava.environment import compute_dtype, job_device
from kava.evaluate import (answer_nll, at_word_boundary, eval_record, generate_answers,
                           heldout_kv, prediction_lines, tokenizer_fingerprint)
from kava.io import atomic_path, read_json, write_json
from kava.layer_maps import probe_layer_maps
from kava.models import in_dtype, load_model, load_tokenizer, materialize
from kava.projector import load_projectors
from kava.prompts import render_rows


def main(args):
    cfg = args.eval
    card = read_json(args.card) if args.card else materialize(args.name, {"path": args.model_dir},
                                                              None)
    tokenizer = load_tokenizer(card["dir"])
    rows = render_rows(read_split(args.data, ("id", "question", "answer", "final")), tokenizer,
                       args.prompt_format, card["name"])
    dtype_name, dtype = compute_dtype(cfg["dtype"])
    device = job_device()
    prompts, answers = zip(*(at_word_boundary(row["prompt"], row["answer"]) for row in rows))
    model = load_model(card, dtype=torch.float32, device=device)
    train_info = read_json(args.train_info) if args.projector else None
    if train_info:  # the probe reads the student's test-row KV from the NLL's own forward
        nlls, test_kv = answer_nll(model, tokenizer, prompts, answers, cfg["batch_size"],
                                   key_space=train_info["key_space"])
    else:
        nlls = answer_nll(model, tokenizer, prompts, answers, cfg["batch_size"])
    kv = noise = None
    if args.noise_check:
        # The evaluation's own numerical noise: the same fp32 NLL computed one example at a
        # time (other padding, other kernels) differs from the batched one by this much.
        checked = min(cfg["noise_examples"], len(rows))
        alone = answer_nll(model, tokenizer, prompts[:checked], answers[:checked], 1)
        gaps = [abs(a - b) for a, b in zip(nlls, alone)]
        noise = {"max_abs": max(gaps), "mean_abs": sum(gaps) / len(gaps), "examples": checked}
    if train_info:
        train_rows = render_rows(read_split(args.train_data, ("id", "question", "answer"), 0,
                                            cfg["probe_examples"]),
                                 tokenizer, args.prompt_format, card["name"])
        probe_maps = probe_layer_maps(
            train_info, model.config.num_hidden_layers,
            {dims["model"]: dims for dims in map(read_json, args.teacher_dims)},
            read_json(args.student_card))
        kv = heldout_kv(model, tokenizer, load_projectors(args.projector), train_info, probe_maps,
                        args.train_manifests, args.manifests,
                        train_rows, rows, args.max_length, cfg["batch_size"], cfg["probe_ridge"],
                        test_kv)
    model = in_dtype(model, card, dtype, device)
    # Generation is most of an evaluation's time: eval.generate_examples caps it.
    n_generate = len(rows) if cfg["generate_examples"] is None else cfg["generate_examples"]
    generated = generate_answers(model, tokenizer, prompts[:n_generate], cfg["max_new_tokens"],
                                 cfg["batch_size"], cfg["stop"])
    record = eval_record([row["id"] for row in rows], generated,
                         [row["final"] for row in rows[:n_generate]], nlls, kv,
                         tokenizer_fingerprint(tokenizer))
    record["model"] = {key: card[key] for key in ("name", "dir", "weights_sha256", "quantize")}
    record["nll_noise"] = noise
    record["settings"] = {**cfg, "dtype": dtype_name, "nll_dtype": "fp32", "device": device.type,
                          "test_rows": len(rows)}
    with atomic_path(args.predictions) as tmp:
        tmp.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n"
                               for line in prediction_lines(record, [r["question"] for r in rows])))
    write_json(args.out, record)
    print(f"{args.name}: accuracy {record['accuracy']:.3f}, answer NLL {record['nll']:.4f}"
          + (f", held-out KV cosine {kv['cosine']['overall']:.4f}, probe R² "
             f"{kv['r2']['overall']:.4f}" if kv else ""))


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    add_model_arguments(parser)
    parser.add_argument("--noise-check", action="store_true",
                        help="also compute eval.noise_examples rows' NLL one at a time: the "
                        "evaluation's own numerical noise, measured once per run on the student "
                        "before training (every arm's architecture and kernels)")
    parser.add_argument("--projector", help="the trained student's projectors")
    parser.add_argument("--train-info", help="the trained student's train.json")
    parser.add_argument("--manifests", nargs="*", default=[],
                        help="every teacher's test-split KV manifest")
    parser.add_argument("--train-manifests", nargs="*", default=[],
                        help="every teacher's train-split KV manifest (the probe's fit)")
    parser.add_argument("--train-data", help="data/train.parquet (the probe's fit)")
    parser.add_argument("--student-card", help="the student's card before training (a pruned "
                        "student's layer map to its parent, for the probe)")
    parser.add_argument("--teacher-dims", nargs="*", default=[],
                        help="every teacher's dims JSON (layer maps of the probe)")
    parser.add_argument("--data", required=True, help="data/test.parquet")
    parser.add_argument("--eval", type=json_arg, required=True, help="the eval section, JSON")
    parser.add_argument("--max-length", type=int, required=True,
                        help="data.max_length: the student's tokens per example, as in training")
    add_prompt_format_argument(parser)
    parser.add_argument("--out", required=True, help="eval/<model>.json")
    parser.add_argument("--predictions", required=True, help="eval/<model>/predictions.jsonl")
    run_stage(main, parser)
