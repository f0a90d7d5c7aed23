"""The model card (README.md) of a trained student, built with huggingface_hub's ModelCard: where
the student comes from, what taught it, on which data, with which config, and how it scored
against the control arm. It sits in a publishable folder beside the student's weights, so the
hub's own `hf upload` publishes both."""

import json
import os
import shutil
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from kava.errors import KavaError
from kava.io import atomic_path

DATASET = {"hub": "openai/gsm8k", "path": "gsm8k", "synthetic": "kava synthetic"}
# data.prompt_format, as the student was trained on it (kava.prompts).
PROMPTS = {"plain": "prompt format plain, template `{template!r}`",
           "chat": "prompt format chat: the student's own chat template"}


def _base_model(card, base_card):
    """The hub id the student was derived from where there is one, else its kava name."""
    origin = base_card or card
    return origin["source"].get("hf") or origin["name"]


def _ci(entry):
    low, high = entry["ci"]
    return f"{entry['mean']:.4f} [{low:.4f}, {high:.4f}]"


def _evaluation(arm, summary, dataset):
    """(EvalResults of the arm's accuracy and NLL, markdown table lines incl. the contrast)."""
    model = summary["models"].get(arm)
    if model is None:
        raise KavaError(f"summary.json has no model '{arm}': was the arm evaluated?")
    results = [EvalResult(task_type="text-generation", dataset_type=dataset, dataset_name=dataset,
                          dataset_split="test", metric_type=metric, metric_name=name,
                          metric_value=model[metric]["mean"])
               for metric, name in (("accuracy", "accuracy (answer after ####)"),
                                    ("nll", "answer NLL per token"))]
    lines = ["| metric | mean [95 % CI] | vs control (arm − control) [95 % CI] | p |",
             "|---|---|---|---|"]
    comparison = summary["comparisons"].get(arm)
    for metric in ("accuracy", "nll"):
        contrast = (f"{_ci(comparison[metric])} | {comparison[metric]['p_value']:.3g}"
                    if comparison else "— (this arm is the control or was not compared) | —")
        lines.append(f"| {metric} | {_ci(model[metric])} | {contrast} |")
    return results, lines


def build_card(arm, seed, train_info, student_card, base_card, teacher_cards, summary,
               prompt_format):
    """The ModelCard of one arm x seed's student (see the module docstring); `prompt_format`:
    data.prompt_format, the rendering the student was trained on."""
    data = train_info["data"]
    dataset = DATASET[data["source"]]
    results, eval_lines = _evaluation(arm, summary, dataset)
    base = _base_model(student_card, base_card)
    derive = student_card["source"].get("derive")
    data_card = ModelCardData(
        base_model=base, library_name="transformers", pipeline_tag="text-generation",
        datasets=[dataset] if data["source"] == "hub" else None,
        tags=["kava", "kv-distillation", f"arm-{arm}"],
        model_name=f"{student_card['name']}-{arm}-seed{seed}",
        eval_results=results,
        kava={"arm": arm, "seed": seed, "control": summary["control"],
              "student_init_sha256": student_card["weights_sha256"],
              "teachers": {c["name"]: c["weights_sha256"] for c in teacher_cards},
              "data_sha256": {split: info["sha256"] for split, info in data["splits"].items()}})
    derivation = (f"`{base}` cut to its layers keep_layers {derive['keep_layers']} (kava model "
                  f"`{base_card['name']}`, weights sha256 `{base_card['weights_sha256']}`)"
                  if derive else f"`{base}`")
    teacher_rows = [f"| {c['name']} | {json.dumps(c['source'])} | `{c['weights_sha256']}` |"
                    for c in teacher_cards]
    split_rows = [f"| {split} | {info['rows']} | `{info['sha256']}` |"
                  for split, info in data["splits"].items()]
    body = "\n".join([
        f"# {data_card.model_name}", "",
        f"Student `{student_card['name']}` distilled by kava from its teachers' KV caches, arm "
        f"`{arm}`, seed {seed}. Its initial weights are {derivation}.", "",
        "## Teachers", "", "| teacher | source | weights sha256 |", "|---|---|---|",
        *teacher_rows, "",
        "## Data", "", f"Source: {data['source']} ({data.get('path') or 'generated'}); "
        f"{PROMPTS[prompt_format].format(template=data['template'])}; rows hash over id, "
        "question and answer.", "",
        "| split | rows | sha256 |", "|---|---|---|", *split_rows, "",
        "## Training config of the arm", "", "```json",
        json.dumps(train_info["config"], indent=2, sort_keys=True), "```", "",
        f"## Evaluation ({dataset}, test split; control arm `{summary['control']}`)", "",
        "The arm's numbers pooled over all its seeds, this one among them; 95 % CIs by "
        "bootstrap over seeds and examples (kava report, eval/summary.json).", "", *eval_lines, "",
        "## Publishing", "",
        "This folder holds the weights, the tokenizer and this card. Publish it with the hub's "
        "own command, after `hf auth login`:", "",
        "```bash", f"hf upload <user>/<repo> results/<run>/train/{arm}/seed{seed}/hub .", "```",
        ""])
    return ModelCard(f"---\n{data_card.to_yaml()}\n---\n\n{body}")


def write_publishable(card, student_dir, out_dir):
    """`out_dir` := the student's files (hard links where the filesystem allows, else copies)
    and the card as README.md, renamed into place only when complete."""
    student_dir = Path(student_dir)
    if not (student_dir / "config.json").is_file():
        raise KavaError(f"student folder {student_dir} has no config.json: not a trained student")
    with atomic_path(out_dir, is_dir=True) as tmp:
        for file in student_dir.iterdir():
            # Not Snakemake's .snakemake_timestamp: a hard link would share it, and Snakemake
            # touching this folder's would then make the student look updated, redoing its
            # evaluation on the next run.
            if file.name.startswith("."):
                continue
            try:
                os.link(file, tmp / file.name)
            except OSError:
                shutil.copy2(file, tmp / file.name)
        card.save(tmp / "README.md")
