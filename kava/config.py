"""Checks on the config that a JSON schema cannot express (names that refer to each other), and
the schema's own lists of allowed values, so that code checks against what the schema says."""

import functools
from pathlib import Path

import yaml

from kava.errors import KavaError

SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


@functools.cache
def load_schema():
    """The config schema (workflow/schemas/config.schema.yaml) as a dict."""
    return yaml.safe_load(SCHEMA.read_text())


def schema_defaults(section):
    """{key: default} of a config section as the schema defines it."""
    return {key: spec["default"] for key, spec in
            load_schema()["properties"][section]["properties"].items() if "default" in spec}


def _properties(spec):
    """(name, spec) of every property in a schema, at any depth."""
    for name, child in spec.get("properties", {}).items():
        yield name, child
        yield from _properties(child)


def schema_enum(key):
    """The values the schema allows for the config key `key` (its enum), as a tuple. Keys are
    found by name in any section; every key of that name must allow the same values."""
    enums = {tuple(spec["enum"]) for name, spec in _properties(load_schema())
             if name == key and "enum" in spec}
    if len(enums) != 1:
        found = "no enum" if not enums else "different enums in different sections"
        raise KavaError(f"{SCHEMA}: config key '{key}' has {found}; expected one")
    return enums.pop()


def used_models(config):
    """Every model the pipeline needs: teachers, the student, and the bases they derive from."""
    models = config["models"]
    needed = [*config["teachers"], config["student"]]
    for name in needed:
        if name not in models:
            raise KavaError(f"config: '{name}' is named as a teacher or student but is not "
                            f"defined under models (defined: {', '.join(models)})")
    pending = list(needed)
    while pending:
        base = models[pending.pop()].get("derive", {}).get("base")
        if base is None or base in needed:
            continue
        if base not in models:
            raise KavaError(f"config: models.*.derive.base '{base}' is not defined under models")
        needed.append(base)
        pending.append(base)
    return needed


def arm_configs(config):
    """{arm: its train config}: the train section with the arm's overrides on top. An arm sets
    keys of the train section only."""
    train_keys = load_schema()["properties"]["train"]["properties"]
    arms = {}
    for arm, overrides in config["arms"].items():
        unknown = [key for key in overrides if key not in train_keys]
        if unknown:
            raise KavaError(f"config arms.{arm}: '{unknown[0]}' was unexpected: an arm sets keys "
                            f"of the train section only{_home(unknown[0])}")
        arms[arm] = {**config["train"], **overrides}
    return arms


def kd_teachers(config):
    """Teachers whose logits some arm distils (kd_weight > 0; an arm's teachers, null = all),
    sorted. Refused when precompute.logits_k stores none."""
    names = set()
    for arm, train in arm_configs(config).items():
        if train["kd_weight"] > 0:
            if not config["precompute"]["logits_k"]:
                raise KavaError(f"config arms.{arm}: kd_weight {train['kd_weight']} distils "
                                f"stored logits, but precompute.logits_k is 0 (stores none)")
            names.update(train["teachers"] or config["teachers"])
    return sorted(names)


def teacher_kv_losses(train, teachers):
    """{teacher: its KV loss} for the arm's `teachers` (names): train.teacher_kv_loss where it
    names the teacher, else train.kv_loss. Refused when teacher_kv_loss names a teacher the arm
    does not learn from: its loss would silently never run."""
    stray = [name for name in train["teacher_kv_loss"] if name not in teachers]
    if stray:
        raise KavaError(f"train.teacher_kv_loss names '{stray[0]}', which is not a teacher this "
                        f"arm learns from ({', '.join(teachers)})")
    return {name: train["teacher_kv_loss"].get(name, train["kv_loss"]) for name in teachers}


