"""Stored bytes per token, reconstruction error and distillation quality per storage format.

The rows are the default study's (config/config.yaml's data section over the schema's
defaults, prepared as the prepare stage does: set KAVA_DATA_PATH for real GSM8K), with
`--examples` test rows and `--train-examples` train rows. For each teacher, the test rows are
precomputed (fp32 compute, pre-RoPE, all layers) once per stored dtype: fp32 (the exact
reference), bf16, fp8 and pca (its basis fitted on the first precompute.basis_examples train
rows, as stage kv_basis fits it). A format is a dtype and a layer set:
`all`, or `mapped` (the layers the default student's auto layer map reads, as
precompute.layers: mapped stores them), whose bytes and errors are those of its layers in the
all-layer store. Per teacher and format:
- `<format>_kv_bytes_per_token`: the stored K/V tensors (with fp8's and pca's one-byte
  exponents and group index) over all tokens; pca's basis is stored once per teacher
  (`basis_bytes`) and is left out, and counted in the extrapolations;
- `logits_bytes_per_token`: the top-k logit store of logit KD (precompute.logits_k and
  logits_dtype's defaults: log-probs, ids at the teacher's id width, the fp32 tail), beside the
  K/V formats' (DistillKit's budget: <= 300 B/token at k = 64), and `logits_gsm8k_train_gb`;
- `<format>_over_bf16_all_bytes_ratio`: against today's bf16 all-layer store (goal <= 1/8);
  `fp8_over_fp32_bytes_ratio`: fp8 all layers against raw fp32 K/V (goal <= 0.25);
- `<format>_cosine_error`: 1 - cosine between each dequantised K or V vector (one token, one
  head) and the fp32 one, averaged; `<format>_r2`: 1 - squared error / squared deviation of the
  fp32 K/V from its per-channel mean, over the format's layers, K and V;
- quality arm (`--train-steps`, 0 skips it): the default study's kv arm (config/config.yaml's
  train section and kv arm over the schema's defaults, `--train-steps` steps, the job's
  precision) on this teacher alone trains once per seed on the train-row store of bf16 and of
  each of `--quality-dtypes`, through kava.train's own setup, train_step and validate: every
  train.eval_every steps it scores the validation rows (data.validation_size) and keeps the
  weights of its best step, as the pipeline's train stage does. The stores differ, nothing
  else: same student, rows, seed and data order. Per format, against the bf16 arm of the same
  seed: `<format>_nll_delta`: held-out answer NLL (fp32, nats/token, kava.evaluate.answer_nll
  on the test rows), format − bf16, with the report's headline statistics
  (kava.stats.seed_level_test: `_ci` the t interval over seeds and examples, `_p` the exact
  sign-flip p over the per-seed means, `_per_seed`) and the two-level bootstrap CI beside them
  (`_bootstrap_ci`); the bf16 arm's own NLL and bootstrap CI (`bf16_heldout_nll[_ci]`);
  `<format>_heldout_r2_delta`: held-out KV probe R² (kava.kvfit, the report's figure) scored
  against the bf16 all-layer stores, format − bf16, mean over seeds; goal: > -0.005.
  `best_steps`: each format's chosen step per seed; `<dtype>_train_precompute_s`: the train
  rows' precompute (pca: with its basis fit, stage kv_basis's work) and `<dtype>_train_s`: one
  arm's training with its validation scoring, mean over seeds, side by side in one process.
  Training reads only the mapped layers, so `all` and `mapped` of a dtype train alike.
Extrapolations: GSM8K train (7473 rows x this teacher's measured tokens per example) in GB per
format, and a Qwen2.5-1.5B-class teacher (28 layers, 2 KV heads x 128, from its config.json)
under the default student's mapped layers, with fp8's and pca's measured bytes per value.

    KAVA_DATA_PATH=/data/gsm8k python -m bench.storage
        [--tiny | --card CARD ... --student-card CARD] [--examples 48] [--train-examples 16]
        [--quality-dtypes fp8 pca] [--train-steps 30] [--seeds 3] [--pca-variance 0.99]
"""

import math
import tempfile
import time

