"""profiles/slurm on a real SLURM: the single node tests/slurm/start-local-slurm.sh starts on this
machine (munge, MariaDB + slurmdbd, slurmctld, slurmd; a `gpu` gres; accounting on), driven by
snakemake-executor-plugin-slurm exactly as on a cluster, with profiles/slurm-small fitting the
resources to the node. If the cluster cannot start, these tests fail and say why.

The tests share one run (the smoke config) and go in file order: the end-to-end run first, then
a failed job rerun alone, then a train job interrupted by SIGTERM, by a requeue and by the
time-limit warning. `make test` starts the cluster first; `pytest -m "not slurm"` leaves them out.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import PROJECT

# A cluster run is minutes of queueing and polling on top of the work: more than the default 900 s.
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(3600)]

START = PROJECT / "tests" / "slurm" / "start-local-slurm.sh"
# The plugin's status checks start after 40 s and back off to 3 min by default: minutes of
# idling for jobs of seconds. The test polls sooner; nothing else differs from a user's run.
FAST_POLLING = ("--slurm-init-seconds-before-status-checks", "2",
                "--seconds-between-status-checks", "2")
GPU_RULES = {"probe", "dims", "kv_basis", "precompute", "cka_layer_map", "train", "evaluate"}
# The config's threads in these runs (probe asks for 1): one, so that the two-core node runs
# two jobs at once.
THREADS = 1


@pytest.fixture(scope="module")
def cluster():
    started = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=1800)
    if started.returncode != 0:
        pytest.fail(f"the local SLURM did not start: {started.stderr.strip() or started.stdout.strip()}")


@pytest.fixture(scope="module")
def run(cluster, tmp_path_factory):
    """Where the shared run writes, and the environment its commands need."""
    root = tmp_path_factory.mktemp("slurm")
    env = {**os.environ,
           # Jobs run `python -m stages...` with the submitting environment (sbatch --export=ALL).
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "KAVA_OUTPUT_PATH": str(root / "out"), "KAVA_SCRATCH": str(root / "scratch"),
           "KAVA_SLURM_ACCOUNT": "kava", "KAVA_SLURM_PARTITION": "kava"}
    return {"root": root, "env": env, "results": root / "out" / "smoke",
            "scratch": root / "scratch" / "smoke", "timings": {}}


def snakemake_command(run, *args, profiles=("profiles/slurm", "profiles/slurm-small"),
                      configfile="config/smoke.yaml"):
    profile_args = [arg for profile in profiles for arg in ("--profile", str(profile))]
    # --nolock: the outputs are in a temporary folder, so no user's run can collide with them.
    return [sys.executable, "-m", "snakemake", *profile_args, "--configfile", str(configfile),
            "--config", f"threads={THREADS}", "--nolock", "--slurm-keep-successful-logs",
            *FAST_POLLING, *args]


def snakemake(run, *args, **kwargs):
    result = subprocess.run(snakemake_command(run, *args, **kwargs), cwd=PROJECT, env=run["env"],
                            capture_output=True, text=True, timeout=1800)
    result.output = result.stdout + result.stderr
    return result


def sacct(output):
    """The jobs of the Snakemake run that printed `output` (its SLURM run ID is the name of every
    job it submits): one dict per job (its allocation, not its steps), oldest first, with `rule`
    read from the plugin's comment."""
    fields = ["JobID", "JobName", "Comment", "State", "Elapsed", "AllocCPUS", "AllocTRES"]
    name = re.search(r"SLURM run ID: (\S+)", output).group(1)
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-D", "-S", "now-1days", "-E", "now",
                          "--name", name, "-o", ",".join(fields)],
                         capture_output=True, text=True, check=True).stdout
    jobs = [dict(zip(fields, line.split("|"))) for line in out.splitlines()]
    for job in jobs:
        job["rule"] = re.match(r"rule_([a-z_]+?)(_wildcards_|$)", job["Comment"]).group(1)
    return jobs


def format_sacct(jobs):
    return "\n".join(f"{j['JobID']:>6}  {j['rule']:<14} {j['State']:<11} {j['Elapsed']}  "
                     f"{j['AllocTRES']}" for j in jobs)


def slurm_log(job):
    """The plugin's log of a job: the Snakemake run inside it, with the stage's command line."""
    logs = list((PROJECT / ".snakemake" / "slurm_logs").glob(f"rule_{job['rule']}/**/{job['JobID']}.log"))
    assert len(logs) == 1, f"no single SLURM log for job {job['JobID']}: {logs}"
    return logs[0].read_text()


def weights(train_dir):
    return {**load_file(train_dir / "student" / "model.safetensors"),
            **{f"projector.{k}": v for k, v in load_file(train_dir / "projector.safetensors").items()}}


