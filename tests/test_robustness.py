"""Odd environments a new user brings: paths with spaces and non-ASCII characters, settings a
profile could override, a run killed mid-way."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PROJECT
from test_workflow import snakemake, write_config

# A folder name that breaks unquoted shell words and ASCII-only path handling.
ODD = "dir with space é"


@pytest.fixture(scope="module")
def odd_paths_run(tmp_path_factory):
    """The smoke pipeline with every variant that builds an optional path argument (derive,
    precompute.layers: mapped, layer_map: cka), every KAVA_* path absolute and odd."""
    root = tmp_path_factory.mktemp("odd") / ODD
    env = {"KAVA_OUTPUT_PATH": str(root / "out"), "KAVA_SCRATCH": str(root / "scratch"),
           "KAVA_MODEL_PATH": str(root / "models")}

    def variants(config):
        config["precompute"] = {**config["precompute"], "layers": "mapped"}
        config["train"] = {**config["train"], "steps": 4}
        config["arms"] = {"ce": {"kv_weight": 0}, "kv": {"layer_map": "cka"}}

    root.mkdir(parents=True)
    configfile = write_config(root, variants)
    result = snakemake("--profile", "profiles/local", "--configfile", str(configfile), "--nolock",
                       env=env)
    return result, root, env


def test_pipeline_runs_with_odd_absolute_paths(odd_paths_run):
    result, root, _ = odd_paths_run
    assert result.returncode == 0, result.output[-3000:]
    results = root / "out" / "smoke"
    assert (results / "report.html").exists()
    # Each optional argument went through the shell as one word, to the place it names.
    assert (root / "models" / "student" / "config.json").exists()
    assert (results / "layer_maps" / "cka.json").exists()
    assert list((root / "scratch" / "smoke" / "kv").rglob("shard-*.safetensors"))
    for flag, folder in (("--base-card", "models"), ("--student-card", "models"),
                         ("--cka-maps", "layer_maps")):
        assert f"{flag} '{results}/{folder}/" in result.output, flag


def planned_jobs(output):
    """{rule: [{threads, resources, priority (each where printed), shell}]} from a dry run's
    printout."""
    jobs, rule, job = {}, None, {}
    for line in output.splitlines():
        if line.startswith(("rule ", "localrule ", "checkpoint ")):
            rule, job = line.split()[1].rstrip(":"), {}
        elif rule and line.strip().startswith(("threads:", "resources:", "priority:")):
            key, value = line.strip().split(":", 1)
            job[key] = value.strip()
        elif rule and line.startswith("Shell command:"):
            jobs.setdefault(rule, []).append({**job, "shell": line})
            rule = None
    return jobs


PROFILES = {
    "local": (["--resources", "gpu=2"], {}),
    # A dry run without --cores plans every job with one thread; a SLURM run is not capped.
    "slurm": (["--cores", "64"], {"KAVA_SLURM_ACCOUNT": "acct", "KAVA_SLURM_PARTITION": "gpu"}),
}


def dry_run(tmp_path, profile, *extra, **config_changes):
    def change(config):
        config["threads"] = 2
        config["train_job"] = {"gpus": 2, "checkpoint_every": 3}
        config["train"].update(**config_changes)

    args, env = PROFILES[profile]
    return snakemake("-n", "--profile", f"profiles/{profile}", "--configfile",
                     str(write_config(tmp_path, change)), "--nolock", *args, *extra,
                     env={**env, "KAVA_OUTPUT_PATH": str(tmp_path / "out")})


@pytest.mark.parametrize("profile", PROFILES)
def test_planned_jobs_carry_the_configured_threads_gpus_and_checkpoints(tmp_path, profile):
    result = dry_run(tmp_path, profile)
    assert result.returncode == 0, result.output[-3000:]
    jobs = planned_jobs(result.stdout)
    # probe, the JSON merges (kv_manifest, report) and the model cards ask for one thread
    # whatever the config.
    single = ("probe", "kv_manifest", "report", "model_card", "all")
    compute = [job for rule, runs in jobs.items() if rule not in single for job in runs]
    assert compute and all(job["threads"] == "2" and "--threads 2 " in job["shell"]
                           for job in compute)
    assert all("threads" not in job and "--threads 1 " in job["shell"]
               for job in jobs["kv_manifest"] + jobs["report"] + jobs["model_card"])
    assert not any("cpus_per_task" in job["resources"] for job in compute)
    assert len(jobs["train"]) == 2
    for job in jobs["train"]:
        assert "gpu=2" in job["resources"].split(", ")
        assert "torchrun --standalone --nproc_per_node 2 -m stages.train" in job["shell"]
        assert '"checkpoint_every": 3' in job["shell"]
    # Ready jobs run in this order: what leads to training, training, then the rest.
    # (The store's jobs are planned only once prepare, a checkpoint, has counted the rows.)
    before_train = [rule for rule in ("prepare", "materialize", "dims", "probe", "kv_basis",
                                      "precompute", "kv_manifest") if rule in jobs]
    assert {"prepare", "materialize", "dims", "probe"} <= set(before_train)
    assert all(job.get("priority") == "2" for rule in before_train for job in jobs[rule])
    assert all(job.get("priority") == "1" for job in jobs["train"])
    assert not any("priority" in job for rule in ("evaluate", "report", "model_card")
                   for job in jobs[rule])


@pytest.mark.parametrize("extra, message", [
    (["--set-threads", "prepare=4"], "kava: error: --set-threads prepare=… (profile or command "
     "line) overrides the config key threads; remove it and set threads"),
    (["--set-resources", "train:gpu=1"], "kava: error: --set-resources train:gpu (profile or "
     "command line) overrides the config key train_job.gpus; remove it and set train_job.gpus"),
    (["--set-resources", "train:cpus_per_task=4"], "kava: error: --set-resources "
     "train:cpus_per_task (profile or command line) overrides the config key threads (SLURM gets "
     "cpus-per-task = threads); remove it and set threads"),
    (["--default-resources", "cpus_per_task=4"], "kava: error: --default-resources cpus_per_task "
     "(profile or command line) overrides the config key threads (SLURM gets cpus-per-task = "
     "threads); remove it and set threads"),
    (["--resources", "gpu=1"], "kava: error: the config key train_job.gpus (2) exceeds the gpu "
     "resource 1 (profile or --resources), which would cut it; raise it with --resources gpu=2"),
])
def test_an_override_of_the_config_is_refused_in_one_line(tmp_path, extra, message):
    result = dry_run(tmp_path, "local", *extra)
    assert result.returncode != 0
    assert message in result.output.splitlines()


def test_threads_above_the_local_cores_are_refused_before_any_job(tmp_path):
    """Checked at onstart, once the executor is known (a SLURM job is not cut to --cores), so a
    real run: it must stop before the first job."""
    def change(config):
        config["threads"] = 2

    result = snakemake("--profile", "profiles/local", "--configfile",
                       str(write_config(tmp_path, change)), "--cores", "1",
                       env={"KAVA_OUTPUT_PATH": str(tmp_path / "out")})
    assert result.returncode != 0
    assert ("kava: error: the config key threads (2) exceeds --cores 1 (profile or command "
            "line), which would cut it; lower threads or raise --cores") in result.output
    assert not (tmp_path / "out").exists()


def test_killed_run_recovers_as_the_readme_says(tmp_path):
    """kill -9 of the whole Snakemake process group while a train job runs; then the README's
    steps (--unlock, the same command) give the result of an uninterrupted run, bit for bit."""
    def longer(config):
        # Enough steps, checkpointed often, that the kill lands inside a train job.
        config["train"].update(steps=12)
        config["train_job"] = {"checkpoint_every": 2}

    configfile = write_config(tmp_path, longer)
    command = ["--profile", "profiles/local", "--configfile", str(configfile)]
    reference_env = {"KAVA_OUTPUT_PATH": str(tmp_path / "reference")}
    arms = ("ce", "kv")
    trained = [f"{tmp_path}/reference/smoke/train/{arm}/seed0/train.json" for arm in arms]
    reference = snakemake(*command, "--nolock", *trained, env=reference_env)
    assert reference.returncode == 0, reference.output[-3000:]

    env = {"KAVA_OUTPUT_PATH": str(tmp_path / "killed")}
    results = tmp_path / "killed" / "smoke"
    checkpoints = results / "scratch" / "checkpoints" / "train"
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    process = subprocess.Popen([sys.executable, "-m", "snakemake", *command], cwd=PROJECT,
                               env={**os.environ, "PATH": path, **env}, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 900
    while not list(checkpoints.glob("*/seed0/latest")):
        assert process.poll() is None and time.monotonic() < deadline, "no train checkpoint"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not all((results / "train" / arm / "seed0" / "train.json").exists() for arm in arms)

    refused = snakemake(*command, env=env)
    assert refused.returncode != 0 and "cannot be locked" in refused.output
    unlocked = snakemake(*command, "--unlock", env=env)
    assert unlocked.returncode == 0, unlocked.output[-3000:]
    rerun = snakemake(*command, env=env)
    assert rerun.returncode == 0, rerun.output[-3000:]

    assert (results / "report.html").exists()
    for arm in arms:
        for name in ("student/model.safetensors", "projector.safetensors"):
            done = results / "train" / arm / "seed0" / name
            assert done.read_bytes() == (tmp_path / "reference" / "smoke" / "train" / arm
                                         / "seed0" / name).read_bytes(), (arm, name)


def test_cka_maps_use_the_time_alignment_of_the_arms_that_read_them(tmp_path):
    """The CKA rule follows the cka arms' own time_alignment, not the base train section's; arms
    that disagree on it are refused, since the maps are computed once."""
    def arms(alignments):
        def change(config):
            config["train"]["time_alignment"] = "auto"
            config["arms"] = {"ce": {"kv_weight": 0}, **{
                f"cka{index}": {"layer_map": "cka", "time_alignment": alignment}
                for index, alignment in enumerate(alignments)}}
        return change

    def plan(alignments, name):
        folder = tmp_path / name
        folder.mkdir()
        return snakemake("-n", "--profile", "profiles/local", "--configfile",
                         str(write_config(folder, arms(alignments))), "--nolock",
                         env={"KAVA_OUTPUT_PATH": str(folder / "out")})

    result = plan(["interpolate"], "one")
    assert result.returncode == 0, result.output[-3000:]
    (cka,) = planned_jobs(result.stdout)["cka_layer_map"]
    assert "--time-alignment interpolate" in cka["shell"]
    result = plan(["interpolate", "causal"], "two")
    assert result.returncode != 0
    assert ("kava: error: the arms with layer_map cka use time_alignment causal and interpolate; "
            "the CKA maps are computed once, so give them one time_alignment") in result.output


@pytest.mark.parametrize("imported", ["before", "in_main", "never"])
def test_a_stage_runs_torch_on_its_threads_whenever_it_imports_it(imported):
    # The model cards and the report never import torch (two seconds a job); a stage that
    # imports it late must still get the threads Snakemake gave the job, not every core.
    program = (
        "import sys\n"
        "from kava.cli import run_stage, stage_parser\n"
        f"if {imported!r} == 'before': import torch\n"
        "def main(args):\n"
        f"    if {imported!r} != 'never': import torch; print(torch.get_num_threads())\n"
        "    print('torch' in sys.modules)\n"
        "run_stage(main, stage_parser('a stage'))\n")
    env = {key: value for key, value in os.environ.items() if not key.endswith("_NUM_THREADS")}
    result = subprocess.run([sys.executable, "-c", program, "--threads", "1"], cwd=PROJECT,
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.cpu_count() > 1  # else one thread would be the default, and this no test
    assert result.stdout.split() == (["False"] if imported == "never" else ["1", "True"])


def test_the_stages_without_a_model_never_import_torch():
    for stage in ("prepare", "report", "model_card"):
        result = subprocess.run([sys.executable, "-c", f"import sys, stages.{stage}; "
                                 "print('torch' in sys.modules)"], cwd=PROJECT,
                                capture_output=True, text=True)
        assert result.stdout.strip() == "False", (stage, result.stderr[-500:])
