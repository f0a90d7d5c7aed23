"""lm-evaluation-harness (Gao et al., 2024, "The Language Model Evaluation Harness") on one
model folder, offline: the harness's own gsm8k task read from the run's prepared rows, and its
own metrics (exact match after the strict-match and flexible-extract filters)."""

import os

import yaml

from kava.errors import KavaError


def task_config(task_yaml, data_files):
    """The task YAML with its dataset pointed at local files ({split: path})."""
    for split, path in data_files.items():
        if not os.path.isfile(path):
            raise KavaError(f"lm_eval: the {split} rows {path} do not exist")
    with open(task_yaml) as handle:
        config = yaml.safe_load(handle)
    return {**config, "dataset_kwargs": {"data_files": dict(data_files)}}


def run_harness(model_dir, task, device, dtype, batch_size, max_new_tokens):
    """The harness's scores of `task` (a task config dict) on the model in `model_dir`, under
    its own keys ("exact_match,strict-match", "exact_match_stderr,strict-match", the same for
    flexible-extract), and n_examples."""
    # The data and model are local; nothing may reach for the hub, now or in a job without net.
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    model = HFLM(pretrained=str(model_dir), device=str(device), dtype=dtype,
                 batch_size=batch_size)
    results = simple_evaluate(model=model, tasks=[task],
                              gen_kwargs={"max_gen_toks": max_new_tokens}, log_samples=False,
                              bootstrap_iters=1000)
    if results is None or task["task"] not in results["results"]:
        raise KavaError(f"lm_eval returned no results for task '{task['task']}' on {model_dir}")
    scores = results["results"][task["task"]]
    return {"n_examples": scores["sample_len"],
            **{key: float(value) for key, value in scores.items() if key.startswith("exact_match")}}
