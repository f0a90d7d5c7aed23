"""Checks on the config that a JSON schema cannot express: names that refer to each other."""

from kava.errors import KavaError


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
