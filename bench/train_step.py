"""One training step with the teachers run online (the design of the user's earlier system)
against one from the teachers' stored KV, on the same student, teachers and batch.

Both steps are kava's own: the training recipe's kava.train.setup and
its kava.train.train_step (CE + KV loss, clipping, AdamW and LR step); they differ only in where
the teacher K/V come from:
- online: every step tokenises the batch with each teacher's tokenizer and runs the teacher's
  decoder body (inference_mode, no lm_head, the precompute compute dtype) for its K/V;
- cached: every step reads the same K/V from a KV store written beforehand by
  kava.precompute (outside the timing) for exactly these examples.
Each side runs in its own process, alternately, `--repeats` times, so each peak memory is its
own (CPU: max RSS; GPU: torch.cuda.max_memory_allocated); a side's time is its fastest repeat's
median step. Goal: online / cached step time >= 1.5 for the default pair.

    python -m bench.train_step [--tiny | --card TEACHER_CARD ... --student-card CARD]
                               [--batch 8] [--steps 3] [--repeats 2]
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bench.common import PROJECT, bench_rows, emit, machine, parser, teacher_cards
from kava.batching import collate, pad_id
from kava.capture import forward_kv
from kava.config import arm_configs, schema_defaults
from kava.dims import detect_dims
from kava.environment import compute_dtype, job_device, job_precision
from kava.io import read_json, write_json
from kava.kvstore import build_manifest
from kava.layer_maps import auto_layer_map, pruned_from
from kava.models import load_model, load_tokenizer, materialize
from kava.paths import run_paths
from kava.precompute import pad_batch, precompute_shard, tokenizer_identity
from kava.train import StepBatch, setup, step_batches, train_step

def default_train_config():
    """The schema's train defaults, as one kv arm sees them."""
    return arm_configs({"train": schema_defaults("train"),
                        "arms": {"kv": {"kv_weight": 1.0}}})["kv"]


def student_card(args, workdir):
    if args.student_card:
        return read_json(args.student_card)
    name = "config.yaml" if not args.tiny else "smoke.yaml"
    config = yaml.safe_load((PROJECT / "config" / name).read_text())
    if not args.tiny:
        path = Path(run_paths(config["run"], project_root=PROJECT)["models"]) / f"{config['student']}.json"
        if not path.is_file():
            raise SystemExit(f"no materialised default student at {path}: run `make run` first, "
                             f"or pass --student-card or --tiny")
        return read_json(path)
    spec = config["models"][config["student"]]
    base = materialize(spec["derive"]["base"], config["models"][spec["derive"]["base"]],
                       Path(workdir) / spec["derive"]["base"])
    return materialize(config["student"], spec, Path(workdir) / config["student"], base)


def prepare_world(args, workdir):
    """Cards, dims, the batch's rows and a KV store of them per teacher, in `workdir/world.json`."""
    teachers = teacher_cards(args, workdir)
    student = student_card(args, workdir)
    rows, source = bench_rows(args.batch)
    _, dtype = compute_dtype("auto")
    world = {"student": student, "rows": rows, "source": source, "teachers": {}}
    world["student_dims"] = detect_dims(load_model(student), load_tokenizer(student["dir"]),
                                        student["name"])
    for name, card in teachers.items():
        model = load_model(card, dtype=dtype)
        tokenizer = load_tokenizer(card["dir"])
        dims = detect_dims(model, tokenizer, name)
        mapping, _ = auto_layer_map(world["student_dims"]["num_layers"], dims["num_layers"], name,
                                    pruned_from(student))
        layers = sorted(set(mapping))
        shard = Path(workdir) / "kv" / name / "shard-00000.safetensors"
        shard.parent.mkdir(parents=True)
        identity = {"teacher": name, "weights_sha256": card["weights_sha256"],
                    "tokenizer": tokenizer_identity(tokenizer, card["dir"]),
                    "compute_dtype": compute_dtype("auto")[0]}
        record = precompute_shard(model, tokenizer, rows, shard, identity=identity,
                                  layers=layers, key_space="pre_rope", dtype="bf16",
                                  max_length=args.max_length, on_too_long="truncate",
                                  batch_tokens=4096, progress_label=name)
        data_info = {"source": source, "path": None,
                     "splits": {"test": {"rows": len(rows), "sha256": ""}}}
        manifest = shard.parent / "manifest.json"
        write_json(manifest, build_manifest(card, data_info, "test", [
            {**record, "path": str(shard), "rows": [0, len(rows)]}], manifest))
        world["teachers"][name] = {"card": card, "dims": dims, "manifest": str(manifest),
                                   "layers": layers}
    write_json(Path(workdir) / "world.json", world)
    return world


