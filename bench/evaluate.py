"""One evaluation job's parts, timed, against the same work done the way a one-off script would.

On the same model and test rows, each part of kava's evaluation (stages/evaluate.py) beside
its one-off equivalent:
- answer NLL: kava.evaluate.answer_nll (fp32, left-padded, logits only for the answer) against
  one plain batched forward per batch with the tokenizer's own left padding and full logits;
- the noise check: answer_nll one example at a time on eval.noise_examples rows, as the stage
  does now (once per run, in the init job), and on every row, as every job did before;
- generation, in eval.dtype as the stage generates: kava.evaluate.generate_answers on
  eval.generate_examples rows against a plain batched greedy `generate` with a KV cache and
  `stop_strings` only.
With `--baseline-repo DIR --stage-args '...'` it also times the whole stage
(`python -m stages.evaluate ...`) of this checkout and of DIR (e.g. main's checkout) on the same
inputs, alternately, in subprocesses: today's job against the new one. The stage's arguments are
the ones a run's log shows for the evaluate job (--baseline-stage-args: the baseline's own, where
its version takes other flags); --out and --predictions go to a temporary folder. Every figure is measured; each side keeps its fastest of --repeats.

    python -m bench.evaluate [--tiny | --student-card CARD] [--examples 48] [--repeats 2]
                             [--baseline-repo DIR --stage-args '...' [--baseline-stage-args '...']]
"""

import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import PROJECT, bench_rows, emit, machine, parser, student_card, timed
from kava.config import schema_defaults
from kava.environment import compute_dtype
from kava.evaluate import answer_nll, at_word_boundary, generate_answers
from kava.io import read_json
from kava.models import in_dtype, load_model, load_tokenizer


def left_padded(tokenizer, texts):
    """A batch as a one-off script pads it: the tokenizer's own left padding."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer(list(texts), return_tensors="pt", padding=True)


def one_off_nll(model, tokenizer, prompts, answers, batch_size):
    """Answer NLL as a one-off script computes it: joined text, tokenizer padding, full logits."""
    nlls = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            texts = [p + a for p, a in zip(prompts[start:start + batch_size],
                                           answers[start:start + batch_size])]
            enc = left_padded(tokenizer, texts)
            n_answer = [len(tokenizer(a, add_special_tokens=False)["input_ids"])
                        for a in answers[start:start + batch_size]]
            logits = model(**enc).logits[:, :-1].float()
            token_nll = F.cross_entropy(logits.transpose(1, 2), enc["input_ids"][:, 1:],
                                        reduction="none")
            nlls += [float(row[-n:].mean()) for row, n in zip(token_nll, n_answer)]
    return nlls


def one_off_generate(model, tokenizer, prompts, max_new_tokens, batch_size, stop):
    texts = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            enc = left_padded(tokenizer, prompts[start:start + batch_size])
            out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, use_cache=True,
                                 stop_strings=list(stop) or None, tokenizer=tokenizer)
            texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                            skip_special_tokens=True)
    return texts


def race(kava_side, other_side, repeats):
    """{"kava_s", "other_s", ratio} of two callables, alternated, each side's fastest run."""
    best = [float("inf"), float("inf")]
    for _ in range(repeats):  # alternate, so load changes hit both alike
        for index, side in enumerate((kava_side, other_side)):
            best[index] = min(best[index], timed(side)[0])
    return {"kava_s": round(best[0], 3), "other_s": round(best[1], 3),
            "kava_over_other_ratio": round(best[0] / best[1], 3)}


