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
- `<format>_over_bf16_all_bytes_ratio`: against today's bf16 all-layer store (goal <= 1/8);
  `fp8_over_fp32_bytes_ratio`: fp8 all layers against raw fp32 K/V (goal <= 0.25);
- `<format>_cosine_error`: 1 - cosine between each dequantised K or V vector (one token, one
  head) and the fp32 one, averaged; `<format>_r2`: 1 - squared error / squared deviation of the
  fp32 K/V from its per-channel mean, over the format's layers, K and V;
- quality arm (`--train-steps`, 0 skips it): the default student trains that many steps
  (kava.train's own setup and train_step, seed 0, kv arm on this teacher alone) on the format's
  train-row store, then its held-out KV probe R² (kava.kvfit, the report's figure) is scored
  against the bf16 all-layer stores: `<format>_heldout_r2` and `<format>_heldout_r2_delta`
  (format - bf16_all; goal: > -0.005). Every run starts from the same student, rows and seed, so
  they differ only in the teacher KV they were trained on.
Extrapolations: GSM8K train (7473 rows x this teacher's measured tokens per example) in GB per
format, and a Qwen2.5-1.5B-class teacher (28 layers, 2 KV heads x 128, from its config.json)
under the default student's mapped layers, with fp8's and pca's measured bytes per value.

    python -m bench.storage [--tiny | --card CARD ... --student-card CARD] [--examples 16]
                            [--train-examples 16] [--train-steps 6]
"""

import math
import tempfile

import torch
from safetensors import safe_open

from bench.common import PROJECT, emit, machine, parser, student_card, teacher_cards
from bench.train_step import default_train_config
from kava.align import ratio_layer_map
from kava.data import prepare
from kava.dims import detect_dims
from kava.io import read_json
from kava.kvfit import kv_probe_r2
from kava.kvstore import KVStore
from kava.models import load_model, load_tokenizer
from kava.precompute import precompute_split, select_layers
from kava.train import setup_data, setup_model, setup_optimizer, setup_scheduler, step_batches, \
    train_step

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
    tables, info = prepare({**source, "train_size": n_train, "test_size": n_test, "seed": 0,
                            "on_bad_row": "error"})
    return tables["train"], tables["test"], info["source"]


def kv_bytes(store, layers):
    """Stored K/V bytes of `layers` in a store (values, exponents, group index)."""
    wanted = {f"{kind}.{layer}" for kind in ("k", "v", "k_exp", "v_exp") for layer in layers}
    total = 0
    for shard in store.manifest["shards"]:
        with safe_open(str((store.path.parent / shard["path"]).resolve()), framework="pt") as handle:
            total += sum(handle.get_tensor(name).nbytes for name in handle.keys()
                         if name in wanted or name == "group")
    return total


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
                reference, steps):
    """Held-out KV probe R² of the student after `steps` kv-arm steps on `train_store`, scored
    against the `reference` {"train", "test"} stores (bf16, all layers)."""
    torch.manual_seed(0)
    cfg = {**default_train_config(), "effective_batch": 4, "micro_batch": 4, "steps": steps,
           "lr": 3e-4, "teachers": [card["name"]]}
    teachers = [{"card": card, "dims": teacher_dims, "manifest": str(train_store)}]
    data = setup_data(cfg, 0, student, student_dims, teachers, train_rows, MAX_LENGTH)
    distiller = setup_model(cfg, data, student, student_dims, teachers, torch.device("cpu"))
    optimizer = setup_optimizer(cfg, distiller)
    scheduler = setup_scheduler(cfg, optimizer)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in range(1, steps + 1):
        batches, ce_items, kv_items = step_batches(data, cfg, 0, step, 0, 1, 4)
        train_step(distiller, distiller, batches, ce_items, kv_items, optimizer, scheduler,
                   scaler, torch.autocast("cpu", enabled=False))
    model = distiller.student.eval()
    probe = kv_probe_r2(model, data.tokenizer, {card["name"]: reference["train"]},
                        {card["name"]: reference["test"]}, data.layer_maps, train_rows, test_rows,
                        MAX_LENGTH, 8, cfg["projector_ridge"], data.key_space, data.alignment)
    return probe["overall"]


def measure_teacher(name, card, student, student_dims, train_rows, test_rows, workdir, steps):
    folder = f"{workdir}/{name}"
    test = {dtype: KVStore(precompute_split(card, test_rows, f"{folder}/test-{dtype}",
                                            examples_per_shard=len(test_rows), dtype=dtype,
                                            split="test", basis_rows=train_rows, **OPTIONS))
            for dtype in DTYPES}
    tokens = test["fp32"].manifest["tokens"]
    n_heads, head_dim = test["fp32"].kv_shape
    layers = {"all": list(range(card["num_layers"])),
              "mapped": select_layers("mapped", card["num_layers"], student, name)}
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
    bf16_all = entry["bf16_all_kv_bytes_per_token"]
    for dtype, which in FORMATS:
        key = f"{dtype}_{which}"
        entry[f"{key}_over_bf16_all_bytes_ratio"] = round(
            entry[f"{key}_kv_bytes_per_token"] / bf16_all, 4)
    entry["fp8_over_fp32_bytes_ratio"] = round(
        entry["fp8_all_kv_bytes_per_token"] / entry["raw_fp32_kv_bytes_per_token"], 4)
    gsm8k_tokens = GSM8K_TRAIN_ROWS * tokens / len(test_rows)
    entry["gsm8k_train_tokens"] = round(gsm8k_tokens)
    for dtype, which in FORMATS:
        key = f"{dtype}_{which}"
        extra = entry["basis_bytes"] if dtype == "pca" else 0
        entry[f"{key}_gsm8k_train_gb"] = round(
            (entry[f"{key}_kv_bytes_per_token"] * gsm8k_tokens + extra) / 1e9, 3)
    if steps:
        teacher_dims = {"num_layers": card["num_layers"], "num_kv_heads": n_heads,
                        "head_dim": head_dim}
        train = {dtype: precompute_split(card, train_rows, f"{folder}/train-{dtype}",
                                         examples_per_shard=len(train_rows), dtype=dtype,
                                         basis_rows=train_rows, **OPTIONS)
                 for dtype in ("bf16", "fp8", "pca")}
        reference = {"train": KVStore(train["bf16"]), "test": test["bf16"]}
        for dtype in ("bf16", "fp8", "pca"):
            entry[f"{dtype}_heldout_r2"] = quality_arm(
                card, student, student_dims, teacher_dims, train_rows, test_rows, train[dtype],
                reference, steps)
        for dtype in ("fp8", "pca"):
            entry[f"{dtype}_heldout_r2_delta"] = entry[f"{dtype}_heldout_r2"] - entry["bf16_heldout_r2"]
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
    cli.set_defaults(examples=16)
    cli.add_argument("--student-card", help="the student's card (default: the default run's)")
    cli.add_argument("--train-examples", type=int, default=16,
                     help="train rows: the pca basis sample and the quality arm's training data")
    cli.add_argument("--train-steps", type=int, default=6, help="quality arm steps (0: none)")
    args = cli.parse_args()
    train_rows, test_rows, source = bench_splits(args.train_examples, args.examples)
    figures = {"bench": "storage", "machine": machine(args.threads), "data": source,
               "examples": len(test_rows), "train_examples": len(train_rows),
               "train_steps": args.train_steps, "teachers": {}}
    with tempfile.TemporaryDirectory(prefix="kava-bench-") as workdir:
        student = read_json(args.student_card) if args.student_card else student_card(args, workdir)
        student_dims = detect_dims(load_model(student), load_tokenizer(student["dir"]),
                                   student["name"])
        for name, card in teacher_cards(args, workdir).items():
            figures["teachers"][name] = measure_teacher(name, card, student, student_dims,
                                                        train_rows, test_rows, workdir,
                                                        args.train_steps)
    teachers = figures["teachers"]
    figures["qwen2.5_1.5b_class"] = extrapolate_1_5b(teachers, student_dims["num_layers"])
    # Worst teacher per figure: bytes and errors high, quality low.
    keys = {key for entry in teachers.values() for key in entry}
    for key in sorted(keys):
        values = [entry[key] for entry in teachers.values() if key in entry]
        if key.endswith(("_ratio", "_cosine_error")):
            figures[key] = max(values)
        elif key.endswith(("_r2", "_r2_delta")) and all(math.isfinite(v) for v in values):
            figures[key] = min(values)
    emit(figures)


if __name__ == "__main__":
    main()