import numpy as np
import torch
from safetensors import safe_open

import yaml

from bench.common import (PROJECT, bench_splits, emit, machine, parser, student_card,
                          teacher_cards, timed)
from kava.config import arm_configs, schema_defaults
from kava.dims import detect_dims
from kava.environment import job_precision
from kava.evaluate import answer_nll, at_word_boundary
from kava.io import read_json
from kava.kvfit import kv_probe_r2
from kava.kvstore import LOGIT_TENSORS, KVStore, logits_spec
from kava.layer_maps import layers_to_store, ratio_layer_map
from kava.models import load_model, load_tokenizer
from kava.precompute import precompute_split
from kava.stats import seed_level_test, two_level_bootstrap
from kava.train import setup, step_batches, train_step, validate

DTYPES = ("fp32", "bf16", "fp8", "pca")
FORMATS = [(dtype, layers) for dtype in DTYPES for layers in ("all", "mapped")]
GSM8K_TRAIN_ROWS = 7473
# Qwen2.5-1.5B's config.json: num_hidden_layers 28, num_key_value_heads 2, hidden_size 1536 /
# num_attention_heads 12 = head_dim 128.
QWEN_1_5B = {"num_layers": 28, "num_kv_heads": 2, "head_dim": 128}
MAX_LENGTH = 256
OPTIONS = dict(compute="fp32", key_space="pre_rope", max_length=MAX_LENGTH,
               on_too_long="truncate", batch_tokens=2048)


def default_study():
    """config/config.yaml over the schema's defaults: its data section and its kv arm."""
    config = yaml.safe_load((PROJECT / "config" / "config.yaml").read_text())
    sections = {name: {**schema_defaults(name), **config.get(name, {})}
                for name in ("data", "train")}
    return sections["data"], arm_configs({"train": sections["train"], "arms": config["arms"]})["kv"]


def tensor_bytes(store, names):
    """Stored bytes of the tensors `names` in a store's shards."""
    total = 0
    for shard in store.manifest["shards"]:
        with safe_open(str((store.path.parent / shard["path"]).resolve()), framework="pt") as handle:
            total += sum(handle.get_tensor(name).nbytes for name in handle.keys() if name in names)
    return total


def kv_bytes(store, layers):
    """Stored K/V bytes of `layers` in a store (values, exponents, group index)."""
    return tensor_bytes(store, {f"{kind}.{layer}" for kind in ("k", "v", "k_exp", "v_exp")
                                for layer in layers} | {"group"})


def logit_bytes_per_token(card, test_rows, folder):
    """Bytes per token of the stored top-k logits at precompute's default k and dtype (ids at
    the teacher's id width), from a store of the test rows with logits (one layer of KV)."""
    precompute = schema_defaults("precompute")
    vocab = load_model(card).config.vocab_size
    spec = logits_spec(precompute["logits_k"], precompute["logits_dtype"], vocab)
    store = KVStore(precompute_split(card, test_rows, folder, examples_per_shard=len(test_rows),
                                     dtype="bf16", split="test", layers=[0], logits=spec,
                                     **OPTIONS))
    return {"logits_k": spec["k"], "logits_ids": spec["ids"],
            "logits_bytes_per_token": round(tensor_bytes(store, set(LOGIT_TENSORS))
                                            / store.manifest["tokens"], 1)}


def reconstruction(got, exact, layers):
    """(mean 1 - cosine per vector, R² against the per-channel mean) of `got` against fp32."""
    cosine_errors, sse, sst = [], {}, {}
    for kind in ("k", "v"):
        for layer in layers:
            want = torch.cat([exact.example(i)[kind][layer] for i in range(len(exact))]).double()
            have = torch.cat([got.example(i)[kind][layer] for i in range(len(got))]).double()
            cosine_errors.append(1 - torch.nn.functional.cosine_similarity(have, want, dim=-1).flatten())
            sse[kind, layer] = (have - want).square().sum().item()
            sst[kind, layer] = (want - want.mean(0)).square().sum().item()
    r2 = 1 - sum(sse.values()) / sum(sst.values())
    return torch.cat(cosine_errors).mean().item(), r2


