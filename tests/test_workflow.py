"""The Snakemake layer: config validation, profiles, and the smoke pipeline end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import PROJECT


def snakemake(*args, env=None):
    """Run snakemake; `.output` is stdout and stderr together (it reports errors on stdout)."""
    # Rules run `python -m stages...`: put this interpreter's environment first on PATH.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    result = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=PROJECT,
                            capture_output=True, text=True,
                            env={**os.environ, "PATH": path, **(env or {})})
    result.output = result.stdout + result.stderr
    return result


def write_config(tmp_path, mutate):
    config = yaml.safe_load((PROJECT / "config" / "smoke.yaml").read_text())
    mutate(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_schema_error_names_the_key(tmp_path):
    def bad(config):
        config["models"]["student"]["derive"]["keep_layer"] = [0]

    result = snakemake("-n", "--profile", "profiles/local", "--configfile",
                       str(write_config(tmp_path, bad)))
    assert result.returncode != 0
    assert "'keep_layer' was unexpected" in result.output


def test_unknown_source_kind_is_a_schema_error(tmp_path):
    def bad(config):
        config["models"]["teacher_llama"] = {"ollama": "llama3"}

    result = snakemake("-n", "--profile", "profiles/local", "--configfile",
                       str(write_config(tmp_path, bad)))
    assert result.returncode != 0 and "'ollama' was unexpected" in result.output


def test_undefined_teacher_is_named(tmp_path):
    def bad(config):
        config["teachers"] = ["teacher_llama", "qwen_big"]

    result = snakemake("-n", "--profile", "profiles/local", "--configfile",
                       str(write_config(tmp_path, bad)))
    assert result.returncode != 0 and "'qwen_big' is named as a teacher" in result.output


def test_slurm_dry_run_maps_gpu_rules_to_gpus(tmp_path):
    result = snakemake("-n", "--profile", "profiles/slurm",
                       env={"KAVA_SLURM_ACCOUNT": "acct", "KAVA_SLURM_PARTITION": "gpu",
                            "KAVA_OUTPUT_PATH": str(tmp_path)})
    assert result.returncode == 0, result.output
    jobs = {}
    rule = None
    for line in result.stdout.splitlines():
        if line.startswith(("rule ", "localrule ")):
            rule = line.split()[1].rstrip(":")
        elif line.strip().startswith("resources:") and rule:
            jobs.setdefault(rule, set()).add(line)
    assert all("gpu=1" in res for res in jobs["dims"]) and all("gpu=1" in r for r in jobs["probe"])
    assert not any("gpu=" in res for res in jobs["materialize"])
    assert all("slurm_account=acct" in res and "slurm_partition=gpu" in res
               for lines in jobs.values() for res in lines)


def test_smoke_pipeline_runs_and_reruns_one_stage(tmp_path):
    # --nolock: outputs go to tmp_path, so this cannot collide with a user's run in the tree.
    env = {"KAVA_OUTPUT_PATH": str(tmp_path)}
    first = snakemake("--profile", "profiles/local", "--configfile", "config/smoke.yaml",
                      "--nolock", env=env)
    assert first.returncode == 0, first.output[-3000:]
    results = tmp_path / "smoke"
    env_json = json.loads((results / "env.json").read_text())
    assert env_json["paths"]["results"] == str(results)
    dims = json.loads((results / "dims" / "teacher_gemma.json").read_text())
    assert dims["num_sliding_layers"] == 3
    for rule in ("materialize", "dims", "probe"):
        assert list((results / "benchmarks" / rule).glob("*.tsv")), rule
        assert list((results / "logs" / rule).glob("*.log")), rule

    before = (results / "dims" / "student.json").stat().st_mtime_ns
    untouched = (results / "dims" / "teacher_llama.json").stat().st_mtime_ns
    again = snakemake("--profile", "profiles/local", "--configfile", "config/smoke.yaml",
                      "--nolock", "--forcerun", f"{results}/dims/student.json", env=env)
    assert again.returncode == 0, again.output[-3000:]
    assert (results / "dims" / "student.json").stat().st_mtime_ns > before
    assert (results / "dims" / "teacher_llama.json").stat().st_mtime_ns == untouched
    assert not [p for p in Path(results).rglob(".*.tmp-*")]
