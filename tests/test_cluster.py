"""Checks made before a SLURM run submits anything (kava/cluster.py). The sinfo reading is
checked against a real SLURM in test_slurm.py."""

import subprocess

from kava.cluster import partitions_from_sinfo, scratch_problem, submission_problems

SET = {"KAVA_SLURM_ACCOUNT": "lab", "KAVA_SLURM_PARTITION": "gpu"}
PARTITIONS = {"cpu": {"cpus": 64, "mem_mb": 256000}, "gpu": {"cpus": 16, "mem_mb": 128000}}


def test_a_good_run_has_no_problem(tmp_path):
    requests = {"train": {"cpus": 64, "mem_mb": 256000}, "report": {"cpus": 1, "mem_mb": 0}}
    assert submission_problems(requests, tmp_path / "scratch", SET, PARTITIONS) == []
    assert (tmp_path / "scratch").is_dir()


def test_each_unset_variable_is_named(tmp_path):
    problems = submission_problems({}, tmp_path, {"KAVA_SLURM_PARTITION": "gpu"}, None)
    assert problems == ["KAVA_SLURM_ACCOUNT is not set: export it (profiles/slurm submits with it)"]
    problems = submission_problems({}, tmp_path, {"KAVA_SLURM_ACCOUNT": ""}, None)
    assert [p.split()[0] for p in problems] == ["KAVA_SLURM_ACCOUNT", "KAVA_SLURM_PARTITION"]


def test_unwritable_scratch_is_named(tmp_path):
    # A regular file where a folder should be: unwritable even for root, who ignores modes.
    blocker = tmp_path / "file"
    blocker.write_text("")
    problems = submission_problems({}, blocker / "scratch", SET, None)
    assert len(problems) == 1 and problems[0].startswith(f"scratch {blocker / 'scratch'} is not writable")
    assert scratch_problem(tmp_path) is None


def test_rules_larger_than_any_partition_are_named(tmp_path):
    requests = {"train": {"cpus": 65, "mem_mb": 64000}, "evaluate": {"cpus": 8, "mem_mb": 300000},
                "report": {"cpus": 1, "mem_mb": 4000}}
    problems = submission_problems(requests, tmp_path, SET, PARTITIONS)
    assert problems == [
        "rule evaluate asks for 300000 MB; the largest node of any partition has 256000 MB "
        "(lower its mem_mb in the profile, e.g. --profile profiles/slurm-small)",
        "rule train asks for 65 CPUs; the largest node of any partition has 64 CPUs "
        "(lower `threads` in the config)"]
    # Without sinfo (not on a SLURM machine) the sizes are not checked.
    assert submission_problems(requests, tmp_path, SET, None) == []


def test_sinfo_lines_become_the_largest_node_per_partition(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/sinfo")
    out = "gpu* 16 128000\ngpu 32 64000\ncpu 64+ 256000+\n"

    def run(cmd, **kwargs):
        assert cmd[0] == "sinfo"
        return subprocess.CompletedProcess(cmd, 0, stdout=out)

    assert partitions_from_sinfo(run) == {"gpu": {"cpus": 32, "mem_mb": 128000},
                                          "cpu": {"cpus": 64, "mem_mb": 256000}}
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert partitions_from_sinfo(run) is None
