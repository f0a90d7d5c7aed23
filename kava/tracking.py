"""Live training curves (train_job.tracker): every metrics line of a train job, as the
tracker's scalars at its step, while the job runs.

- tensorboard: event files in the job's own folder (train/<arm>/seed<k>/tb/), so
  `tensorboard --logdir results/<run>/train` shows every arm x seed side by side, flushed
  every step.
- wandb: offline (WANDB_MODE=offline) unless the environment sets WANDB_MODE; files in the
  same folder.
- trackio: its local store (TRACKIO_DIR) unless the environment names a Space
  (TRACKIO_SPACE_ID).
- none: nothing.

A resumed job starts from its checkpoint's metrics lines, not from what an interrupted attempt
logged (it may have logged steps after the checkpoint, or lost unflushed ones to a kill -9):
TensorBoard drops every earlier event (purge_step 1) and the checkpoint's lines are logged again;
wandb and trackio start a new run with those lines.

wandb and trackio are not kava dependencies: they are imported only when chosen.
"""

import importlib
import json
import os
from pathlib import Path

from kava.errors import KavaError

LIBRARIES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "trackio": "trackio"}
PROJECT = "kava"


class Tracker:
    """One train job's tracker: `start` once the resume point is known, then `log` each metrics
    line; closed on leaving the `with` block. Opening it imports the library, so a missing one
    stops the job before its setup."""

    def __init__(self, kind, folder, name, config):
        self.kind, self.folder, self.name, self.config = kind, Path(folder), name, config
        self.library = _import(kind) if kind != "none" else None
        self.run = None

    def start(self, metrics_path):
        """Open the run and log the lines so far (`metrics_path`: the checkpoint's, or empty)."""
        if self.library is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.kind == "tensorboard":
            self.run = self.library.SummaryWriter(str(self.folder), purge_step=1)
        elif self.kind == "wandb":
            os.environ.setdefault("WANDB_MODE", "offline")
            self.run = self.library.init(project=PROJECT, name=self.name, config=self.config,
                                         dir=str(self.folder))
        else:
            self.run = self.library.init(project=PROJECT, name=self.name, config=self.config)
        for line in Path(metrics_path).read_text().splitlines():
            self.log(json.loads(line))

    def log(self, line):
        """A metrics line ({"step": n, name: number, ...}) as scalars at step n."""
        if self.run is None:
            return
        scalars = {key: value for key, value in line.items() if key != "step"}
        if self.kind == "tensorboard":
            for key, value in scalars.items():
                self.run.add_scalar(key, value, line["step"])
            self.run.flush()  # live: TensorBoard sees each step as it ends
        else:
            self.run.log(scalars, step=line["step"])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.run is None:
            return
        if self.kind == "tensorboard":
            self.run.close()
        else:
            self.run.finish()


def _import(kind):
    try:
        return importlib.import_module(LIBRARIES[kind])
    except ImportError:
        package = "tensorboard" if kind == "tensorboard" else kind
        raise KavaError(f"train_job.tracker is {kind}, but its package {package} is not "
                        f"installed: pip install {package}, or set train_job.tracker: none") from None
