"""Odd environments a new user brings: paths with spaces and non-ASCII characters, settings a
profile could override, a run killed mid-way."""

import pytest

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
        config["train"] = {**config["train"], "steps": 4,
                           "arms": {"ce": {"kv_weight": 0}, "kv": {"layer_map": "cka"}}}

    configfile = write_config(root, variants) if root.mkdir(parents=True) is None else None
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
    for flag in ("--base-card", "--student-card", "--cka-maps"):
        assert f"{flag} '{results}/models/" in result.output or f"{flag} '{results}/layer_maps/" \
            in result.output, flag