def _home(key):
    """Where the config key `key` lives, if it is one outside the train section, as a hint."""
    sections = load_schema()["properties"]
    homes = [key] if key in sections else []
    homes += [f"{name}.{key}" for name, spec in sections.items()
              if key in spec.get("properties", {})]
    return f" (set {' or '.join(homes)} for the whole run)" if homes else ""


def evaluated_teachers(config):
    """The teachers eval.teachers asks to evaluate (true: all of them)."""
    named = config["eval"]["teachers"]
    named = config["teachers"] if named is True else named or []
    for teacher in named:
        if teacher not in config["teachers"]:
            raise KavaError(f"config: eval.teachers names '{teacher}', which is not a teacher "
                            f"({', '.join(config['teachers'])})")
    return list(named)


def check_contrasts(config, arms):
    """report.contrasts compares arms of this run only: a name that is none would otherwise
    fail the report, after every training job has run."""
    for pair in config["report"]["contrasts"]:
        for name in pair:
            if name not in arms:
                raise KavaError(f"config: report.contrasts names arm '{name}', which this run "
                                f"does not have ({', '.join(arms)})")


def check_kv_exclude_layers(config, arms):
    """train.kv_exclude_layers names student layers: where the config itself gives the student's
    depth (derive.keep_layers, or a random model's num_hidden_layers), a layer beyond it is
    refused now rather than in every train job (which checks it against the student's dims)."""
    spec = config["models"][config["student"]]
    depth = (len(spec["derive"]["keep_layers"]) if "derive" in spec
             else spec.get("random", {}).get("num_hidden_layers"))
    for arm, train in arms.items():
        beyond = [layer for layer in train["kv_exclude_layers"] if depth is not None
                  and layer >= depth]
        if beyond:
            raise KavaError(f"config arms.{arm}: kv_exclude_layers names layer {beyond[0]}, but "
                            f"student {config['student']} has {depth} layers (0-{depth - 1})")


def check_controls(arms):
    """The kv_target controls replace the teacher's KV store (kava.targets), which also holds
    the logits KD reads; minilm maps only the student's last layer, so kv_exclude_layers has
    nothing to leave out but all of it."""
    for arm, train in arms.items():
        if train["kv_target"] != "teacher" and train["kd_weight"] > 0:
            raise KavaError(f"config arms.{arm}: kv_target {train['kv_target']} is a control of "
                            f"the KV loss and serves no teacher logits; set kd_weight 0")
        if train["layer_map"] == "minilm" and train["kv_exclude_layers"]:
            raise KavaError(f"config arms.{arm}: layer_map minilm maps only the student's last "
                            f"layer; kv_exclude_layers would leave out that or nothing")


def check_teacher_kv_losses(config, arms):
    """train.teacher_kv_loss names teachers of the arm: checked when the workflow is parsed
    rather than in every train job."""
    for arm, train in arms.items():
        try:
            teacher_kv_losses(train, train["teachers"] or config["teachers"])
        except KavaError as error:
            raise KavaError(f"config arms.{arm}: {error}") from None


def check_validation_weighting(config, arms):
    """teacher_weighting validation sets the teacher weights on the validation rows: an arm
    asking for it in a run without any would otherwise fail at its first train step."""
    for arm, train in arms.items():
        if train["teacher_weighting"] == "validation" and not config["data"]["validation_size"]:
            raise KavaError(f"config arms.{arm}: teacher_weighting validation weighs the teachers "
                            f"on the validation rows, but data.validation_size is 0")


def cross_checked(config):
    """Every check across config keys, made at once when the workflow is parsed (before any job):
    {"models": used_models, "arms": arm_configs, "eval_teachers": evaluated_teachers}."""
    arms = arm_configs(config)
    check_contrasts(config, arms)
    models = used_models(config)
    check_kv_exclude_layers(config, arms)
    check_controls(arms)
    check_validation_weighting(config, arms)
    check_teacher_kv_losses(config, arms)
    return {"models": models, "arms": arms,
            "eval_teachers": evaluated_teachers(config)}
