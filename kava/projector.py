"""Map one teacher's KV into the student's KV space: one small module per student layer and per
K/V, reading the teacher layer the layer map assigns to that student layer.

Shapes are `(num_key_value_heads, head_dim)` from the dims JSON: GQA is what makes KV narrower
than the hidden size, so num_attention_heads never enters here.
"""

import json
import math

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from kava.align import span_alignment
from kava.errors import KavaError
from kava.io import atomic_path

KINDS = ("linear", "mlp")


def group_average_init(n_teacher_heads, n_student_heads):
    """`[H_s, H_t]` head mixer: each head is an equal slice of one shared interval and a student
    head averages the teacher heads its slice overlaps, weighted by the overlap. So H_t = g·H_s
    averages each group of g teacher heads, H_s = g·H_t copies each teacher head g times, and
    anything else blends neighbours (2→3: rows [1, 0], [½, ½], [0, 1]). Rows sum to 1."""
    # On a grid of H_s·H_t cells a student head spans H_t cells and a teacher head H_s, so the
    # overlaps are whole numbers: exactly the character-span problem of span_alignment.
    student = torch.arange(n_student_heads)[:, None] * n_teacher_heads
    teacher = torch.arange(n_teacher_heads)[:, None] * n_student_heads
    student = torch.cat([student, student + n_teacher_heads], dim=1)
    teacher = torch.cat([teacher, teacher + n_student_heads], dim=1)
    weights, _ = span_alignment(student, teacher)
    return weights


class LinearKV(nn.Module):
    """Factorised linear map `[..., H_t, D_t] → [..., H_s, D_s]`: a head mixer, then a
    head-dim map with bias shared by all heads. Starts as group averaging plus the identity on
    head_dim (or a norm-preserving semi-orthogonal map when head_dim changes), so with equal
    shapes it starts as the exact identity."""

    def __init__(self, teacher_shape, student_shape):
        super().__init__()
        (h_t, d_t), (h_s, d_s) = teacher_shape, student_shape
        self.heads = nn.Parameter(group_average_init(h_t, h_s))
        self.dims = nn.Linear(d_t, d_s)
        with torch.no_grad():
            if d_t == d_s:
                self.dims.weight.copy_(torch.eye(d_t))
            else:
                # Orthonormal rows (d_s < d_t) keep only d_s/d_t of an isotropic vector's squared
                # norm; the rescale keeps the expected norm, which the log-norm loss compares.
                nn.init.orthogonal_(self.dims.weight, gain=math.sqrt(max(d_t / d_s, 1.0)))
            self.dims.bias.zero_()

    def forward(self, x):
        return self.dims(torch.einsum("st,...td->...sd", self.heads, x))


def mlp_kv(teacher_shape, student_shape, hidden):
    """The SEED's "elastic bottleneck": all heads flattened, LayerNorm, Linear, SiLU, Linear."""
    (h_t, d_t), (h_s, d_s) = teacher_shape, student_shape
    return nn.Sequential(
        nn.Flatten(start_dim=-2),
        nn.LayerNorm(h_t * d_t),
        nn.Linear(h_t * d_t, hidden),
        nn.SiLU(),
        nn.Linear(hidden, h_s * d_s),
        nn.Unflatten(-1, (h_s, d_s)),
    )


