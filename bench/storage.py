"""Stored bytes per token, reconstruction error and distillation quality per storage format.

For each teacher, held-out (test) rows are precomputed (fp32 compute, pre-RoPE, all layers) once
per stored dtype: fp32 (the exact reference), bf16 (today's default), fp8 and pca (its basis
fitted on other, train rows, as stage kv_basis fits it). A format is a dtype and a layer set:
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
- quality arm (`--train-steps`, 0 skips it): the default study's kv arm on this teacher alone
  (kava.train's own setup and train_step; the default config's regime: the first
  `--quality-examples` train rows, `--train-steps` steps of 4, lr 3e-4) trains once per seed
  on each format's train-row store. The stores differ, nothing else: same student, rows, seed
  and data order. Per format, against the bf16 arm of the same seed:
  `<format>_nll_delta`: held-out answer NLL (fp32, nats/token, kava.evaluate.answer_nll on the
  test rows), format − bf16, mean with a two-level (seeds, then examples) bootstrap CI
  (`_ci`), beside the bf16 arm's own NLL and CI (`bf16_heldout_nll[_ci]`); goal: the format's
  NLL lies within the bf16 arm's CI (the paired CI of the difference is the stricter test);
  `<format>_heldout_r2_delta`: held-out KV probe R² (kava.kvfit, the report's figure) scored
  against the bf16 all-layer stores, format − bf16, mean over seeds; goal: > -0.005.
  Training reads only the mapped layers, so `all` and `mapped` of a dtype train alike.
Extrapolations: GSM8K train (7473 rows x this teacher's measured tokens per example) in GB per
format, and a Qwen2.5-1.5B-class teacher (28 layers, 2 KV heads x 128, from its config.json)
under the default student's mapped layers, with fp8's and pca's measured bytes per value.

    python -m bench.storage [--tiny | --card CARD ... --student-card CARD] [--examples 48]
                            [--train-examples 64] [--quality-examples 16] [--train-steps 30]
                            [--seeds 3] [--pca-variance 0.99]
"""

import math
import tempfile

import numpy as np
import torch
from safetensors import safe_open

from bench.common import PROJECT, emit, machine, parser, student_card, teacher_cards
from bench.train_step import default_train_config
from kava.config import schema_defaults
from kava.data import prepare
from kava.dims import detect_dims
from kava.evaluate import answer_nll, at_word_boundary
from kava.io import read_json
from kava.kvfit import kv_probe_r2
from kava.kvstore import LOGIT_TENSORS, KVStore, logits_spec
from kava.layer_maps import layers_to_store, ratio_layer_map
from kava.models import load_model, load_tokenizer
from kava.precompute import precompute_split
from kava.stats import two_level_bootstrap
from kava.train import setup, step_batches, train_step

DTYPES = ("fp32", "bf16", "fp8", "pca")
FORMATS = [(dtype, layers) for dtype in DTYPES for layers in ("all", "mapped")]
GSM8K_TRAIN_ROWS = 7473
# Qwen2.5-1.5B's config.json: num_hidden_layers 28, num_key_value_heads 2, hidden_size 1536 /
# num_attention_heads 12 = head_dim 128.
QWEN_1_5B = {"num_layers": 28, "num_kv_heads": 2, "head_dim": 128}
MAX_LENGTH = 256
OPTIONS = dict(compute="fp32", key_space="pre_rope", max_length=MAX_LENGTH,
               on_too_long="truncate", batch_tokens=2048)


def bench_splits(n_train, n_test):
    """(train rows, test rows, source): real GSM8K when its copy is present, else synthetic."""
    gsm8k = PROJECT.parent / "shared" / "data" / "gsm8k"
    source = {"source": "path", "path": str(gsm8k)} if gsm8k.is_dir() else {"source": "synthetic"}
    tables, info = prepare({**source, "train_size": n_train, "validation_size": 0,
                            "test_size": n_test, "seed": 0, "on_bad_row": "error"})
    return tables["train"], tables["test"], info["source"]


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


def quality_arm(card, student, student_dims, teacher_dims, train_rows, test_rows, train_store,
                reference, steps, seed):
    """(held-out answer NLL per test row, held-out KV probe R²) of the student after `steps`
    kv-arm steps on `train_store` with `seed`; the probe is scored against the `reference`
    {"train", "test"} stores (bf16, all layers)."""
    cfg = {**default_train_config(), "effective_batch": 4, "micro_batch": 4, "steps": steps,
           "lr": 3e-4, "teachers": [card["name"]]}
    teachers = [{"card": card, "dims": teacher_dims, "manifest": str(train_store)}]
    run = setup(cfg, seed=seed, student_card=student, student_dims=student_dims,
                teachers=teachers, rows=train_rows, max_length=MAX_LENGTH,
                env={"precision": "fp32"}, device=torch.device("cpu"))
    for step in range(1, steps + 1):
        train_step(run, step_batches(run, step))
    model, data = run.distiller.student.eval(), run.data
    prompts, answers = zip(*(at_word_boundary(row["prompt"], row["answer"]) for row in test_rows))
    with torch.inference_mode():
        nlls = answer_nll(model, data.tokenizer, prompts, answers, 8)
    probe = kv_probe_r2(model, data.tokenizer, {card["name"]: reference["train"]},
                        {card["name"]: reference["test"]}, data.layer_maps, train_rows, test_rows,
                        MAX_LENGTH, 8, cfg["projector_ridge"], data.key_space, data.alignment)
    return nlls, probe["overall"]


