"""kava as a package and a reusable workflow: `snakemake --lint`, the workflow as a Snakemake
`module:` of another project, and the conda env tied to the requirement files."""

import hashlib
import re

from conftest import PROJECT
from test_workflow import snakemake

ENVS = PROJECT / "workflow" / "envs"


def test_lint_is_clean():
    result = snakemake("--lint", "--configfile", "config/config.yaml")
    assert result.returncode == 0 and "Congratulations" in result.output, result.output


def test_the_workflow_runs_as_a_module_of_another_project(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "Snakefile").write_text(
        f'configfile: "{PROJECT / "config" / "smoke.yaml"}"\n\n'
        f"module kava:\n"
        f'    snakefile: "{PROJECT / "workflow" / "Snakefile"}"\n'
        f"    config: config\n\n"
        f"use rule * from kava\n")
    env = {"KAVA_OUTPUT_PATH": str(tmp_path / "out")}
    # A job of the module runs its stage from the other project's folder: prepare (seconds)
    # really runs, so that the plan below reads its rows and expands the precompute shards.
    prepared = snakemake("--snakefile", str(project / "Snakefile"), "--directory", str(project),
                         "--cores", "1", "prepare", env=env)
    assert prepared.returncode == 0, prepared.output[-3000:]
    assert (tmp_path / "out" / "smoke" / "data" / "train.parquet").exists()
    planned = snakemake("--snakefile", str(project / "Snakefile"), "--directory", str(project),
                        "-n", "--cores", "1", env=env)
    assert planned.returncode == 0, planned.output[-3000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", planned.stdout, re.M))
    assert counts["precompute"] == "6" and counts["train"] == "2" and counts["report"] == "1"


def test_the_conda_env_changes_with_either_requirement_file():
    """Snakemake rebuilds a conda env when its file (or post-deploy script) changes, not when a
    requirement file it reads does: the env file carries their digests."""
    env_file = (ENVS / "kava.yaml").read_text()
    for name in ("requirements.txt", "requirements-nodeps.txt"):
        digest = hashlib.sha256((ENVS / name).read_bytes()).hexdigest()
        line = f"# sha256 {name}: {digest}"
        assert line in env_file, f"workflow/envs/kava.yaml: update the line to '{line}'"
