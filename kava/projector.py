"""Map KV between a teacher's and the student's spaces: one small module per student layer and
per K/V, for the teacher layer the layer map assigns to that student layer.

Shapes are `(num_key_value_heads, head_dim)` from the dims JSON: GQA is what makes KV narrower
than the hidden size, so num_attention_heads never enters here.
"""

import json
import math

import torch
from safetensors import safe_open
from torch import nn

from kava.align import span_alignment
from kava.config import schema_enum
from kava.errors import KavaError
from kava.io import atomic_path
from kava.kvstore import write_safetensors

# train.projector's kinds but auto, which kava.distill.build_projectors resolves to one of them,
# and none: not a setting, what auto means for kv_loss relation (no map, any shapes).
KINDS = (*(kind for kind in schema_enum("projector") if kind != "auto"), "none")
DIRECTIONS = schema_enum("projector_direction")


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
    """Factorised linear map `[..., H_in, D_in] → [..., H_out, D_out]`: a head mixer, then a
    head-dim map with bias shared by all heads. Starts as group averaging plus the identity on
    head_dim (or a norm-preserving semi-orthogonal map when head_dim changes), so with equal
    shapes it starts as the exact identity."""

    def __init__(self, in_shape, out_shape):
        super().__init__()
        (h_t, d_t), (h_s, d_s) = in_shape, out_shape
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


def mlp_kv(in_shape, out_shape, hidden):
    """The earlier system's "elastic bottleneck": all heads flattened, LayerNorm, Linear, SiLU,
    Linear."""
    (h_t, d_t), (h_s, d_s) = in_shape, out_shape
    return nn.Sequential(
        nn.Flatten(start_dim=-2),
        nn.LayerNorm(h_t * d_t),
        nn.Linear(h_t * d_t, hidden),
        nn.SiLU(),
        nn.Linear(hidden, h_s * d_s),
        nn.Unflatten(-1, (h_s, d_s)),
    )


class DenseKV(nn.Module):
    """One linear map with bias over all heads at once, `[..., H_in, D_in] → [..., H_out,
    D_out]`: what a closed-form ridge fit (kava.projector.fit_ridge) gives, so a projector can
    start at the best linear map of the training data instead of at a guess."""

    def __init__(self, in_shape, out_shape):
        super().__init__()
        self.out_shape = tuple(out_shape)
        self.map = nn.Linear(math.prod(in_shape), math.prod(out_shape))

    def forward(self, x):
        return self.map(x.flatten(-2)).unflatten(-1, self.out_shape)


def ridge_solution(x, y, ridge):
    """Closed-form ridge regression with an unpenalised bias: (weight `[d_out, d_in]`, bias
    `[d_out]`) minimising ||y − x·Wᵀ − b||² + λ||W||², with λ = ridge · trace(XcᵀXc) / d_in
    (relative to the inputs' scale, so one setting fits K and V of any model). x `[N, d_in]`,
    y `[N, d_out]`; solved in float64."""
    x, y = x.double(), y.double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc
    lam = ridge * gram.diagonal().sum() / x.shape[1]
    weight = torch.linalg.solve(gram + lam * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ yc).T
    return weight.float(), (y_mean - weight @ x_mean).float()