def same_weights(a, b):
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def wait_for(condition, what, timeout, proc=None):
    deadline = time.time() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, f"snakemake ended before {what}"
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.2)


def running_train_job():
    """The id of the running train job, from squeue (sacct has no comment before a job ends)."""
    out = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i|%k"], capture_output=True,
                         text=True, check=True).stdout
    ids = [line.split("|")[0] for line in out.splitlines() if line.split("|")[1].startswith("rule_train")]
    return ids[-1] if ids else None


def test_bad_input_stops_before_any_submission(run):
    """profiles/slurm alone asks for more memory than this node has; no account is set."""
    env = {k: v for k, v in run["env"].items() if k != "KAVA_SLURM_ACCOUNT"}
    result = subprocess.run(snakemake_command(run, profiles=("profiles/slurm",)), cwd=PROJECT,
                            env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "KAVA_SLURM_ACCOUNT is not set: export it" in output
    node_mb = int(subprocess.run(["sinfo", "-h", "-o", "%m"], capture_output=True, text=True,
                                 check=True).stdout.split()[0].rstrip("+"))
    assert (f"rule train asks for 64000 MB; the largest node of any partition has {node_mb} MB"
            in output) == (node_mb < 64000)
    assert "submitted with SLURM jobid" not in output


def test_smoke_runs_through_slurm_to_a_report(run):
    start = time.time()
    result = snakemake(run)
    run["timings"]["smoke"] = time.time() - start
    assert result.returncode == 0, result.output[-4000:]
    jobs = sacct(result.output)
    print(f"\nsmoke on SLURM: {run['timings']['smoke']:.0f} s\n{format_sacct(jobs)}")
    results = run["results"]
    run["reference"] = weights(results / "train" / "kv" / "seed0")
    assert (results / "report.html").stat().st_size > 0

    # Every job COMPLETED, and every rule of the pipeline ran as a SLURM job but the JSON
    # merges, which run in the Snakemake process itself (localrules).
    assert {j["State"] for j in jobs} == {"COMPLETED"}, format_sacct(jobs)
    # kv_basis: the default store (pca) fits each teacher's basis on its device first.
    assert {j["rule"] for j in jobs} == {"materialize", "prepare", "dims", "probe", "kv_basis",
                                         "precompute", "train", "evaluate"}
    assert "localrule kv_manifest:" in result.output and "localrule report:" in result.output
    for job in jobs:
        # GPU rules got the gres, CPU rules none.
        has_gpu = "gres/gpu=1" in job["AllocTRES"]
        assert has_gpu == (job["rule"] in GPU_RULES), job
        # The stage ran with as many threads as the job got CPUs, which is the config's threads.
        ran_with = {int(n) for n in re.findall(r"python -m stages\.\w+ --threads (\d+)", slurm_log(job))}
        assert ran_with == {int(job["AllocCPUS"])}, job
        assert int(job["AllocCPUS"]) == (1 if job["rule"] == "probe" else THREADS), job

    # The paths the jobs used are the ones the submitter planned: scratch on KAVA_SCRATCH.
    env = json.loads((results / "env.json").read_text())
    assert env["scheduler"]["type"] == "slurm" and env["cpus"] == 1
    assert env["paths"]["scratch"] == str(run["scratch"])
    assert list((run["scratch"] / "kv").glob("*/*/shard-*.safetensors"))
    assert not (results / "scratch").exists()


def test_a_failed_job_is_rerun_alone(run):
    results = run["results"]
    # The report reads every benchmark: a malformed one makes its job fail.
    bad = results / "benchmarks" / "report" / "broken.tsv"
    bad.write_text("s\n1\n")
    (results / "report.html").unlink()
    # The report is a localrule: it fails and reruns in the Snakemake process, and nothing else
    # is submitted again.
    failed = snakemake(run, "--retries", "0")
    assert failed.returncode != 0 and "Error in rule report" in failed.output
    assert sacct(failed.output) == []
    bad.unlink()
    again = snakemake(run, "--retries", "0")
    assert again.returncode == 0, again.output[-4000:]
    assert sacct(again.output) == [] and (results / "report.html").stat().st_size > 0


def interrupt_train(run, interrupt):
    """Rebuild train/kv/seed0 through SLURM; once its first checkpoint exists, interrupt its
    job with interrupt(job_id). Returns the jobs, the train summary and the stage's log."""
    train_dir = run["results"] / "train" / "kv" / "seed0"
    shutil.rmtree(train_dir)
    log = run["results"] / "logs" / "train" / "kv-seed0.log"
    log.unlink()
    checkpoints = run["scratch"] / "checkpoints" / "train" / "kv" / "seed0"
    start = time.time()
    proc = subprocess.Popen(snakemake_command(run, str(train_dir / "train.json")), cwd=PROJECT,
                            env=run["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        wait_for(lambda: (checkpoints / "latest").exists(), "train checkpoint", 900, proc)
        job_id = running_train_job()
        assert job_id, "the train job is not RUNNING in sacct while it writes checkpoints"
        interrupt(job_id)
        output, _ = proc.communicate(timeout=1200)
    finally:
        proc.kill()
    run["timings"][interrupt.__name__] = time.time() - start
    assert proc.returncode == 0, output[-4000:]
    return sacct(output), json.loads((train_dir / "train.json").read_text()), log.read_text()


def test_sigterm_resumes_from_checkpoint(run):
    def sigterm(job_id):  # what SLURM sends at a time limit or a preemption
        subprocess.run(["scancel", "--signal=TERM", "--full", job_id], check=True)

    jobs, summary, log = interrupt_train(run, sigterm)
    print(f"\nSIGTERM test: {run['timings']['sigterm']:.0f} s\n{format_sacct(jobs)}")
    assert [j["State"] for j in jobs] == ["FAILED", "COMPLETED"], format_sacct(jobs)
    assert summary["resumed_from_step"] > 0 and "resumed from" in log
    assert same_weights(weights(run["results"] / "train" / "kv" / "seed0"), run["reference"])


def test_requeue_resumes_from_checkpoint(run):
    def requeue(job_id):
        subprocess.run(["scontrol", "requeue", job_id], check=True)

    jobs, summary, log = interrupt_train(run, requeue)
    print(f"\nrequeue test: {run['timings']['requeue']:.0f} s\n{format_sacct(jobs)}")
    # Requeued, the job keeps its id: sacct -D lists its first run, then the one that completed.
    assert [j["State"] for j in jobs] == ["REQUEUED", "COMPLETED"], format_sacct(jobs)
    assert jobs[0]["JobID"] == jobs[1]["JobID"]
    assert summary["resumed_from_step"] > 0 and "resumed from" in log
    assert same_weights(weights(run["results"] / "train" / "kv" / "seed0"), run["reference"])


def test_time_limit_warning_reaches_the_stage(run, tmp_path):
    """profiles/slurm asks SLURM for SIGUSR1 10 minutes before a train job's time limit. Once a
    train job too long to finish is under way, its limit is moved to 11 minutes from now: the
    warning must reach the stage, which checkpoints and exits before the limit (FAILED, not
    TIMEOUT). Moving the limit, rather than submitting a short one, keeps the warning from
    arriving while the job is still starting on a busy machine."""
    config = yaml.safe_load((PROJECT / "config" / "smoke.yaml").read_text())
    # No periodic checkpoint: the one found afterwards can only be the warning's.
    config["train"].update(steps=1_000_000)
    config["train_job"] = {"checkpoint_every": 1_000_000}
    (tmp_path / "long.yaml").write_text(yaml.safe_dump(config))
    train_dir = run["results"] / "train" / "kv" / "seed0"
    shutil.rmtree(train_dir, ignore_errors=True)
    checkpoints = run["scratch"] / "checkpoints" / "train" / "kv" / "seed0"
    live = checkpoints / "metrics.live.jsonl"
    start = time.time()
    proc = subprocess.Popen(snakemake_command(run, str(train_dir / "train.json"), "--retries", "0",
                                              configfile=tmp_path / "long.yaml"),
                            cwd=PROJECT, env=run["env"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: live.exists() and live.stat().st_size > 0, "train step", 900, proc)
        job_id = running_train_job()
        ran = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%M"], capture_output=True,
                             text=True, check=True).stdout.strip()
        seconds = sum(int(part) * 60 ** k for k, part in enumerate(reversed(re.split("[:-]", ran))))
        limit = (seconds + 660) // 60 + 1  # minutes: the warning falls due within ~2 minutes
        subprocess.run(["scontrol", "update", f"JobId={job_id}", f"TimeLimit={limit}"], check=True)
        output, _ = proc.communicate(timeout=900)
    finally:
        proc.kill()
    jobs = sacct(output)
    print(f"\nwarning test: {time.time() - start:.0f} s\n{format_sacct(jobs)}")
    assert proc.returncode != 0
    assert [(j["rule"], j["State"]) for j in jobs] == [("train", "FAILED")], format_sacct(jobs)
    log = (run["results"] / "logs" / "train" / "kv-seed0.log").read_text()
    stopped = re.search(r"stopped by SIGUSR1 at step (\d+); checkpoint saved", log)
    assert stopped, log[-3000:]
    assert (checkpoints / "latest").read_text().strip() == f"step-{int(stopped.group(1)):08d}"