class KVProjector(nn.Module):
    """Projects one teacher's KV to the student's shapes, for every student layer.

    layer_map[s] is the teacher layer student layer s learns from (see kava.align).
    teacher_shape / student_shape are (num_key_value_heads, head_dim). kind: "linear"
    (LinearKV) or "mlp" (mlp_kv with `hidden` units; hidden is ignored by "linear" and not
    recorded for it)."""

    def __init__(self, layer_map, teacher_shape, student_shape, kind="linear", hidden=512):
        super().__init__()
        if kind not in KINDS:
            raise KavaError(f"unknown projector kind {kind!r}; choose one of {', '.join(KINDS)}")
        self.layer_map = [int(t) for t in layer_map]
        self.teacher_shape = tuple(int(n) for n in teacher_shape)
        self.student_shape = tuple(int(n) for n in student_shape)
        self.kind = kind
        self.hidden = int(hidden) if kind == "mlp" else None

        def make():
            if kind == "linear":
                return LinearKV(self.teacher_shape, self.student_shape)
            return mlp_kv(self.teacher_shape, self.student_shape, self.hidden)

        self.maps = nn.ModuleDict({f"{which}{layer}": make()
                                   for layer in range(len(self.layer_map)) for which in "kv"})

    def forward(self, teacher_kv):
        """teacher_kv: teacher layer → (K, V), each `[..., H_t, D_t]` (only the mapped layers
        are read). Returns one (K, V) pair per student layer, each `[..., H_s, D_s]`, float32
        or whatever dtype the projector's weights are in."""
        out = []
        for student_layer, teacher_layer in enumerate(self.layer_map):
            if teacher_layer not in teacher_kv:
                raise KavaError(f"projector: student layer {student_layer} needs teacher layer "
                                f"{teacher_layer}, which was not given")
            out.append(tuple(self._project(student_layer, which, x)
                             for which, x in zip("kv", teacher_kv[teacher_layer])))
        return out

    def _project(self, student_layer, which, x):
        if tuple(x.shape[-2:]) != self.teacher_shape:
            raise KavaError(f"projector: teacher {which.upper()} for student layer {student_layer} "
                            f"has (heads, head_dim) {tuple(x.shape[-2:])}, expected "
                            f"{self.teacher_shape} from the dims JSON")
        module = self.maps[f"{which}{student_layer}"]
        # Teacher KV is stored in bf16; the projector keeps full-precision weights (autocast,
        # where enabled, still picks the matmul precision).
        return module(x.to(next(module.parameters()).dtype))

    def _metadata(self):
        return {
            "format": "kava-projector-1",
            "kind": self.kind,
            "teacher_shape": json.dumps(list(self.teacher_shape)),
            "student_shape": json.dumps(list(self.student_shape)),
            "layer_map": json.dumps(self.layer_map),
            "hidden": json.dumps(self.hidden),
        }

    def save(self, path):
        """Write the weights as safetensors, with kind, shapes and layer map as metadata."""
        tensors = {name: t.detach().contiguous() for name, t in self.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=self._metadata())

    def load(self, path):
        """Load weights saved by save(), refusing a file made for other shapes, kind or map."""
        with safe_open(str(path), framework="pt") as f:
            found = f.metadata() or {}
            for key, expected in self._metadata().items():
                if found.get(key) != expected:
                    raise KavaError(f"{path}: projector {key} is {found.get(key)}, "
                                    f"this run expects {expected}")
            self.load_state_dict({name: f.get_tensor(name) for name in f.keys()})


PROJECTORS_FORMAT = "kava-projectors-1"


def save_projectors(projectors, path):
    """Several teachers' projectors in one safetensors file: tensors `<teacher>.<name>`, and
    per teacher its kind, shapes and layer map as metadata `<teacher>.<key>`."""
    tensors, metadata = {}, {"format": PROJECTORS_FORMAT, "teachers": json.dumps(list(projectors))}
    for teacher, projector in projectors.items():
        for name, t in projector.state_dict().items():
            tensors[f"{teacher}.{name}"] = t.detach().contiguous().cpu()
        for key, value in projector._metadata().items():
            metadata[f"{teacher}.{key}"] = value
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_projectors(path):
    """The projectors save_projectors wrote, rebuilt from the file alone: {teacher: KVProjector}."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != PROJECTORS_FORMAT:
            raise KavaError(f"{path}: not a kava projectors file (format "
                            f"{metadata.get('format')}, expected {PROJECTORS_FORMAT})")
        projectors = {}
        for teacher in json.loads(metadata["teachers"]):
            meta = {key: metadata[f"{teacher}.{key}"] for key in
                    ("kind", "teacher_shape", "student_shape", "layer_map", "hidden")}
            hidden = json.loads(meta["hidden"])
            projector = KVProjector(json.loads(meta["layer_map"]), json.loads(meta["teacher_shape"]),
                                    json.loads(meta["student_shape"]), meta["kind"],
                                    hidden if hidden is not None else 512)
            stored = set(f.keys())
            missing = [n for n in projector.state_dict() if f"{teacher}.{n}" not in stored]
            if missing:
                raise KavaError(f"{path}: projector of teacher {teacher} lacks {missing[0]}")
            projector.load_state_dict({n: f.get_tensor(f"{teacher}.{n}")
                                       for n in projector.state_dict()})
            projectors[teacher] = projector
    return projectors
