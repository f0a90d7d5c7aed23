"""probe: scheduler, CPUs, paths and batch sizing from what the job really has."""

import json
import subprocess
import sys

import psutil
from conftest import PROJECT
from kava.environment import detect_precision, probe_environment, recommend_batch, usable_cpus
from kava.paths import detect_scheduler, run_paths


def test_scheduler_detection():
    assert detect_scheduler({}) == ("local", None)
    assert detect_scheduler({"SLURM_JOB_ID": "42"}) == ("slurm", "42")
    assert detect_scheduler({"PBS_JOBID": "7.pbs"}) == ("pbs", "7.pbs")
    assert detect_scheduler({"SGE_TASK_ID": "3"}) == ("sge", "3")
    assert detect_scheduler({"LSB_JOBID": "9"}) == ("lsf", "9")
    assert detect_scheduler({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "HOSTNAME": "pod-1"}) == (
        "kubernetes", "pod-1")


def test_paths_precedence():
    assert run_paths("r", {}) == {"models": "results/r/models", "data": "results/r/data",
                                  "data_source": None, "scratch": "results/r/scratch",
                                  "results": "results/r"}
    explicit = run_paths("r", {"SLURM_JOB_ID": "1", "TMPDIR": "/t", "KAVA_SCRATCH": "/s",
                               "KAVA_OUTPUT_PATH": "/o", "KAVA_MODEL_PATH": "/m",
                               "KAVA_DATA_PATH": "/d/gsm8k"})
    assert explicit == {"models": "/m", "data": "/o/r/data", "data_source": "/d/gsm8k",
                        "scratch": "/s/r", "results": "/o/r"}


def test_paths_same_inside_and_outside_a_job():
    """The Snakefile is parsed again inside every cluster job: what the job plans (its outputs,
    a retry's checkpoints) must be what the submitting process waits for. A node-local $TMPDIR
    in the job once moved scratch, and every shard went missing."""
    kava_env = {"KAVA_OUTPUT_PATH": "/shared/out", "KAVA_SCRATCH": "/shared/scratch"}
    for submitter in ({}, kava_env):
        for job_env in ({"SLURM_JOB_ID": "7", "TMPDIR": "/local/job7"},
                        {"PBS_JOBID": "7.pbs", "TMPDIR": "/local/pbs"},
                        {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "HOSTNAME": "pod",
                         "TMPDIR": "/tmp/pod"}):
            assert run_paths("r", {**submitter, **job_env}) == run_paths("r", submitter)


def test_cpus_respect_slurm_allocation():
    assert usable_cpus({"SLURM_CPUS_PER_TASK": "1"}) == 1
    assert usable_cpus({}) >= 1


def test_precision_order():
    assert detect_precision({"type": "mps"}) == "fp16"
    assert detect_precision({"type": "cpu"}) in ("bf16", "fp32")


STUDENT = {"config_declared": {"hidden_size": 576}, "num_layers": 10, "vocab_size": 49152}
TEACHERS = [{"kv_dim_total": 30 * 192}, {"kv_dim_total": 18 * 256}]


def test_recommendation_shrinks_with_memory_and_reaches_effective_batch():
    args = dict(student_params=60_000_000, student_dims=STUDENT, teacher_dims=TEACHERS,
                seq_len=256, effective_batch=32)
    roomy = recommend_batch(80.0, **args)
    tight = recommend_batch(2.0, **args)
    assert roomy["micro_batch"] == 32 and roomy["grad_accum"] == 1
    assert tight["micro_batch"] < roomy["micro_batch"]
    assert tight["micro_batch"] * tight["grad_accum"] >= 32
    assert recommend_batch(0.1, **args)["micro_batch"] == 1


def test_env_keys():
    env = probe_environment("r")
    assert set(env) >= {"device", "precision", "scheduler", "cpus", "paths", "packages",
                        "recommended"}
    assert set(env["device"]) >= {"type", "name", "count", "memory_gb"}
    assert set(env["packages"]) == {"torch", "transformers", "bitsandbytes", "datasets",
                                    "safetensors", "snakemake", "pyarrow", "psutil"}
    assert env["packages"]["torch"].startswith("2.13.0")


def test_cpu_memory_is_what_is_available_not_the_total():
    device = probe_environment("r")["device"]
    if device["type"] != "cpu":
        return
    assert device["memory_gb"] == round(psutil.virtual_memory().total / 2**30, 2)
    # available moves between two reads; it stays below the total and near psutil's figure
    assert 0 < device["free_memory_gb"] < device["memory_gb"]
    assert abs(device["free_memory_gb"] - psutil.virtual_memory().available / 2**30) < 1


def test_probe_cli_prints_a_readable_report():
    out = subprocess.run([sys.executable, "-m", "stages.probe"], cwd=PROJECT,
                         capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0].startswith("device ") and "scheduler  local" in out
    machine = subprocess.run([sys.executable, "-m", "stages.probe", "--json"], cwd=PROJECT,
                             capture_output=True, text=True, check=True).stdout
    assert json.loads(machine)["scheduler"]["type"] == "local"
