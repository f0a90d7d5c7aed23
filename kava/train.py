"""Train a student and its KV projectors from cached teacher KV, as a recipe (after
torchtune's): setup() builds a TrainRun from named builders (setup_data, setup_model,
setup_optimizer, setup_scheduler, mixed precision); train_step(run, batch) is one optimiser step,
shared by the loop, bench/train_step.py, bench/storage.py and the tests; train() reads top to
bottom: setup, fit (the loop below), build_summary, publish.

    for step in steps:                     # one optimiser step = effective_batch examples
        batch = step_batches(run, step)    # each GPU (rank) takes its slice of the step's examples
        train_step(run, batch):
            for micro_batch in batch:
                loss = Distiller(micro_batch)  # CE + KV + KD, weighted by tokens of the step
                backward                       # DDP averages gradients at the last micro-batch
            clip, AdamW step, LR step
        teacher_weighting validation, at step 1 and every teacher_weighting_every steps: each
            teacher's weight from its gradient's alignment with the validation answer CE
        every eval_every steps and at the last: validation answer NLL, keep the best step's weights
        log one metrics line (metrics file and train_job.tracker); every checkpoint_every steps
        (and on SIGTERM/SIGUSR1/SIGINT) save a checkpoint
    publish the best validation step's weights (early stopping), else the last step's

The examples of step k are positions [(k-1)·B, k·B) of an endless stream whose order depends on
the seed only (kava.batching.example_order), so every arm sees the same data in the same order,
and a resumed run picks up exactly where the checkpoint left off. No teacher runs here: its
KV comes from the precomputed stores.

Checkpoints live outside the stage's declared outputs (Snakemake deletes incomplete outputs
before a rerun): `<checkpoint_dir>/step-<n>/` holds model.safetensors (student, projectors,
teacher weights), best.safetensors (the best validation step's, once there is one), state.pt
(optimiser, scheduler, grad scaler, RNG, step, the validation curve, the run's identity; loaded
with weights_only=True) and the metrics so far. The outputs are written once, at the
end, each atomically; then the checkpoints are removed.
"""

import functools
import hashlib
import json
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, load_model, save_file, save_model
from tqdm import tqdm

from kava.batching import (collate, example_order, kd_pairs, pad_id, shared_key_space,
                           store_positions, student_example, teacher_inputs, time_alignment)
from kava.config import teacher_kv_losses
from kava.distill import (Distiller, build_projectors, build_teacher_mixture,
                          fit_ridge_projectors, gradient_agreement, teacher_kv_std,
                          validation_weighting)
from kava.environment import DTYPES, job_device
from kava.errors import KavaError
from kava.evaluate import tokenizer_fingerprint
from kava.io import atomic_path, write_json
from kava.kvstore import open_teacher_store
from kava.layer_maps import resolve
from kava.losses import kd_kind
from kava.models import load_model as load_hf_model
from kava.models import load_tokenizer
from kava.projector import save_projectors
from kava.targets import self_targets, token_mean_targets
from kava.tracking import Tracker
from kava.validation import BestStep, validation_batches, validation_nll

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
BEST_WEIGHTS = "best.safetensors"  # a checkpoint's copy of the best validation step's weights


class Interrupted(KavaError):
    """A stop signal arrived; the checkpoint is written and a rerun resumes from it."""


class NonFinite(KavaError):
    """A step's loss or gradient norm is not finite; the step was not applied."""


# ---- setup --------------------------------------------------------------------------------

