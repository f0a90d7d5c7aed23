"""The report's inputs, read from the run's files: EVALS, METRICS and FACTS (shapes in
kava.report's docstring), each unreadable file refused naming it."""

import csv
import json
from pathlib import Path

from kava.errors import KavaError


def read_benchmark(path):
    """Rows of a Snakemake benchmark TSV (columns `s h:m:s max_rss max_vms max_uss max_pss io_in
    io_out mean_load cpu_time`, memory in MB) as dicts: numbers as floats, anything else (`NA`, `-`)
    as None, `h:m:s` as text. One row per repeat of the job."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = [c for c in ("s", "max_rss") if c not in (reader.fieldnames or [])]
        if missing:
            raise KavaError(f"benchmark file {path}: missing column(s) {missing}")
        rows = []
        for row in reader:
            parsed = {}
            for key, value in row.items():
                try:
                    parsed[key] = value if key == "h:m:s" else float(value)
                except ValueError:
                    parsed[key] = None
            rows.append(parsed)
    return rows


def _read_json(path, what):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise KavaError(f"{what} {path}: unreadable ({type(err).__name__})") from None


def _eval_file(path):
    record = _read_json(path, "evaluation")
    examples = record.get("per_example", {}).get("id") if isinstance(record, dict) else None
    if not examples:
        raise KavaError(f"evaluation {path}: no evaluated examples (empty predictions)")
    return record


def load_evals(paths):
    """EVALS from the evaluate stage's files: {"init": path, "teachers": {name: path},
    "arms": {arm: {seed: path}}}."""
    return {"init": _eval_file(paths["init"]),
            "teachers": {name: _eval_file(path) for name, path in paths["teachers"].items()},
            "arms": {arm: {seed: _eval_file(path) for seed, path in runs.items()}
                     for arm, runs in paths["arms"].items()}}


def load_metrics(paths):
    """METRICS from {arm: {seed: metrics.jsonl path}}."""
    metrics = {}
    for arm, runs in paths.items():
        metrics[arm] = {}
        for seed, path in runs.items():
            try:
                lines = Path(path).read_text().splitlines()
                metrics[arm][seed] = [json.loads(line) for line in lines if line.strip()]
            except (OSError, ValueError) as err:
                raise KavaError(f"training metrics {path}: unreadable ({type(err).__name__})"
                                ) from None
    return metrics


def _flatten(mapping, prefix=""):
    """{"device": {"name": x}} -> {"device.name": x}: one table row per leaf."""
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _kv_storage(manifests):
    """Per teacher, what its stored KV costs, summed over its manifests (splits)."""
    by_teacher = {}
    for manifest in manifests:
        by_teacher.setdefault(manifest["teacher"]["name"], []).append(manifest)
    storage = {}
    for teacher, found in by_teacher.items():
        first = found[0]
        heads, head_dim = first["kv_shape"]
        tokens = sum(m["tokens"] for m in found)
        stored = sum(m["bytes"] for m in found)
        # What the same K and V would take as raw fp32, without any file format around them.
        fp32 = 2 * len(first["layers"]) * heads * head_dim * 4
        storage[teacher] = {
            "dtype": first["dtype"], "key_space": first["key_space"],
            "layers stored": len(first["layers"]), "KV heads × head_dim": f"{heads} × {head_dim}",
            "splits": ", ".join(f"{m['split']} {m['examples']} ex" for m in found),
            "tokens": tokens, "MB": round(stored / 2**20, 2),
            "bytes/token": round(stored / tokens, 1), "raw fp32 bytes/token": fp32,
            "stored / fp32": round(stored / tokens / fp32, 3),
            "truncated": sum(m["truncated"] for m in found),
            "skipped": sum(m["skipped"] for m in found)}
    return storage


def train_facts(infos):
    """From {arm: {seed: train.json}}: tokens_without_target {arm: {teacher: [fraction per
    seed]}}, and chosen_steps {arm: {seed: {"best_step", "validation_nll"}}} when a run chose its
    weights on the validation rows (train.json's best_step; validation: [{"step", "nll"}]), and
    teacher_weighting {arm: {seed: {"steps", "updates"}}} of runs whose teacher weights followed
    the validation rows (train.json's teacher_weighting)."""
    facts = {"tokens_without_target": {arm: {} for arm in infos}}
    chosen, weighting = {}, {}
    for arm, runs in infos.items():
        for seed, info in seeded(runs).items():
            for teacher, teacher_info in info.get("teachers", {}).items():
                facts["tokens_without_target"][arm].setdefault(teacher, []).append(
                    teacher_info["tokens_without_target"])
            if info.get("best_step") is not None:
                curve = {row.get("step"): row.get("nll") for row in info.get("validation") or []
                         if isinstance(row, dict)}
                chosen.setdefault(arm, {})[seed] = {"best_step": info["best_step"],
                                                    "validation_nll": curve.get(info["best_step"])}
            if info.get("teacher_weighting"):
                weighting.setdefault(arm, {})[seed] = {"steps": info["steps"],
                                                       "updates": info["teacher_weighting"]}
    if chosen:
        facts["chosen_steps"] = chosen
    if weighting:
        facts["teacher_weighting"] = weighting
    return facts


def load_facts(env=None, dims=None, data_info=None, manifests=(), benchmarks_dir=None,
               evaluation=None, train_infos=None, harness=None):
    """FACTS (module docstring) from files: env.json, {model: dims JSON}, data/data.json, KV
    manifests, the folder of Snakemake benchmark TSVs (`<rule>/<job>.tsv`), the evaluation
    settings (a dict), {arm: {seed: train.json}} (train_facts) and {model:
    eval/lm_eval/<model>.json}. Anything not given is left out and shows as n/a."""
    facts = {}
    if env:
        facts["env"] = _flatten(_read_json(env, "environment"))
    if dims:
        facts["dims"] = {name: _read_json(path, "dims") for name, path in dims.items()}
    if data_info:
        info = _read_json(data_info, "data info")
        # The culprit of every skipped row belongs in data.json, not in a report table.
        for split in info.get("splits", {}).values():
            split.pop("skipped_rows", None)
        facts["data"] = _flatten(info)
    if manifests:
        facts["kv_storage"] = _kv_storage([_read_json(path, "KV manifest") for path in manifests])
    if benchmarks_dir:
        facts["benchmarks"] = {f"{path.parent.name}/{path.stem}": read_benchmark(path)
                               for path in sorted(Path(benchmarks_dir).glob("*/*.tsv"))}
    if evaluation:
        facts["evaluation"] = _flatten(evaluation)
    if train_infos:
        facts.update(train_facts({arm: {seed: _read_json(path, "train summary")
                                         for seed, path in runs.items()}
                                   for arm, runs in train_infos.items()}))
    if harness:
        facts["harness"] = {name: _read_json(path, "lm_eval scores")["tasks"]
                            for name, path in harness.items()}
    return facts


def seeded(runs):
    """{seed: value} with integer seeds in order; JSON turns the seed keys into strings."""
    try:
        return dict(sorted((int(seed), value) for seed, value in runs.items()))
    except ValueError:
        raise KavaError(f"seed keys must be integers, got {sorted(map(str, runs))}") from None