def online_teacher_examples(model, tokenizer, rows, layers, max_length, device):
    """What a step with an online teacher computes: its tokens, offsets and K/V per example."""
    encoded = tokenizer([row["text"] for row in rows], return_offsets_mapping=True,
                        truncation=True, max_length=max_length)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    ids, valid = pad_batch(encoded["input_ids"])
    with torch.inference_mode():
        kv = forward_kv(model, ids.to(device), valid.long().to(device), layers, "pre_rope")
    return [{"input_ids": ids[i, :n], "char_spans": torch.tensor(encoded["offset_mapping"][i]),
             "k": {layer: kv[layer][0][i, :n].cpu().clone() for layer in layers},
             "v": {layer: kv[layer][1][i, :n].cpu().clone() for layer in layers}}
            for i, n in enumerate(lengths)]


def run_side(mode, workdir, args):
    """One side's steps in this process: {"step_s": [...], "peak_mb": ...}."""
    torch.set_num_threads(args.threads)
    world = read_json(Path(workdir) / "world.json")
    cfg = {**default_train_config(), "effective_batch": args.batch, "micro_batch": args.batch}
    device = job_device()
    teachers = [{"card": t["card"], "dims": t["dims"], "manifest": t["manifest"]}
                for t in world["teachers"].values()]
    run = setup(cfg, seed=0, student_card=world["student"], student_dims=world["student_dims"],
                teachers=teachers, rows=world["rows"], max_length=args.max_length,
                env={"precision": job_precision()}, device=device)
    data = run.data
    if mode == "online":
        models = {name: (load_model(t["card"], compute_dtype("auto")[1], device),
                          load_tokenizer(t["card"]["dir"])) for name, t in world["teachers"].items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step(number):
        batch = step_batches(run, number)
        if mode == "online":
            inputs = {name: (online_teacher_examples(*models[name], world["rows"], t["layers"],
                                                     args.max_length, device),
                             t["layers"], (t["dims"]["num_kv_heads"], t["dims"]["head_dim"]))
                      for name, t in world["teachers"].items()}
            online = collate(data.students, inputs, pad_id(data.tokenizer), data.alignment)
            batch = StepBatch([online], sum(data.ce_valid),
                              {name: int(targets.mask.sum())
                               for name, targets in online.teachers.items()})
        train_step(run, batch)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step(1)  # warm-up: first-call allocations and lazy shard verification
    times = []
    for number in range(2, args.steps + 2):
        start = time.perf_counter()
        step(number)
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"step_s": times, "peak_mb": round(peak, 1),
            "tokens": int(sum(len(s["input_ids"]) for s in data.students))}


def main():
    cli = parser(__doc__)
    cli.add_argument("--student-card", help="the student's card (default: the default run's)")
    cli.add_argument("--batch", type=int, default=8, help="examples per step")
    cli.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    cli.add_argument("--repeats", type=int, default=2)
    cli.add_argument("--max-length", type=int, default=256)
    cli.add_argument("--side", choices=("online", "cached"), help=argparse.SUPPRESS)
    cli.add_argument("--workdir", help=argparse.SUPPRESS)
    args = cli.parse_args()
    if args.side:  # a child: one side, result as its last line
        print(json.dumps(run_side(args.side, args.workdir, args)))
        return
    with tempfile.TemporaryDirectory(prefix="kava-bench-train-") as workdir:
        world = prepare_world(args, workdir)
        results = {"online": [], "cached": []}
        for _ in range(args.repeats):
            for side in ("online", "cached"):
                done = subprocess.run(
                    [sys.executable, "-m", "bench.train_step", "--side", side, "--workdir", workdir,
                     *sys.argv[1:]], cwd=PROJECT, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{side} side failed:\n{done.stderr[-3000:]}")
                results[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
    step_s = {side: min(statistics.median(r["step_s"]) for r in runs)
              for side, runs in results.items()}
    peak = {side: max(r["peak_mb"] for r in runs) for side, runs in results.items()}
    emit({"bench": "train_step", "machine": machine(args.threads), "data": world["source"],
          "student": world["student"]["name"], "teachers": list(world["teachers"]),
          "batch": args.batch, "tokens_per_step": results["cached"][0]["tokens"],
          "online_step_s": round(step_s["online"], 4), "cached_step_s": round(step_s["cached"], 4),
          "online_peak_mb": peak["online"], "cached_peak_mb": peak["cached"],
          "peak_memory": "max RSS" if not torch.cuda.is_available() else "cuda max allocated",
          "online_over_cached_ratio": round(step_s["online"] / step_s["cached"], 3),
          "online_over_cached_memory_ratio": round(peak["online"] / peak["cached"], 3)})


if __name__ == "__main__":
    main()
