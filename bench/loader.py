"""KV reader throughput against the bytes a training step consumes.

Reader: each teacher's rows are precomputed here into a fresh store (`--dtype`, default bf16;
the teacher layers the student's ratio layer map uses, as precompute.layers: mapped stores them;
shards of 16 examples; pca's basis fitted on the same rows), then read through
kava.kvstore.KVStore example by example, materialising those layers as float32, as training
does. Bytes are the K/V bytes the reader hands out (the stored bytes, for fp8 and pca the
dequantised float32 ones). The first pass includes each shard's sha256 verification
(once per process) and is the one the ratio uses; the second pass is reported as steady state.
The shards were just written, so they are in the page cache: a cold disk reads slower.

Training step: the student's forward and backward (cross-entropy on the text, fp32) over
`--micro-batch` examples of its own tokens, timed here. A real step also runs projectors and
the KV loss, so this step time is a lower bound, its consumption an upper bound and the ratio
conservative. Bytes a step consumes: the stored K/V bytes of the same examples, all teachers,
mapped layers. Goal: reader bytes/s >= 10x what a step consumes.

    python -m bench.loader [--tiny | --card CARD ... --student-card CARD] [--examples 32]
                           [--dtype bf16|fp8|pca]
"""

import tempfile

from bench.common import bench_rows, emit, machine, parser, student_card, teacher_cards, timed
from kava.io import read_json
from kava.kvstore import KVStore
from kava.layer_maps import ratio_layer_map
from kava.models import load_model, load_tokenizer
from kava.precompute import pad_batch, precompute_split


def read_pass(store, layers):
    """Read every example's K/V of `layers` into float32; the stored bytes read."""
    total = 0
    for i in range(len(store)):
        example = store.example(i)
        for layer in layers:
            for kind in ("k", "v"):
                stored = example[kind][layer]
                stored.float()
                total += stored.numel() * stored.element_size()
    return total


def train_step(student, batch):
    input_ids, valid = batch
    labels = input_ids.masked_fill(~valid, -100)
    loss = student(input_ids=input_ids, attention_mask=valid.long(), labels=labels).loss
    loss.backward()
    student.zero_grad(set_to_none=True)


def main():
    cli = parser(__doc__)
    cli.add_argument("--student-card", help="the student's card (default: the run's student)")
    cli.add_argument("--micro-batch", type=int, default=8)
    cli.add_argument("--max-length", type=int, default=256)
    cli.add_argument("--repeats", type=int, default=2)
    cli.add_argument("--dtype", default="bf16", choices=("bf16", "fp8", "pca"))
    args = cli.parse_args()
    rows, source = bench_rows(args.examples)
    figures = {"bench": "loader", "machine": machine(args.threads), "data": source,
               "examples": len(rows), "dtype": args.dtype, "teachers": {}}
    with tempfile.TemporaryDirectory(prefix="kava-bench-") as workdir:
        student = read_json(args.student_card) if args.student_card else student_card(args, workdir)
        read_s = steady_s = read_bytes = step_bytes = 0
        for name, card in teacher_cards(args, workdir).items():
            layers = sorted(set(ratio_layer_map(student["num_layers"], card["num_layers"])))
            manifest = precompute_split(
                card, rows, f"{workdir}/{name}", examples_per_shard=16, compute="auto",
                layers=layers, key_space="pre_rope", dtype=args.dtype,
                max_length=args.max_length, on_too_long="truncate", batch_tokens=2048)
            first_s, nbytes = timed(lambda: read_pass(KVStore(manifest), layers))
            second_s, _ = timed(lambda: read_pass(KVStore(manifest), layers))
            store = KVStore(manifest)
            # The step's examples: the first micro-batch's, at this teacher's stored lengths.
            per_step = sum(2 * len(layers) * store.example(i)["k"][layers[0]].nbytes
                           for i in range(min(args.micro_batch, len(store))))
            figures["teachers"][name] = {
                "mapped_layers": layers, "bytes_read": nbytes, "first_pass_s": round(first_s, 3),
                "steady_pass_s": round(second_s, 3),
                "reader_bytes_per_s": round(nbytes / first_s), "step_bytes": per_step}
            read_s, steady_s = read_s + first_s, steady_s + second_s
            read_bytes, step_bytes = read_bytes + nbytes, step_bytes + per_step

        model = load_model(student).train()
        tokenizer = load_tokenizer(student["dir"])
        batch = pad_batch([tokenizer(row["text"])["input_ids"][:args.max_length]
                           for row in rows[:args.micro_batch]])
        train_step(model, batch)  # warm-up
        step_s = min(timed(lambda: train_step(model, batch))[0] for _ in range(args.repeats))
    reader_rate, step_rate = read_bytes / read_s, step_bytes / step_s
    figures.update({
        "student": student["name"], "micro_batch": args.micro_batch,
        "train_step_s": round(step_s, 3), "step_bytes": step_bytes,
        "step_consumes_bytes_per_s": round(step_rate),
        "reader_bytes_per_s": round(reader_rate),
        "reader_steady_bytes_per_s": round(read_bytes / steady_s),
        "loader_over_train_ratio": round(reader_rate / step_rate, 1),
    })
    emit(figures)


if __name__ == "__main__":
    main()
