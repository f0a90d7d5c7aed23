"""The run report: summary.json, a self-contained report.html (PNG plots inlined as base64) and a
report.md with the same tables and sentences, from plain dicts the report stage loads from JSON.
In four steps, a module each: load (the run's files into the dicts below), summary (the
statistics of summary.json, kava.stats), plots (PNG figures) and render (the HTML
and Markdown documents); studies renders the README's study tables from the committed
studies/<name>/summary.json.

Input shapes (every function below documents which it takes):

EVALS, the evaluation records (each EVAL is what kava.evaluate.eval_record returns):
    {"init": EVAL,
     "teachers": {"<teacher>": EVAL},
     "arms": {"<arm>": {<seed>: EVAL}}}            # seed keys: ints (or "0", "1" from JSON)
    EVAL = {"n", "accuracy", "nll", "kv_cosine": None | {"overall": float,
            "per_teacher": {teacher: float}, "per_layer": {teacher: [float per student layer]}},
            "kv_r2": None | the same shape (held-out probe R² over the per-head-mean baseline),
            "per_example": {"id": [...], "correct": [bool], "nll": [float], ...}}

METRICS, the training logs (metrics.jsonl rows):
    {"<arm>": {<seed>: [{"step", "loss", "ce", "kv/<teacher>", "cos/<teacher>", "lr",
                         "tokens_per_s", "elapsed"}, ...]}}     # kv/ and cos/ keys optional

FACTS, what the run was (every key optional; a missing one shows as "n/a"; load_facts reads
them from the run's files):
    {"env": {...env.json...},
     "dims": {"<model>": {...dims/<model>.json: architecture, num_layers, num_kv_heads, head_dim,
                          kv_dim_total, layers: [{"kind", "window"?}], mismatches: [str]}},
     "data": {"source": str, "rows_hash": str, ...},
     "kv_storage": {"<teacher>": {"bytes_per_token", "dtype", "key_space", ...}},
     "benchmarks": {"<job>": [row, ...]},          # rows as read_benchmark returns them
     "tokens_without_target": {"<arm>": {"<teacher>": [fraction per seed]}},  # train.json
     "chosen_steps": {"<arm>": {<seed>: {"best_step", "validation_nll"}}},  # train.json, when
                                                   # weights were chosen on validation rows
     "teacher_weighting": {"<arm>": {<seed>: {"steps": int, "updates": [{"step", "teachers":
                           {"<teacher>": {"cosine", "weight"}}}]}}},  # train.json, under
                                                   # teacher_weighting validation
     "evaluation": {...}}                          # the evaluation settings
"""


from kava.report.load import load_evals, load_facts, load_metrics
from kava.report.render import render_report
from kava.report.summary import build_summary

__all__ = ["build_summary", "load_evals", "load_facts", "load_metrics", "render_report"]