def quality_arm(card, student, student_dims, teacher_dims, rows, train_store, reference, steps,
                seed):
    """(held-out answer NLL per test row, held-out KV probe R², chosen step, training seconds)
    of the student after the default kv arm's `steps` steps on `train_store` with `seed`,
    restored to its best step on the validation rows as kava.train.train restores it; the
    probe is scored against the `reference` {"train", "test"} stores (bf16, all layers).
    rows: {"train", "validation", "test"}."""
    train_rows, test_rows = rows["train"], rows["test"]
    _, kv_arm = default_study()
    # One forward per step: micro-batches only split the same sum.
    cfg = {**kv_arm, "micro_batch": kv_arm["effective_batch"], "steps": steps,
           "teachers": [card["name"]]}
    teachers = [{"card": card, "dims": teacher_dims, "manifest": str(train_store)}]
    start = time.perf_counter()
    run = setup(cfg, seed=seed, student_card=student, student_dims=student_dims,
                teachers=teachers, rows=train_rows, max_length=MAX_LENGTH,
                env={"precision": job_precision()}, device=torch.device("cpu"),
                validation_rows=rows["validation"])
    for step in range(1, steps + 1):
        train_step(run, step_batches(run, step))
        validate(run, step)
    if run.best.best_weights is not None:
        run.distiller.load_state_dict(run.best.best_weights)
    seconds = time.perf_counter() - start
    model, data = run.distiller.student.eval(), run.data
    prompts, answers = zip(*(at_word_boundary(row["prompt"], row["answer"]) for row in test_rows))
    with torch.inference_mode():
        nlls = answer_nll(model, data.tokenizer, prompts, answers, 8)
    probe = kv_probe_r2(model, data.tokenizer, {card["name"]: reference["train"]},
                        {card["name"]: reference["test"]}, data.layer_maps, train_rows, test_rows,
                        MAX_LENGTH, 8, cfg["projector_ridge"], data.key_space, data.alignment)
    return nlls, probe["overall"], run.best.best_step, seconds


def rounded(values, digits=5):
    return [round(value, digits) for value in values]


def quality(card, student, student_dims, teacher_dims, rows, stores, reference, steps, seeds):
    """The quality arm's figures (see the module docstring) of every format in `stores`
    ({dtype: train manifest}, bf16 first) against bf16."""
    nlls, r2, out = {}, {}, {"best_steps": {}}
    for dtype, store in stores.items():
        runs = [quality_arm(card, student, student_dims, teacher_dims, rows, store, reference,
                            steps, seed) for seed in range(seeds)]
        nlls[dtype] = np.array([run[0] for run in runs])
        r2[dtype] = np.array([run[1] for run in runs])
        out["best_steps"][dtype] = [run[2] for run in runs]
        out[f"{dtype}_train_s"] = round(float(np.mean([run[3] for run in runs])), 2)
    bf16 = two_level_bootstrap(nlls["bf16"])
    out.update({"bf16_heldout_nll": round(bf16["mean"], 4),
                "bf16_heldout_nll_ci": rounded(bf16["ci"], 4),
                "bf16_heldout_r2": round(float(r2["bf16"].mean()), 4)})
    for dtype in [d for d in stores if d != "bf16"]:
        delta = seed_level_test(nlls[dtype] - nlls["bf16"])
        out[f"{dtype}_nll_delta"] = round(delta["mean"], 5)
        out[f"{dtype}_nll_delta_ci"] = rounded(delta["ci"])
        out[f"{dtype}_nll_delta_interval"] = delta["interval"]
        out[f"{dtype}_nll_delta_p"] = delta["p_value"]
        out[f"{dtype}_nll_delta_per_seed"] = rounded(delta["per_seed"])
        out[f"{dtype}_nll_delta_bootstrap_ci"] = rounded((delta["bootstrap"] or delta)["ci"])
        out[f"{dtype}_heldout_r2_delta"] = round(float((r2[dtype] - r2["bf16"]).mean()), 5)
    return out