def quality(card, student, student_dims, teacher_dims, train_rows, test_rows, stores, reference,
            steps, seeds):
    """The quality arm's figures (see the module docstring) of every format in `stores`
    ({dtype: train manifest}, bf16 first) against bf16."""
    nlls, r2 = {}, {}
    for dtype, store in stores.items():
        runs = [quality_arm(card, student, student_dims, teacher_dims, train_rows, test_rows,
                            store, reference, steps, seed) for seed in range(seeds)]
        nlls[dtype] = np.array([run[0] for run in runs])
        r2[dtype] = np.array([run[1] for run in runs])
    bf16 = two_level_bootstrap(nlls["bf16"])
    out = {"bf16_heldout_nll": round(bf16["mean"], 4),
           "bf16_heldout_nll_ci": [round(bound, 4) for bound in bf16["ci"]],
           "bf16_heldout_r2": round(float(r2["bf16"].mean()), 4)}
    for dtype in [d for d in stores if d != "bf16"]:
        delta = two_level_bootstrap(nlls[dtype] - nlls["bf16"])
        out[f"{dtype}_nll_delta"] = round(delta["mean"], 5)
        out[f"{dtype}_nll_delta_ci"] = [round(bound, 5) for bound in delta["ci"]]
        out[f"{dtype}_heldout_r2_delta"] = round(float((r2[dtype] - r2["bf16"]).mean()), 5)
    return out


def measure_teacher(name, card, student, student_dims, train_rows, test_rows, workdir, variance,
                    quality_examples, steps, seeds):
    folder = f"{workdir}/{name}"
    test = {dtype: KVStore(precompute_split(card, test_rows, f"{folder}/test-{dtype}",
                                            examples_per_shard=len(test_rows), dtype=dtype,
                                            split="test", basis_rows=train_rows, variance=variance,
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
        teacher_dims = {"num_layers": card["num_layers"], "num_kv_heads": n_heads,
                        "head_dim": head_dim}
        quality_rows = train_rows[:quality_examples]
        stores = {dtype: precompute_split(card, quality_rows, f"{folder}/train-{dtype}",
                                          examples_per_shard=len(quality_rows), dtype=dtype,
                                          basis_rows=train_rows, variance=variance, **OPTIONS)
                  for dtype in ("bf16", "fp8", "pca")}
        reference = {"train": KVStore(stores["bf16"]), "test": test["bf16"]}
        entry.update(quality(card, student, student_dims, teacher_dims, quality_rows, test_rows,
                             stores, reference, steps, seeds))
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
    cli.add_argument("--train-examples", type=int, default=precompute["basis_examples"],
                     help="train rows the pca basis is fitted on (default: precompute.basis_examples)")
    cli.add_argument("--pca-variance", type=float, default=precompute["pca_variance"],
                     help="variance the pca basis keeps (default: precompute.pca_variance)")
    cli.add_argument("--quality-examples", type=int, default=16,
                     help="the first this many train rows are the quality arm's training data")
    cli.add_argument("--train-steps", type=int, default=30, help="quality arm steps (0: none)")
    cli.add_argument("--seeds", type=int, default=3, help="quality arm seeds")
    args = cli.parse_args()
    train_rows, test_rows, source = bench_splits(args.train_examples, args.examples)
    figures = {"bench": "storage", "machine": machine(args.threads), "data": source,
               "examples": len(test_rows), "train_examples": len(train_rows),
               "pca_variance": args.pca_variance, "quality_examples": args.quality_examples,
               "train_steps": args.train_steps, "seeds": args.seeds, "teachers": {}}
    with tempfile.TemporaryDirectory(prefix="kava-bench-") as workdir:
        student = read_json(args.student_card) if args.student_card else student_card(args, workdir)
        student_dims = detect_dims(load_model(student), load_tokenizer(student["dir"]),
                                   student["name"])
        for name, card in teacher_cards(args, workdir).items():
            figures["teachers"][name] = measure_teacher(
                name, card, student, student_dims, train_rows, test_rows, workdir,
                args.pca_variance, args.quality_examples, args.train_steps, args.seeds)
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
