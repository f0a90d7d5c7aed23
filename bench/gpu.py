"""GPU figures without network: random-weight models of real configs (Qwen2.5-1.5B as the
teacher, Qwen2.5-0.5B as the student), run through kava's own code:
- the precompute (kava.precompute.precompute_shard): tokens/s, MFU, peak memory, with the
  device-to-host copy on its side stream (overlap on) and on the compute stream (off);
- the same teacher loaded 4-bit (nf4, bitsandbytes) and its precompute (GPU only);
- a bf16 train step (bench.train_step's cached side: kava.train's setup and train_step):
  tokens/s, MFU;
- one evaluation job's parts (bench.evaluate).
Prints one JSON line. `--tiny` runs the same on CPU with tiny configs and a few tokens (the test
tests/test_bench.py runs it, so the script cannot rot).

MFU = achieved FLOPs / the device's bf16 dense peak: 2·N FLOPs per token for a forward, 6·N for
a train step (N: parameters outside the embedding; attention's FLOPs left out, so it errs low).

    python -m bench.gpu [--tiny] [--examples 64]      (bench/gpu.sh runs it)
"""

import argparse
import tempfile
from pathlib import Path
from unittest import mock

import torch

import kava.precompute
from bench.common import bench_rows, emit, machine, timed
from bench.evaluate import parts
from bench.train_step import prepare_world, run_side
from kava.config import schema_defaults
from kava.environment import usable_cpus
from kava.io import write_json
from kava.models import load_model, load_tokenizer, materialize
from kava.precompute import precompute_shard, tokenizer_identity

# config.json values of Qwen/Qwen2.5-1.5B and Qwen/Qwen2.5-0.5B.
QWEN25 = {"teacher": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                          num_attention_heads=12, num_key_value_heads=2),
          "student": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2)}
SHARED = dict(vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
              rope_theta=1000000.0, rms_norm_eps=1e-6, use_sliding_window=False)
TINY = {"teacher": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2),
        "student": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2)}
# bf16 dense peak FLOP/s by torch.cuda.get_device_name substring (vendor data sheets).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops():
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def body_parameters(model):
    """Parameters outside the embedding (tied or not): those every token multiplies through."""
    embedding = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p is not embedding)


def mfu(flops_per_s):
    peak = peak_flops()
    return None if peak is None else round(flops_per_s / peak, 4)


def peak_memory_mb(device):
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None


def precompute_figures(card, rows, workdir, dtype, device, label):
    """The precompute of `rows` with the copy overlap on and off."""
    model = load_model(card, dtype=dtype, device=device)
    tokenizer = load_tokenizer(card["dir"])
    identity = {"teacher": card["name"], "weights_sha256": card["weights_sha256"],
                "tokenizer": tokenizer_identity(tokenizer, card["dir"]),
                "compute_dtype": str(dtype)}
    layers = list(range(card["num_layers"]))

    def run():
        return precompute_shard(model, tokenizer, rows, Path(workdir) / f"{label}.safetensors",
                                identity=identity, layers=layers, key_space="pre_rope",
                                dtype="bf16", max_length=512, on_too_long="truncate",
                                batch_tokens=16384, progress_label=label)

    run()  # warm-up: kernels, allocator
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    on_s, record = timed(run)
    figures = {"tokens": record["tokens"], "seconds": round(on_s, 3),
               "tokens_per_s": round(record["tokens"] / on_s, 1),
               "mfu": mfu(2 * body_parameters(model) * record["tokens"] / on_s),
               "peak_memory_mb": peak_memory_mb(device)}
    if device.type == "cuda":  # the copy on the compute stream: what the side stream saves
        to_host = kava.precompute._to_host
        with mock.patch.object(kava.precompute, "_to_host",
                               lambda tensors, stream: to_host(tensors, None)):
            off_s, _ = timed(run)
        figures["overlap_off_tokens_per_s"] = round(record["tokens"] / off_s, 1)
    del model
    return figures


def train_figures(teacher, student, workdir, batch, max_length, threads):
    """One bf16 train step through kava.train (bench.train_step's cached side); the one call
    to adapt when kava.train's setup changes."""
    for name, card in (("teacher", teacher), ("student", student)):
        write_json(Path(workdir) / f"{name}.card.json", card)
    args = argparse.Namespace(card=[str(Path(workdir) / "teacher.card.json")], tiny=False,
                              student_card=str(Path(workdir) / "student.card.json"),
                              batch=batch, max_length=max_length, steps=2, threads=threads)
    world_dir = Path(workdir) / "train"
    world_dir.mkdir()
    prepare_world(args, world_dir)
    result = run_side("cached", world_dir, args)
    step_s = min(result["step_s"])
    n = body_parameters(load_model(student))
    return {"tokens_per_step": result["tokens"], "step_s": round(step_s, 4),
            "tokens_per_s": round(result["tokens"] / step_s, 1),
            "mfu": mfu(6 * n * result["tokens"] / step_s), "peak_memory_mb": result["peak_mb"]}


def main():
    cli = argparse.ArgumentParser(description=__doc__)
    cli.add_argument("--tiny", action="store_true", help="tiny configs on CPU, a few tokens")
    cli.add_argument("--examples", type=int, default=None, help="rows (default 256; tiny 4)")
    args = cli.parse_args()
    threads = usable_cpus()
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    examples = args.examples or (4 if args.tiny else 256)
    rows, source = bench_rows(examples)
    shapes = TINY if args.tiny else QWEN25
    figures = {"bench": "gpu", "machine": machine(threads), "data": source, "examples": examples,
               "peak_bf16_flops": peak_flops(), "shapes": shapes}
    with tempfile.TemporaryDirectory(prefix="kava-bench-gpu-") as workdir:
        cards = {role: materialize(f"qwen25_{role}", {"random": {
                     "architecture": "qwen2", "seed": 0, **({} if args.tiny else SHARED), **shape}},
                     Path(workdir) / role) for role, shape in shapes.items()}
        figures["precompute"] = precompute_figures(cards["teacher"], rows, workdir, dtype,
                                                   device, "teacher")
        figures["nf4_precompute"] = (
            precompute_figures({**cards["teacher"], "quantize": "nf4"}, rows, workdir, dtype,
                               device, "teacher-nf4") if device.type == "cuda" else None)
        figures["train_step"] = train_figures(cards["teacher"], cards["student"], workdir,
                                              batch=2 if args.tiny else 16,
                                              max_length=512,
                                              threads=threads)
        cfg = {**schema_defaults("eval"), "generate_examples": 2 if args.tiny else 8,
               "max_new_tokens": 8 if args.tiny else 128, "noise_examples": 2 if args.tiny else 8}
        student = load_model(cards["student"], dtype=torch.float32, device=device)
        figures["evaluate"] = parts(student, cards["student"],
                                    load_tokenizer(cards["student"]["dir"]),
                                    rows[:min(examples, 48)], cfg, repeats=1)
    emit(figures)


if __name__ == "__main__":
    main()