def measure_teacher(name, card, student, student_dims, rows, workdir, variance, quality_dtypes,
                    steps, seeds):
    """One teacher's figures (see the module docstring). rows: {"train", "validation", "test"}."""
    folder = f"{workdir}/{name}"
    train_rows, test_rows = rows["train"], rows["test"]
    basis_rows = train_rows[:schema_defaults("precompute")["basis_examples"]]
    test = {dtype: KVStore(precompute_split(card, test_rows, f"{folder}/test-{dtype}",
                                            examples_per_shard=len(test_rows), dtype=dtype,
                                            split="test", basis_rows=basis_rows, variance=variance,
                                            **OPTIONS))
            for dtype in DTYPES}
    tokens = test["fp32"].manifest["tokens"]
    n_heads, head_dim = test["fp32"].kv_shape
    layers = {"all": list(range(card["num_layers"])),
              "mapped": layers_to_store("mapped", card["num_layers"], student, name)}
    basis = test["pca"].basis
    channels = n_heads * head_dim
    entry = {"tokens": tokens, "layers": card["num_layers"], "mapped_layers": layers["mapped"],
             "raw_fp32_kv_bytes_per_token": 2 * card["num_layers"] * channels * 4,
             "basis_bytes": sum(t.nbytes for t in basis.values()),
             "pca_components_fraction": sum(t.shape[0] for n, t in basis.items()
                                            if n.startswith("basis_")) / (len(basis) / 2 * channels)}
    for dtype, which in FORMATS:
        key = f"{dtype}_{which}"
        per_token = kv_bytes(test[dtype], layers[which]) / tokens
        entry[f"{key}_kv_bytes_per_token"] = round(per_token, 1)
        if dtype != "fp32":
            entry[f"{key}_cosine_error"], entry[f"{key}_r2"] = reconstruction(
                test[dtype], test["fp32"], layers[which])
    # Beside the KV formats: the logit store a KD arm reads (precompute.logits_k).
    entry.update(logit_bytes_per_token(card, test_rows, f"{folder}/test-logits"))
    bf16_all = entry["bf16_all_kv_bytes_per_token"]
    for dtype, which in FORMATS:
        key = f"{dtype}_{which}"
        entry[f"{key}_over_bf16_all_bytes_ratio"] = round(
            entry[f"{key}_kv_bytes_per_token"] / bf16_all, 4)
    entry["fp8_over_fp32_bytes_ratio"] = round(
        entry["fp8_all_kv_bytes_per_token"] / entry["raw_fp32_kv_bytes_per_token"], 4)
    gsm8k_tokens = GSM8K_TRAIN_ROWS * tokens / len(test_rows)
    entry["gsm8k_train_tokens"] = round(gsm8k_tokens)
    entry["logits_gsm8k_train_gb"] = round(entry["logits_bytes_per_token"] * gsm8k_tokens / 1e9, 3)
    for dtype, which in FORMATS:
        key = f"{dtype}_{which}"
        extra = entry["basis_bytes"] if dtype == "pca" else 0
        entry[f"{key}_gsm8k_train_gb"] = round(
            (entry[f"{key}_kv_bytes_per_token"] * gsm8k_tokens + extra) / 1e9, 3)
    if steps:
        teacher_dims = detect_dims(load_model(card), load_tokenizer(card["dir"]), name)
        stores = {}
        for dtype in ("bf16", *quality_dtypes):
            seconds, stores[dtype] = timed(lambda: precompute_split(
                card, train_rows, f"{folder}/train-{dtype}", examples_per_shard=len(train_rows),
                dtype=dtype, basis_rows=basis_rows, variance=variance, **OPTIONS))
            entry[f"{dtype}_train_precompute_s"] = round(seconds, 2)
        reference = {"train": KVStore(stores["bf16"]), "test": test["bf16"]}
        entry.update(quality(card, student, student_dims, teacher_dims, rows, stores, reference,
                             steps, seeds))
    return entry