def init_distributed():
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group:
    nccl on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = job_device(int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def resolve_precision(setting, env_precision):
    """train.precision: auto takes the probe's (env.json) choice for this machine."""
    precision = env_precision if setting == "auto" else setting
    if precision not in DTYPES:
        raise KavaError(f"train.precision '{precision}' is not one of auto, "
                        f"{', '.join(DTYPES)}")
    return precision


def mixed_precision(precision, device):
    """(autocast context, gradient scaler) of a resolved precision: no autocast in fp32, loss
    scaling in fp16 only (bf16 has fp32's exponent range)."""
    autocast = torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")
    return autocast, torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def micro_batch_size(cfg, env, world):
    """Examples per forward on one process; auto takes env.json's recommendation."""
    if cfg["effective_batch"] % world:
        raise KavaError(f"train.effective_batch {cfg['effective_batch']} does not split evenly "
                        f"over {world} processes")
    micro = cfg["micro_batch"]
    if micro == "auto":
        recommended = (env or {}).get("recommended") or {}
        if "micro_batch" not in recommended:
            raise KavaError("train.micro_batch is auto but env.json has no recommended "
                            "micro_batch; set train.micro_batch")
        micro = recommended["micro_batch"]
    return max(1, min(int(micro), cfg["effective_batch"] // world))


def manifest_identity(manifest):
    """What a checkpoint must match to be resumed: the shards' contents and what they hold."""
    return {
        "shards": [shard["sha256"] for shard in manifest["shards"]],
        "teacher": manifest.get("teacher"),
        **{key: manifest.get(key) for key in ("dtype", "key_space", "layers")},
    }


def fingerprint(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


@dataclass
class TrainData:
    """Everything a step needs to build its batches: the student's examples, each teacher's
    store and where each example's KV sits in it, and how it is read."""
    tokenizer: object
    students: list            # kava.batching.student_example per train row
    stores: dict              # {teacher: KVStore}
    positions: dict           # {teacher: [store index of the KV each example reads, or None]}
    layer_maps: dict          # {teacher: [teacher layer per student layer]}
    layer_map_reasons: dict   # {teacher: why that map}
    alignment: dict           # {teacher: the time alignment it is read with}
    key_space: str
    ce_valid: list            # answer tokens per example
    kv_valid: dict            # {teacher: aligned student tokens per example}
    kv_lost: dict             # {teacher: fraction of student tokens no teacher token covers}
    partner: list = None      # kv_target shuffled: the example whose KV each example reads
    held_out: object = None   # diagnose_every: a batch of train rows kept out of training
    # {KD teacher: its KD loss kind} and {KD teacher: positions KD distils per example}; {} in
    # an arm without KD.
    kd_kinds: dict = field(default_factory=dict)
    kd_valid: dict = field(default_factory=dict)
    # teacher_weighting validation: (validation-row batches, their answer tokens); else None.
    validation: tuple = None

    @property
    def used_layers(self):
        return {name: sorted({layer for layer in m if layer is not None})
                for name, m in self.layer_maps.items()}


def arm_teachers(cfg, teachers):
    """The run's teachers that this arm learns from (train.teachers; null: all)."""
    if cfg["teachers"] is None:
        return teachers
    names = [t["card"]["name"] for t in teachers]
    unknown = [name for name in cfg["teachers"] if name not in names]
    if unknown:
        raise KavaError(f"train.teachers names {unknown[0]}, which is not a teacher of this run "
                        f"({', '.join(names)})")
    return [t for t in teachers if t["card"]["name"] in cfg["teachers"]]


def derangement(n, seed):
    """A seeded permutation with no fixed point (one cycle through a random order): example i
    reads the KV of partner[i] ≠ i."""
    if n < 2:
        raise KavaError("kv_target: shuffled needs at least 2 train examples to pair each with another")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator).tolist()
    partner = [0] * n
    for j, i in enumerate(order):
        partner[i] = order[(j + 1) % n]
    return partner


def setup_data(cfg, seed, student_card, student_dims, teachers, rows, max_length, cka_maps=None,
               device="cpu"):
    """The student's tokens and labels for every row, each teacher's store (or the control
    targets of kv_target self / token_mean in its place), the layer maps and the time
    alignment; checks that they fit together. device: where kv_target self runs the student."""
    tokenizer = load_tokenizer(student_card["dir"])
    students = [student_example(tokenizer, row, max_length) for row in rows]
    held_out = None
    if cfg["diagnose_every"]:
        # The gradient-alignment diagnostic's reference: rows training never sees.
        if len(students) <= cfg["diagnose_examples"]:
            raise KavaError(f"train.diagnose_examples {cfg['diagnose_examples']} leaves no train "
                            f"example of {len(students)} to train on")
        held_out = collate(students[-cfg["diagnose_examples"]:], {}, pad_id(tokenizer),
                           cfg["time_alignment"])
        students = students[:-cfg["diagnose_examples"]]
    stores = {t["card"]["name"]: open_teacher_store(t["manifest"], t["card"]["name"],
                                                    t["card"]["weights_sha256"])
              for t in teachers}
    key_space = shared_key_space(stores)
    partner = derangement(len(students), seed) if cfg["kv_target"] == "shuffled" else None
    positions = {}
    for name, store in stores.items():
        own = store_positions(store, [s["id"] for s in students], name)
        positions[name] = own if partner is None else [own[j] for j in partner]
    alignment = {name: "position" if partner is not None else cfg["time_alignment"]
                 for name in stores}
    for name, loss in teacher_kv_losses(cfg, list(stores)).items():
        if loss == "relation" and partner is None:
            if alignment[name] != "auto":
                raise KavaError(f"train.time_alignment {alignment[name]} with kv_loss relation "
                                f"(teacher {name}): the relation loss reads a teacher at the "
                                f"token boundaries both tokenisations share; set time_alignment "
                                f"auto")
            alignment[name] = "boundary"

    layer_maps, reasons = teacher_layer_maps(cfg, student_card, teachers, stores, cka_maps)
    if cfg["kv_target"] == "token_mean":
        stores = {name: token_mean_targets(store, sorted({layer for layer in layer_maps[name]
                                                          if layer is not None}))
                  for name, store in stores.items()}
    elif cfg["kv_target"] == "self":
        student = load_hf_model(student_card, torch.float32, device).eval()
        stores = self_targets(stores, student, students, key_space, pad_id(tokenizer),
                              cfg["effective_batch"])
        positions = {name: list(range(len(students))) for name in stores}
        layer_maps = {name: list(range(student_card["num_layers"])) for name in stores}
        reasons = {name: "kv_target self: each student layer against its own initial KV"
                   for name in stores}

    # Valid (aligned, non-pad) student tokens per teacher and example: the KV loss of a step is
    # a mean over the step's valid tokens, whichever process and micro-batch holds them.
    kv_valid, kv_lost = {}, {}
    for name, store in stores.items():
        counts = []
        for s, i in zip(students, positions[name]):
            if i is None:
                counts.append(0)
                continue
            weights, valid = time_alignment(s, store.example(i), alignment[name])
            if key_space == "post_rope" and weights is not None and partner is None:
                raise KavaError(f"teacher {name} tokenises the text differently from the "
                                f"student, and its store holds post_rope keys: averaging keys "
                                f"across tokens mixes rotary phases; precompute it with "
                                f"key_space pre_rope")
            counts.append(int(valid.sum()))
        kv_valid[name] = counts
        tokens = sum(len(s["input_ids"]) for s, i in zip(students, positions[name])
                     if i is not None)
        kv_lost[name] = (tokens - sum(counts)) / tokens if tokens else 0.0
    ce_valid = [int(s["labels"][1:].ne(-100).sum()) for s in students]
    if cfg["ce_weight"] > 0 and not any(ce_valid):
        raise KavaError(f"no train example keeps an answer token within max_length "
                        f"{max_length} student tokens: the answer CE would be empty; raise "
                        f"data.max_length")
    return TrainData(tokenizer, students, stores, positions, layer_maps, reasons, alignment,
                     key_space, ce_valid, kv_valid, kv_lost, partner, held_out)


def teacher_layer_maps(cfg, student_card, teachers, stores, cka_maps):
    """({teacher: its layer per student layer}, {teacher: why}), each store checked to hold
    the KV shape of its teacher's dims."""
    layer_maps, reasons = {}, {}
    for teacher in teachers:
        name, dims = teacher["card"]["name"], teacher["dims"]
        layer_maps[name], reasons[name] = resolve(cfg, student_card, dims, stores[name].layers,
                                                  cka_maps)
        if tuple(stores[name].kv_shape) != (dims["num_kv_heads"], dims["head_dim"]):
            raise KavaError(f"{teacher['manifest']}: stored KV of {name} is "
                            f"{tuple(stores[name].kv_shape)} (heads, head_dim), its dims JSON "
                            f"says {(dims['num_kv_heads'], dims['head_dim'])}")
    return layer_maps, reasons


def kd_positions(cfg, data, teachers):
    """({teacher: KD kind}, {teacher: positions KD distils per example}) for a KD arm (kd_weight
    > 0: each of its teachers), ({}, {}) otherwise. The kind is train.kd_loss resolved by
    whether the teacher's tokenizer is the student's (kava.losses.kd_kind); kl reads stored
    logits position by position, so such a teacher must have stored exactly the student's
    tokens."""
    if cfg["kd_weight"] <= 0:
        return {}, {}
    student_tokenizer = tokenizer_fingerprint(data.tokenizer)
    kinds, counts = {}, {}
    for teacher in teachers:
        name = teacher["card"]["name"]
        store = data.stores[name]
        if not store.logits:
            raise KavaError(f"train.kd_weight {cfg['kd_weight']} distils the logits of teacher "
                            f"{name}, but its store ({store.path}) holds none (precompute.logits_k "
                            f"0)")
        same = tokenizer_fingerprint(load_tokenizer(teacher["card"]["dir"])) == student_tokenizer
        kinds[name] = kd_kind(cfg["kd_loss"], same, name)
        counts[name] = []
        for s, i in zip(data.students, data.positions[name]):
            stored = None if i is None else store.example(i)
            if stored is not None and (stored["id"] != s["id"] or kinds[name] == "kl" and
                                       not torch.equal(s["input_ids"], stored["input_ids"])):
                raise KavaError(f"teacher {name}: stored tokens of example {s['id']} differ from "
                                f"the student's, so its stored logits cannot be distilled")
            counts[name].append(0 if stored is None
                                else int(kd_pairs(s, stored, kinds[name])[1].sum()))
    return kinds, counts


def setup_model(cfg, data, student_card, student_dims, device):
    """The Distiller: the student from its card, one projector per teacher (ridge ones fitted
    in closed form on train KV before any step), the teacher weights and the teachers' fixed KV
    scales."""
    student = load_hf_model(student_card, torch.float32, device).train()
    # The targets' shape: the teacher's, or the student's own under kv_target self.
    teacher_shapes = {name: store.kv_shape for name, store in data.stores.items()}
    student_shape = (student_dims["num_kv_heads"], student_dims["head_dim"])
    projectors = build_projectors(data.layer_maps, teacher_shapes, student_shape, cfg)
    weights = build_teacher_mixture(student_dims["num_layers"], list(data.layer_maps),
                                    cfg["teacher_weighting"], cfg["teacher_weights"])
    stds = {name: teacher_kv_std(data.stores[name], data.used_layers[name],
                                 cfg["teacher_stats_examples"]) for name in data.stores}
    # A student layer without a teacher layer (layer_map minilm) is never scored: scale 1.
    teacher_std = torch.tensor([[stds[name].get(layer, (1.0, 1.0))
                                 for layer in data.layer_maps[name]] for name in data.stores])
    distiller = Distiller(student, projectors, weights, teacher_std, cfg, data.key_space)
    distiller.to(device)
    examples = list(range(min(len(data.students), cfg["projector_fit_examples"])))
    fit_batches = (collate([data.students[i] for i in examples[j:j + cfg["effective_batch"]]],
                           teacher_inputs(data.stores, data.positions,
                                          examples[j:j + cfg["effective_batch"]],
                                          data.used_layers),
                           pad_id(data.tokenizer), data.alignment).to(device)
                   for j in range(0, len(examples), cfg["effective_batch"]))
    fit_ridge_projectors(distiller, fit_batches, cfg["projector_ridge"])
    return distiller


def setup_optimizer(cfg, distiller):
    """AdamW (fused), two LR groups (student, projectors + teacher weights); no weight decay on
    biases, norms and other 1-D parameters."""
    groups = []
    for lr, params in ((cfg["lr"], distiller.student.parameters()),
                       (cfg["projector_lr"], [*distiller.projectors.parameters(),
                                              *distiller.teacher_mixture.parameters()])):
        params = [p for p in params if p.requires_grad]
        groups.append({"params": [p for p in params if p.ndim >= 2], "lr": lr,
                       "weight_decay": cfg["weight_decay"]})
        groups.append({"params": [p for p in params if p.ndim < 2], "lr": lr,
                       "weight_decay": 0.0})
    # fused: one kernel over all tensors, ~5x faster than the per-tensor loop on CPU.
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=tuple(cfg["adam_betas"]),
                             fused=True)


def lr_factor(step, warmup, steps):
    """LR multiplier of the optimiser step after `step` earlier ones: linear warmup that starts
    above zero (the first step learns at 1/(warmup+1) of the peak, none is wasted at lr 0), then
    cosine decay toward 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def setup_scheduler(cfg, optimizer):
    warmup = round(cfg["warmup_ratio"] * cfg["steps"])
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, warmup=warmup, steps=cfg["steps"]))


def distribute(cfg, distiller, world, device):
    """The distiller as the loop runs it: wrapped in DDP when several processes train."""
    if world == 1:
        return distiller
    from torch.nn.parallel import DistributedDataParallel

    # Projectors get no gradient in a CE-only arm without probe_projector, or frozen, nor
    # those of the layers kv_exclude_layers leaves out or a layer map (minilm) leaves unmapped.
    unused = ((cfg["kv_weight"] == 0 and not cfg["probe_projector"]) or cfg["freeze_projector"]
              or bool(cfg["kv_exclude_layers"]) or cfg["layer_map"] == "minilm")
    return DistributedDataParallel(distiller, find_unused_parameters=unused,
                                   device_ids=[device.index] if device.type == "cuda" else None)


@dataclass
class TrainRun:
    """One arm x seed, set up: what the loop steps and the benches time."""
    cfg: dict                 # the arm's train config
    seed: int
    teachers: list            # the arm's teachers: [{"card", "dims", "manifest"}]
    data: TrainData
    distiller: Distiller      # student, projectors, teacher weights, the teachers' KV scales
    model: torch.nn.Module    # the distiller as run: DDP-wrapped over several processes
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    autocast: torch.autocast
    scaler: torch.amp.GradScaler
    precision: str            # resolved: fp32, bf16 or fp16
    micro_batch: int          # examples per forward on this process
    device: torch.device
    rank: int
    world: int
    validation_rows: list     # data.validation_size rows ({id, prompt, answer}); [] for none
    best: BestStep            # the validation curve and the weights of its best step
    # teacher_weighting validation: [{"step", "teachers": {name: {"cosine", "weight"}}}]
    teacher_weighting: list = field(default_factory=list)


def setup(cfg, *, seed, student_card, student_dims, teachers, rows, max_length, env, device,
          cka_maps=None, rank=0, world=1, validation_rows=()):
    """Everything one arm x seed trains with: the arm's teachers and their data, the Distiller,
    the optimiser, the LR schedule and mixed precision. env: env.json (precision and micro-batch
    when the config says auto)."""
    overlap = {r["id"] for r in validation_rows} & {r["id"] for r in rows}
    if overlap:
        raise KavaError(f"validation row {min(overlap)} is also a train row: the step chosen "
                        f"on it would be chosen on training data")
    precision = resolve_precision(cfg["precision"], env["precision"])
    micro = micro_batch_size(cfg, env, world)
    torch.manual_seed(seed)  # projector init; the student starts from its card's weights
    teachers = arm_teachers(cfg, teachers)
    data = setup_data(cfg, seed, student_card, student_dims, teachers, rows, max_length, cka_maps,
                      device)
    data.kd_kinds, data.kd_valid = kd_positions(cfg, data, teachers)
    if cfg["teacher_weighting"] == "validation":
        data.validation = validation_batches(data.tokenizer, validation_rows, max_length, micro)
    distiller = setup_model(cfg, data, student_card, student_dims, device)
    model = distribute(cfg, distiller, world, device)
    optimizer = setup_optimizer(cfg, distiller)
    scheduler = setup_scheduler(cfg, optimizer)
    autocast, scaler = mixed_precision(precision, device)
    return TrainRun(cfg, seed, teachers, data, distiller, model, optimizer, scheduler, autocast,
                    scaler, precision, micro, device, rank, world, list(validation_rows),
                    BestStep())


# ---- checkpoints --------------------------------------------------------------------------

def latest_checkpoint(checkpoint_dir):
    pointer = Path(checkpoint_dir) / "latest"
    if not pointer.is_file():
        return None
    path = Path(checkpoint_dir) / pointer.read_text().strip()
    return path if (path / "state.pt").is_file() else None


def save_checkpoint(checkpoint_dir, step, run, identity, elapsed, metrics_path):
    """Write step-<n>/ atomically, point `latest` at it, then drop older ones."""
    checkpoint_dir = Path(checkpoint_dir)
    name = f"step-{step:08d}"
    with atomic_path(checkpoint_dir / name, is_dir=True) as tmp:
        save_model(run.distiller, str(tmp / "model.safetensors"))
        if run.best.best_weights is not None:
            save_file(run.best.best_weights, str(tmp / BEST_WEIGHTS))
        torch.save({
            "step": step,
            "elapsed": elapsed,
            "identity": identity,
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "validation": run.best.summary(),
            "teacher_weighting": run.teacher_weighting,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }, tmp / "state.pt")
        shutil.copyfile(metrics_path, tmp / "metrics.jsonl")
    with atomic_path(checkpoint_dir / "latest") as tmp:
        tmp.write_text(name + "\n")
    for old in checkpoint_dir.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return checkpoint_dir / name


def resume(checkpoint_dir, identity, run, metrics_path, log):
    """Load the latest checkpoint into the run: (step, elapsed); (0, 0.0) for a fresh start.

    A checkpoint of this same run made against other KV shards is refused; one made under
    another config, student, data or teacher set is another run's, and is set aside."""
    path = latest_checkpoint(checkpoint_dir)
    if path is None:
        return 0, 0.0
    state = torch.load(path / "state.pt", weights_only=True)
    saved = state["identity"]
    same_run = ({k: v for k, v in saved.items() if k != "manifests"}
                == {k: v for k, v in identity.items() if k != "manifests"}
                and set(saved["manifests"]) == set(identity["manifests"]))
    if not same_run:
        log(f"checkpoint {path} belongs to another config, student, data or teacher set; "
            f"starting afresh")
        return 0, 0.0
    for teacher, manifest in identity["manifests"].items():
        if saved["manifests"][teacher] != manifest:
            raise KavaError(
                f"checkpoint {path} was made against other KV shards of teacher {teacher} "
                f"(its manifest changed since); refusing to resume. Delete {checkpoint_dir} "
                f"to train from the start on the new shards")
    load_model(run.distiller, str(path / "model.safetensors"))
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    best = path / BEST_WEIGHTS
    run.best.restore(state["validation"], load_file(str(best)) if best.is_file() else None)
    run.teacher_weighting[:] = state["teacher_weighting"]
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    if run.rank == 0:
        shutil.copyfile(path / "metrics.jsonl", metrics_path)
    log(f"resumed from {path} (step {state['step']})")
    return state["step"], state["elapsed"]


class StopSignals:
    """While active, SIGTERM / SIGUSR1 / SIGINT (what SLURM and a terminal send before
    stopping a job) only record that a stop was asked for; the loop checkpoints at the next
    step boundary and exits non-zero."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __enter__(self):
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---- one step -----------------------------------------------------------------------------

@dataclass
class StepBatch:
    """One optimiser step's examples on this process, and the denominators of its losses,
    counted over all processes."""
    micro_batches: list       # kava.batching collated batches, micro_batch examples each
    ce_items: int             # answer tokens of the whole step
    kv_items: dict            # {teacher: valid KV tokens of the whole step}
    kd_items: dict = field(default_factory=dict)  # {KD teacher: distilled positions, whole step}


def step_batches(run, step):
    """This process's micro-batches of optimiser step `step` (1-based)."""
    data, effective = run.data, run.cfg["effective_batch"]
    batch_ids = example_order(len(data.students), run.seed, (step - 1) * effective, effective)
    per_rank = effective // run.world
    mine = batch_ids[run.rank * per_rank:(run.rank + 1) * per_rank]
    chunks = [mine[i:i + run.micro_batch] for i in range(0, len(mine), run.micro_batch)]
    micro_batches = [collate([data.students[i] for i in chunk],
                             teacher_inputs(data.stores, data.positions, chunk, data.used_layers),
                             pad_id(data.tokenizer), data.alignment, data.kd_kinds)
                     for chunk in chunks]
    return StepBatch(micro_batches, sum(data.ce_valid[i] for i in batch_ids),
                     {name: sum(data.kv_valid[name][i] for i in batch_ids)
                      for name in data.stores},
                     {name: sum(counts[i] for i in batch_ids)
                      for name, counts in data.kd_valid.items()})


def train_step(run, batch, stop=None):
    """One optimiser step over this process's micro-batches: the summed statistics, clipping,
    the AdamW and LR steps. Returns the statistics and whether any process received a stop
    signal. Raises NonFinite, before updating, if the loss or (without fp16 loss scaling) the
    gradient norm is not finite."""
    sums = _forward_backward(run, batch)
    stopping = _reduce(sums, stop, run.world, run.device)
    sums = {k: v.cpu() for k, v in sums.items()}
    ce, l2, kd = float(sums["ce"]), float(sums["l2"]), float(sums["kd"])
    loss = run.distiller.objective(ce, sums["kv"].float().to(run.device), l2, kd)
    if not math.isfinite(loss) or not math.isfinite(ce):
        run.optimizer.zero_grad(set_to_none=True)
        raise NonFinite(f"loss is {loss} (ce {ce})")
    grad_norms = _clip_gradients(run)
    lrs = run.scheduler.get_last_lr()
    weights = run.distiller.teacher_mixture.weights().detach().cpu()  # before the update
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "ce": ce, "kd": kd, "l2": l2, "kv": sums["kv"], "cos": sums["cos"],
            "tokens": float(sums["tokens"]), "lrs": lrs, "weights": weights,
            "grad_norms": grad_norms}, stopping


def _forward_backward(run, batch):
    """Forward and backward of each micro-batch (DDP synchronises gradients at the last); the
    step's statistics summed over micro-batches, in float64."""
    sums = None
    for j, micro in enumerate(batch.micro_batches):
        last = j == len(batch.micro_batches) - 1
        with (run.model.no_sync() if run.world > 1 and not last else nullcontext()):
            with run.autocast:
                loss, stats = run.model(micro.to(run.device), batch.ce_items, batch.kv_items,
                                        len(batch.micro_batches), batch.kd_items)
            # DDP averages gradients over processes; each process's loss is its share of the
            # step's sum, so scale back up to get the sum.
            run.scaler.scale(loss * run.world).backward()
        stats = {k: v.double() for k, v in stats.items()}
        sums = stats if sums is None else {k: sums[k] + v for k, v in stats.items()}
    return sums


def _clip_gradients(run):
    """(student, projector) gradient norms before clipping each group to max_grad_norm."""
    run.scaler.unscale_(run.optimizer)
    distiller = run.distiller
    # Clipped apart: the projectors' gradients must not rescale the student's step (in the CE
    # baseline they would otherwise change it).
    projector_params = [*distiller.projectors.parameters(),
                        *distiller.teacher_mixture.parameters()]
    grad_norm, projector_grad_norm = (
        float(torch.nn.utils.clip_grad_norm_(params, distiller.loss_cfg["max_grad_norm"]))
        for params in (distiller.student.parameters(), projector_params))
    if not math.isfinite(grad_norm) and not run.scaler.is_enabled():
        run.optimizer.zero_grad(set_to_none=True)
        raise NonFinite(f"gradient norm is {grad_norm}")
    return grad_norm, projector_grad_norm


# ---- the run ------------------------------------------------------------------------------

def train(cfg, *, job, arm, seed, student_card, student_dims, teachers, rows, data_info, env,
          max_length, outputs, checkpoint_dir, tracker_dir, cka_maps=None, validation_rows=(),
          log=print):
    """Train one arm x seed; rank 0 writes `outputs` (student dir, projector, metrics,
    summary paths) and the live curves (train_job.tracker) to `tracker_dir`. cfg: the arm's
    train config, what is computed (and the checkpoints' identity); job: the train_job section,
    how the job runs. teachers: [{"card", "dims", "manifest"}] in config order. validation_rows:
    the rows each eval_every steps scores; the published weights are those of the best-scoring
    step (none: the last step's). Returns the summary (train.json) on rank 0, None elsewhere."""
    rank, world, device = init_distributed()
    try:
        started = time.perf_counter()
        checkpoint_dir = Path(checkpoint_dir)
        # Opened before the setup's minutes: a tracker whose library is missing stops the job.
        with Tracker(job["tracker"] if rank == 0 else "none", tracker_dir, f"{arm}-seed{seed}",
                     cfg) as tracker:
            run = setup(cfg, seed=seed, student_card=student_card, student_dims=student_dims,
                        teachers=teachers, rows=rows, max_length=max_length, env=env,
                        device=device, cka_maps=cka_maps, rank=rank, world=world,
                        validation_rows=validation_rows)
            identity = run_identity(run, arm, student_card, data_info)
            resumed_at, metrics_path = fit(run, arm, job, identity, checkpoint_dir, tracker, log)
        summary = None
        if rank == 0:
            summary = build_summary(run, arm, job, identity, data_info, student_card,
                                    resumed_at, time.perf_counter() - started)
            warn_uncovered_tokens(run.data, job, log)
            if run.best.best_weights is not None:  # early stopping: publish the best step
                run.distiller.load_state_dict(run.best.best_weights)
            _publish(run, metrics_path, summary, outputs)
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        _barrier(world)
        return summary
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def run_identity(run, arm, student_card, data_info):
    """What a checkpoint must match to be resumed: this config, arm, seed, student, data and
    the teachers' stores."""
    return {
        "config": fingerprint(run.cfg),
        "arm": arm, "seed": run.seed, "student": student_card["weights_sha256"],
        "data": data_info["splits"]["train"]["sha256"],
        "manifests": {name: manifest_identity(store.manifest)
                      for name, store in run.data.stores.items()},
    }


def fit(run, arm, job, identity, checkpoint_dir, tracker, log):
    """Step from the latest checkpoint of this run (or the start) to the last step: one metrics
    line per step (to the live metrics file and the tracker), a checkpoint every
    checkpoint_every steps and at a stop signal. Returns (step resumed from, metrics file)."""
    cfg, rank = run.cfg, run.rank
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = checkpoint_dir / "metrics.live.jsonl"
    step, elapsed_before = resume(checkpoint_dir, identity, run, metrics_path, log)
    if step == 0 and rank == 0:
        metrics_path.write_text("")
    _barrier(run.world)
    tracker.start(metrics_path)
    resumed_at, last_checkpoint, t0 = step, step or None, time.perf_counter()
    progress = tqdm(total=cfg["steps"], initial=step, desc=f"train {arm} seed{run.seed}",
                    unit="step", disable=rank != 0)
    with progress, StopSignals() as stop:
        while step < cfg["steps"]:
            step += 1
            step_start = time.perf_counter()
            # One optimiser step over this step's examples (diagnosed first, every so often).
            batch = step_batches(run, step)
            agreement = {}
            if rank == 0 and cfg["diagnose_every"] and step % cfg["diagnose_every"] == 0:
                agreement = diagnose(run.distiller, batch.micro_batches[0], run.data.held_out)
            weigh_teachers(run, step, batch)
            try:
                result, stopping = train_step(run, batch, stop)
            except NonFinite as err:
                raise KavaError(f"arm {arm} seed {run.seed}: {err} at step {step}; stopped. "
                                + _kept(checkpoint_dir, last_checkpoint)) from None
            # Score it on the validation rows (every eval_every steps), then log it.
            validation = validate(run, step)
            now = time.perf_counter()
            if rank == 0:
                line = _metrics_line(step, result, list(run.data.stores), now - step_start,
                                     elapsed_before + now - t0,
                                     cfg["teacher_weighting"] != "fixed",
                                     {**agreement, **validation})
                with open(metrics_path, "a") as handle:
                    handle.write(json.dumps(line) + "\n")
                tracker.log(line)
                progress.set_postfix(loss=f"{result['loss']:.3f}", ce=f"{result['ce']:.3f}")
                progress.update(1)
            # Checkpoint it (the last step needs none: the outputs come next), or stop.
            if stopping or (step % job["checkpoint_every"] == 0 and step < cfg["steps"]):
                if rank == 0:
                    save_checkpoint(checkpoint_dir, step, run, identity,
                                    elapsed_before + now - t0, metrics_path)
                last_checkpoint = step
                _barrier(run.world)
            if stopping:
                raise Interrupted(f"arm {arm} seed {run.seed}: stopped by "
                                  f"{stop.received or 'a peer'} at step {step}; checkpoint saved "
                                  f"in {checkpoint_dir}; rerun to resume")
    return resumed_at, metrics_path


def validate(run, step):
    """On rank 0, every train.eval_every steps and at the last: the student's validation answer
    NLL, recorded in run.best, as {"validation_nll": nll}; {} otherwise or without rows."""
    every = run.cfg["eval_every"]
    if (run.rank != 0 or not run.validation_rows or not every
            or (step % every and step < run.cfg["steps"])):
        return {}
    nll = validation_nll(run.distiller.student, run.data.tokenizer, run.validation_rows,
                         run.micro_batch, run.autocast)
    run.best.record(step, nll, run.distiller)
    return {"validation_nll": nll}


def weigh_teachers(run, step, batch):
    """teacher_weighting validation, at step 1 and every teacher_weighting_every steps after:
    rank 0 sets the teacher weights from its micro-batches of this step against the validation
    rows (kava.distill.validation_weighting) and records them in run.teacher_weighting; every
    process then takes rank 0's weights."""
    cfg = run.cfg
    if cfg["teacher_weighting"] != "validation" or (step - 1) % cfg["teacher_weighting_every"]:
        return
    if run.rank == 0:
        batches, ce_items = run.data.validation
        readings = validation_weighting(
            run.distiller, [micro.to(run.device) for micro in batch.micro_batches],
            batch.ce_items, batch.kv_items, batch.kd_items,
            [b.to(run.device) for b in batches], ce_items)
        run.teacher_weighting.append({"step": step, "teachers": readings})
    if run.world > 1:
        dist.broadcast(run.distiller.teacher_mixture.logits, 0)


def build_summary(run, arm, job, identity, data_info, student_card, resumed_at, wall_s):
    """train.json: the run's settings, data, student and, per teacher, its store, layer map,
    projector, KV scale, uncovered tokens and weights."""
    data, distiller = run.data, run.distiller
    return {
        "arm": arm, "seed": run.seed, "config": run.cfg, "job": job,
        "steps": run.cfg["steps"], "resumed_from_step": resumed_at,
        "examples": len(data.students),
        "examples_without_answer_tokens": sum(1 for n in data.ce_valid if n == 0),
        "effective_batch": run.cfg["effective_batch"],
        "micro_batch": run.micro_batch, "processes": run.world, "device": run.device.type,
        "precision": run.precision, "key_space": data.key_space,
        "time_alignment": data.alignment, "kv_shuffled_partner": data.partner,
        "data": data_info,
        "student": {"name": student_card["name"],
                    "weights_sha256": student_card["weights_sha256"]},
        "teachers": {name: {"manifest": str(t["manifest"]),
                            "identity": identity["manifests"][name],
                            "layer_map": data.layer_maps[name],
                            "layer_map_reason": data.layer_map_reasons[name],
                            "projector": distiller.projectors[name].kind,
                            "projector_direction": distiller.projectors[name].direction,
                            "kv_std": distiller.teacher_std[k].tolist(),
                            "tokens_without_target": data.kv_lost[name],
                            "kd_loss": data.kd_kinds.get(name),
                            "weights": distiller.teacher_mixture.weights()[:, k].tolist()}
                     for k, (name, t) in enumerate(zip(data.stores, run.teachers))},
        # The validation curve and the step whose weights are published (early stopping).
        **(run.best.summary() if run.best.curve else {}),
        **({"teacher_weighting": run.teacher_weighting} if run.teacher_weighting else {}),
        "wall_s": round(wall_s, 3),
    }


def warn_uncovered_tokens(data, job, log):
    """Log each teacher's share of student tokens without a KV target; warn above
    train_job.max_tokens_without_target."""
    for name, lost in data.kv_lost.items():
        if data.alignment[name] == "boundary":
            # kv_loss relation reads only the boundaries both tokenisations share, by design.
            log(f"teacher {name}: {lost:.1%} of the student's tokens end where no teacher token "
                f"ends and stay out of the relation loss")
            continue
        # A tokenizer that normalises text (NFC) can leave student tokens uncovered: they are
        # masked, which is right, but many of them starve the KV loss unseen.
        if lost > job["max_tokens_without_target"]:
            log(f"warning: teacher {name}: {lost:.1%} of the student's tokens have no teacher "
                f"token covering them and get no KV target (above "
                f"train_job.max_tokens_without_target {job['max_tokens_without_target']:.1%})")
        elif lost:
            log(f"teacher {name}: {lost:.1%} of the student's tokens have no teacher token "
                f"covering them and get no KV target (masked)")


def _reduce(sums, stop, world, device):
    """Sum the step's statistics over processes; True if any process got a stop signal."""
    flag = torch.tensor([1.0 if stop is not None and stop.received else 0.0],
                        dtype=torch.float64, device=device)
    if world > 1:
        for value in sums.values():
            dist.all_reduce(value)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _barrier(world):
    if world > 1:
        dist.barrier()


def _kept(checkpoint_dir, last_checkpoint):
    if last_checkpoint is None:
        return "No checkpoint was written yet."
    return f"The last good checkpoint (step {last_checkpoint}) is kept in {checkpoint_dir}."


def diagnose(distiller, batch, held_out):
    """kava.distill.gradient_agreement of one micro-batch against the held-out rows, as
    metrics keys align/<term>."""
    device = next(distiller.parameters()).device
    batch, held_out = batch.to(device), held_out.to(device)
    ce_items = int(batch.labels[:, 1:].ne(-100).sum())
    kv_items = {name: int(t.mask.sum()) for name, t in batch.teachers.items()}
    agreement = gradient_agreement(distiller, batch, ce_items, kv_items, held_out,
                                   int(held_out.labels[:, 1:].ne(-100).sum()))
    return {f"align/{term}": value for term, value in agreement.items()}


def _metrics_line(step, result, teachers, step_s, elapsed, learned_weights, agreement):
    line = {"step": step, "loss": result["loss"], "ce": result["ce"], "kd": result["kd"]}
    kv_matrix, cos = result["kv"], result["cos"]
    for t, name in enumerate(teachers):
        line[f"kv/{name}"] = float(kv_matrix[:, t].mean())
        # nanmean: a student layer without a target (layer_map minilm) has no cosine.
        line[f"cos/{name}"] = float(cos[:, t].nanmean())
        for layer, value in enumerate(cos[:, t].tolist()):
            line[f"cos/{name}/{layer}"] = value
        if learned_weights:
            line[f"w/{name}"] = float(result["weights"][:, t].mean())
    lrs = result["lrs"]
    line.update({"l2_init": result["l2"], "lr": lrs[0], "lr_projector": lrs[-1],
                 "grad_norm": result["grad_norms"][0],
                 "grad_norm_projector": result["grad_norms"][1], "tokens": int(result["tokens"]),
                 "tokens_per_s": result["tokens"] / step_s, "elapsed": elapsed, **agreement})
    return line


def _publish(run, metrics_path, summary, outputs):
    """The stage's outputs, each under a temporary name until complete."""
    with atomic_path(outputs["student"], is_dir=True) as tmp:
        run.distiller.student.save_pretrained(tmp)
        run.data.tokenizer.save_pretrained(tmp)
    save_projectors(dict(run.distiller.projectors.items()), outputs["projector"])
    with atomic_path(outputs["metrics"]) as tmp:
        shutil.copyfile(metrics_path, tmp)
    write_json(outputs["summary"], summary)
