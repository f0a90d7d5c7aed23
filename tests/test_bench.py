"""The benchmarks' CPU modes run end to end, so the scripts cannot rot before a GPU runs them."""

import json
import subprocess
import sys

from conftest import PROJECT


def last_json_line(command):
    done = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_gpu_bench_tiny_prints_every_part():
    figures = last_json_line(["sh", "bench/gpu.sh", "--tiny"])
    assert figures["bench"] == "gpu"
    assert figures["precompute"]["tokens"] > 0 and figures["precompute"]["tokens_per_s"] > 0
    assert figures["train_step"]["tokens_per_step"] > 0 and figures["train_step"]["step_s"] > 0
    # No GPU here: no peak to divide by, no nf4.
    assert figures["peak_bf16_flops"] is None and figures["precompute"]["mfu"] is None
    assert figures["nf4_precompute"] is None
    assert set(figures["evaluate"]) == {"nll", "noise_check", "generate"}


def test_evaluate_bench_tiny_compares_with_a_one_off_script():
    figures = last_json_line([sys.executable, "-m", "bench.evaluate", "--tiny", "--examples",
                              "3", "--repeats", "1"])
    for part in ("nll", "noise_check", "generate"):
        assert figures["parts"][part]["kava_s"] > 0 and figures["parts"][part]["other_s"] > 0
    # Generation is timed in eval.dtype (auto: the machine's precision), as the stage generates.
    assert figures["parts"]["generate"]["dtype"] == figures["machine"]["precision"]
    assert "stage" not in figures  # no --baseline-repo


def test_storage_bench_tiny_quality_arm_has_the_headline_interval():
    figures = last_json_line([sys.executable, "-m", "bench.storage", "--tiny", "--examples", "4",
                              "--train-examples", "4", "--train-steps", "2", "--seeds", "2",
                              "--quality-dtypes", "pca"])
    teacher = next(iter(figures["teachers"].values()))
    assert teacher["pca_nll_delta_interval"] == "t"
    low, high = teacher["pca_nll_delta_ci"]
    assert low <= teacher["pca_nll_delta"] <= high
    assert len(teacher["pca_nll_delta_per_seed"]) == 2
    # Every arm is restored to a step its validation scoring chose.
    assert all(step in (1, 2) for steps in teacher["best_steps"].values() for step in steps)
    assert 0 < teacher["logits_bytes_per_token"] and teacher["pca_train_precompute_s"] > 0


def test_precompute_bench_tiny_times_the_default_pca_store_against_the_bare_forward():
    figures = last_json_line([sys.executable, "-m", "bench.precompute", "--tiny", "--examples",
                              "4", "--repeats", "1"])
    assert figures["dtype"] == "pca"
    for teacher in figures["teachers"].values():
        assert teacher["tokens"] > 0 and teacher["forward_s"] > 0 and teacher["precompute_s"] > 0
    assert figures["precompute_over_forward_ratio"] == min(
        t["precompute_over_forward_ratio"] for t in figures["teachers"].values())