def parts(model, card, tokenizer, rows, cfg, repeats):
    """{part: {"kava_s", "other_s", ratio}} of the NLL and the noise check (fp32, as the stage
    scores), then of generation in eval.dtype (the stage casts the model before generating)."""
    prompts, answers = zip(*(at_word_boundary(row["prompt"], row["answer"]) for row in rows))
    n_generate = len(rows) if cfg["generate_examples"] is None else cfg["generate_examples"]
    checked = min(cfg["noise_examples"], len(rows))
    figures = {
        "nll": race(lambda: answer_nll(model, tokenizer, prompts, answers, cfg["batch_size"]),
                    lambda: one_off_nll(model, tokenizer, prompts, answers, cfg["batch_size"]),
                    repeats),
        "noise_check": race(lambda: answer_nll(model, tokenizer, prompts[:checked],
                                               answers[:checked], 1),
                            lambda: answer_nll(model, tokenizer, prompts, answers, 1), repeats)}
    dtype_name, dtype = compute_dtype(cfg["dtype"])
    model = in_dtype(model, card, dtype, model.device)
    figures["generate"] = race(
        lambda: generate_answers(model, tokenizer, prompts[:n_generate], cfg["max_new_tokens"],
                                 cfg["batch_size"], cfg["stop"]),
        lambda: one_off_generate(model, tokenizer, prompts[:n_generate], cfg["max_new_tokens"],
                                 cfg["batch_size"], cfg["stop"]),
        repeats)
    figures["generate"]["dtype"] = dtype_name
    figures["noise_check"]["other"] = "every row alone (the stage before eval.noise_examples)"
    figures["nll"]["other"] = figures["generate"]["other"] = "one-off script"
    return figures


def stage_seconds(repo, stage_args, workdir):
    """Wall seconds of `python -m stages.evaluate` in `repo` on `stage_args`, outputs in
    `workdir`."""
    args = shlex.split(stage_args)
    for flag, name in (("--out", "m.json"), ("--predictions", "m/predictions.jsonl")):
        if flag in args:
            args[args.index(flag) + 1] = str(Path(workdir) / name)
    seconds, done = timed(lambda: subprocess.run([sys.executable, "-m", "stages.evaluate", *args],
                                                 cwd=repo, capture_output=True, text=True))
    if done.returncode:
        raise SystemExit(f"stages.evaluate in {repo} failed:\n{done.stderr[-3000:]}")
    return seconds


def main():
    cli = parser(__doc__)
    cli.set_defaults(examples=48)
    cli.add_argument("--student-card", help="the evaluated model's card (default: the default "
                     "run's student, or the smoke config's with --tiny)")
    cli.add_argument("--repeats", type=int, default=2)
    cli.add_argument("--baseline-repo", help="another checkout (e.g. main's) whose evaluate "
                     "stage is timed beside this one's")
    cli.add_argument("--stage-args", help="the evaluate stage's arguments (from a run's log)")
    cli.add_argument("--baseline-stage-args", help="the baseline stage's own arguments, where "
                     "its version takes others (from its run's log; default: --stage-args)")
    args = cli.parse_args()
    if bool(args.baseline_repo) != bool(args.stage_args):
        raise SystemExit("--baseline-repo and --stage-args go together")
    if args.baseline_stage_args and not args.baseline_repo:
        raise SystemExit("--baseline-stage-args needs --baseline-repo")
    cfg = schema_defaults("eval")
    if not args.tiny:  # the default run's eval section over the schema's defaults
        import yaml
        cfg.update(yaml.safe_load((PROJECT / "config" / "config.yaml").read_text()).get("eval", {}))
    rows, source = bench_rows(args.examples)
    with tempfile.TemporaryDirectory(prefix="kava-bench-eval-") as workdir:
        card = read_json(args.student_card) if args.student_card else student_card(args, workdir)
        torch.set_num_threads(args.threads)
        model = load_model(card, dtype=torch.float32)
        tokenizer = load_tokenizer(card["dir"])
        figures = {"bench": "evaluate", "machine": machine(args.threads), "data": source,
                   "examples": len(rows), "model": card["name"], "eval": cfg,
                   "parts": parts(model, card, tokenizer, rows, cfg, args.repeats)}
        if args.baseline_repo:
            best = {"new": float("inf"), "baseline": float("inf")}
            sides = (("new", PROJECT, args.stage_args),
                     ("baseline", args.baseline_repo,
                      args.baseline_stage_args or args.stage_args))
            for _ in range(args.repeats):
                for side, repo, stage_args in sides:
                    best[side] = min(best[side], stage_seconds(repo, stage_args, workdir))
            figures["stage"] = {"new_s": round(best["new"], 3),
                                "baseline_s": round(best["baseline"], 3),
                                "new_over_baseline_ratio": round(best["new"] / best["baseline"],
                                                                 3)}
    emit(figures)


if __name__ == "__main__":
    main()