def extrapolate_1_5b(teachers, student_layers):
    """Bytes per token of a Qwen2.5-1.5B-class teacher per format, from its dims, the default
    student's ratio map onto its 28 layers, and the measured teachers' worst bytes per value
    (fp8: values plus exponents; pca: also the fraction of components kept)."""
    dims = QWEN_1_5B
    channels = dims["num_kv_heads"] * dims["head_dim"]
    mapped = len(set(ratio_layer_map(student_layers, dims["num_layers"])))
    per_layer_bf16 = 2 * channels * 2
    fp8_per_value = max(t["fp8_all_kv_bytes_per_token"] / t["bf16_all_kv_bytes_per_token"] * 2
                        for t in teachers.values())
    fraction = max(t["pca_components_fraction"] for t in teachers.values())
    out = {"layers": dims["num_layers"], "mapped_layers": mapped,
           "bf16_all_kv_bytes_per_token": dims["num_layers"] * per_layer_bf16,
           "bf16_mapped_kv_bytes_per_token": mapped * per_layer_bf16,
           "fp8_mapped_kv_bytes_per_token": round(mapped * 2 * channels * fp8_per_value, 1),
           "pca_mapped_kv_bytes_per_token": round(mapped * 2 * channels * fp8_per_value
                                                  * fraction, 1)}
    tokens = max(t["gsm8k_train_tokens"] for t in teachers.values())
    for key in [k for k in out if k.endswith("_kv_bytes_per_token")]:
        out[key.replace("_kv_bytes_per_token", "_gsm8k_train_gb")] = round(out[key] * tokens / 1e9, 2)
    return out


def main():
    cli = parser(__doc__)
    precompute = schema_defaults("precompute")
    cli.set_defaults(examples=48)
    cli.add_argument("--student-card", help="the student's card (default: the default run's)")
    data, _ = default_study()
    cli.add_argument("--train-examples", type=int, default=data["train_size"],
                     help="train rows: the quality arm's training data, whose first "
                     "precompute.basis_examples fit the pca basis (default: the default "
                     "study's data.train_size)")
    cli.add_argument("--pca-variance", type=float, default=precompute["pca_variance"],
                     help="variance the pca basis keeps (default: precompute.pca_variance)")
    cli.add_argument("--quality-dtypes", nargs="*", default=["fp8", "pca"],
                     choices=["fp16", "fp32", "fp8", "pca"],
                     help="stored dtypes the quality arm trains on beside bf16")
    cli.add_argument("--train-steps", type=int, default=30, help="quality arm steps (0: none)")
    cli.add_argument("--seeds", type=int, default=3, help="quality arm seeds")
    args = cli.parse_args()
    rows, source = bench_splits(train_size=args.train_examples, test_size=args.examples,
                                validation_size=data["validation_size"], seed=data["seed"])
    figures = {"bench": "storage", "machine": machine(args.threads), "data": source,
               "examples": len(rows["test"]), "train_examples": len(rows["train"]),
               "validation_examples": len(rows["validation"]), "pca_variance": args.pca_variance,
               "quality_dtypes": args.quality_dtypes, "train_steps": args.train_steps,
               "seeds": args.seeds, "teachers": {}}
    with tempfile.TemporaryDirectory(prefix="kava-bench-") as workdir:
        student = read_json(args.student_card) if args.student_card else student_card(args, workdir)
        student_dims = detect_dims(load_model(student), load_tokenizer(student["dir"]),
                                   student["name"])
        for name, card in teacher_cards(args, workdir).items():
            figures["teachers"][name] = measure_teacher(
                name, card, student, student_dims, rows, workdir, args.pca_variance,
                args.quality_dtypes, args.train_steps, args.seeds)
    teachers = figures["teachers"]
    figures["qwen2.5_1.5b_class"] = extrapolate_1_5b(teachers, student_dims["num_layers"])
    # Worst teacher per figure: bytes and errors high, quality low.
    keys = {key for entry in teachers.values() for key in entry}
    for key in sorted(keys):
        values = [entry[key] for entry in teachers.values() if key in entry]
        if key.endswith(("_ratio", "_cosine_error", "_nll_delta")):
            figures[key] = max(values)
        elif key.endswith(("_r2", "_r2_delta")) and all(math.isfinite(v) for v in values):
            figures[key] = min(values)
    emit(figures)


if __name__ == "__main__":
    main()
