# Paths every rule agrees on. A rule's log and benchmark live beside the results of its run.


def card(model):
    return f"{RESULTS}/models/{model}.json"


def log_path(rule_name, key="{model}"):
    return f"{RESULTS}/logs/{rule_name}/{key}.log"


def benchmark_path(rule_name, key="{model}"):
    return f"{RESULTS}/benchmarks/{rule_name}/{key}.tsv"


def as_json(section):
    """A config section for a stage's command line; quoting is done by `{params.x:q}`."""
    return json.dumps(section, sort_keys=True)