class KVProjector(nn.Module):
    """Maps KV from one side's space to the other's, for every student layer: one small module
    per student layer and per K/V.

    direction: student_to_teacher (the teacher's fixed KV is the target and the projector
        absorbs the student's basis freedom, as FitNets' regressor does) or teacher_to_student
        (the projected teacher KV is the student's target).
    kind: identity (no parameters; equal shapes only), none (no parameters, any shapes: the
        KV is passed on as it is, for kv_loss relation, which compares no KV directly), ridge
        (DenseKV, fitted in closed form on train KV by kava.distill before training), linear
        (LinearKV) or mlp (mlp_kv with `hidden` units). layer_map[s] is the teacher layer
        student layer s is compared with (None: none).
    Shapes are (num_key_value_heads, head_dim)."""

    def __init__(self, layer_map, teacher_shape, student_shape, kind, hidden, direction):
        super().__init__()
        if kind not in KINDS:
            raise KavaError(f"unknown projector kind {kind!r}; choose one of {', '.join(KINDS)}")
        if direction not in DIRECTIONS:
            raise KavaError(f"unknown projector direction {direction!r}; choose one of "
                            f"{', '.join(DIRECTIONS)}")
        self.layer_map = [None if t is None else int(t) for t in layer_map]
        self.teacher_shape = tuple(int(n) for n in teacher_shape)
        self.student_shape = tuple(int(n) for n in student_shape)
        self.kind, self.direction = kind, direction
        self.hidden = int(hidden) if kind == "mlp" else None
        shapes = (self.teacher_shape, self.student_shape)
        self.in_shape, self.out_shape = shapes if direction == "teacher_to_student" else shapes[::-1]
        if kind == "identity" and self.in_shape != self.out_shape:
            raise KavaError(f"an identity projector needs equal KV shapes, got teacher "
                            f"{self.teacher_shape} and student {self.student_shape} (heads, "
                            f"head_dim); use projector ridge, linear or mlp")

        def make():
            if kind in ("identity", "none"):
                return nn.Identity()
            if kind == "ridge":
                return DenseKV(self.in_shape, self.out_shape)
            if kind == "linear":
                return LinearKV(self.in_shape, self.out_shape)
            return mlp_kv(self.in_shape, self.out_shape, self.hidden)

        self.maps = nn.ModuleDict({f"{which}{layer}": make()
                                   for layer in range(len(self.layer_map)) for which in "kv"})

    def forward(self, kv):
        """kv: one (K, V) pair per student layer, each `[..., *in_shape]`, in the direction's
        source space. Returns the pairs mapped to `[..., *out_shape]`, float32 or whatever dtype
        the projector's weights are in."""
        if len(kv) != len(self.layer_map):
            raise KavaError(f"projector: got KV of {len(kv)} layers, it maps "
                            f"{len(self.layer_map)}")
        return [None if pair is None else
                tuple(self._project(layer, which, x) for which, x in zip("kv", pair))
                for layer, pair in enumerate(kv)]

    def _project(self, student_layer, which, x):
        if tuple(x.shape[-2:]) != self.in_shape:
            side = self.direction.split("_to_")[0]
            raise KavaError(f"projector: {side} {which.upper()} for student layer {student_layer} "
                            f"has (heads, head_dim) {tuple(x.shape[-2:])}, expected "
                            f"{self.in_shape} from the dims JSON")
        module = self.maps[f"{which}{student_layer}"]
        # Teacher KV is stored in bf16; the projector keeps full-precision weights (autocast,
        # where enabled, still picks the matmul precision).
        weight = next(module.parameters(), None)
        return module(x.float() if weight is None else x.to(weight.dtype))

    @torch.no_grad()
    def set_ridge(self, student_layer, which, x, y, ridge):
        """Fit one layer's K or V map in closed form to source `x` `[N, *in_shape]` and target
        `y` `[N, *out_shape]` (ridge kind only)."""
        if self.kind != "ridge":
            raise KavaError(f"set_ridge fits a ridge projector; this one is {self.kind}")
        weight, bias = ridge_solution(x.flatten(1), y.flatten(1), ridge)
        dense = self.maps[f"{which}{student_layer}"].map
        dense.weight.copy_(weight)
        dense.bias.copy_(bias)

    def _metadata(self):
        return {
            "kind": self.kind,
            "direction": self.direction,
            "teacher_shape": json.dumps(list(self.teacher_shape)),
            "student_shape": json.dumps(list(self.student_shape)),
            "layer_map": json.dumps(self.layer_map),
            "hidden": json.dumps(self.hidden),
        }


PROJECTORS_FORMAT = "kava-projectors-2"


def save_projectors(projectors, path):
    """Several teachers' projectors in one safetensors file: tensors `<teacher>.<name>`, and
    per teacher its kind, direction, shapes and layer map as metadata `<teacher>.<key>`."""
    tensors, metadata = {}, {"format": PROJECTORS_FORMAT, "teachers": json.dumps(list(projectors))}
    for teacher, projector in projectors.items():
        for name, t in projector.state_dict().items():
            tensors[f"{teacher}.{name}"] = t.detach().contiguous().cpu()
        for key, value in projector._metadata().items():
            metadata[f"{teacher}.{key}"] = value
    with atomic_path(path) as tmp:
        # Not save_file: its metadata order changes from run to run, and a resumed run's
        # projector file must be bit-identical to an uninterrupted one's.
        write_safetensors(tmp, tensors, metadata)


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
                    ("kind", "direction", "teacher_shape", "student_shape", "layer_map", "hidden")}
            # hidden is null for every kind but mlp, which alone has hidden units.
            projector = KVProjector(json.loads(meta["layer_map"]), json.loads(meta["teacher_shape"]),
                                    json.loads(meta["student_shape"]), meta["kind"],
                                    json.loads(meta["hidden"]), meta["direction"])
            stored = set(f.keys())
            missing = [n for n in projector.state_dict() if f"{teacher}.{n}" not in stored]
            if missing:
                raise KavaError(f"{path}: projector of teacher {teacher} lacks {missing[0]}")
            projector.load_state_dict({n: f.get_tensor(f"{teacher}.{n}")
                                       for n in projector.state_dict()})
            projectors[teacher] = projector
    return projectors


def compared_pairs(projector, student_kv, teacher_kv):
    """(prediction, target) KV per student layer for one teacher: the projector maps whichever
    side its direction says into the other's space. teacher_kv: {teacher layer: (K, V)}. A
    student layer the layer map leaves out (None) gets None as its target."""
    mapped = [None if layer is None else teacher_kv[layer] for layer in projector.layer_map]
    if projector.direction == "teacher_to_student":
        return student_kv, projector(mapped)
    return projector(student_kv), mapped
