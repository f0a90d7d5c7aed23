"""Which teacher layer each student layer learns from: the one place that decides it, for
training (resolve), precompute (layers_to_store), evaluation's probe (probe_layer_maps) and the
CKA search (cka_layer_map).

A layer map is a list indexed by student layer, holding a teacher layer, or None for a
student layer that learns from no layer of that teacher (layer_map minilm).
"""

import torch

from kava.config import schema_enum
from kava.errors import KavaError

LAYER_MAPS = schema_enum("layer_map")


def ratio_layer_map(n_student, n_teacher):
    """Spread the student's layers evenly over the teacher's: first↔first, last↔last, the rest
    by rounding the proportional position. A student deeper than its teacher repeats teacher
    layers. A one-layer student maps to the teacher's last layer: its only layer is also the
    one that feeds the LM head, so the most abstract teacher layer is the closest match."""
    if n_student < 1 or n_teacher < 1:
        raise KavaError(f"layer map needs at least one layer, got {n_student} student and "
                        f"{n_teacher} teacher layers")
    if n_student == 1:
        return [n_teacher - 1]
    # Integer round-half-up of i*(n_teacher-1)/(n_student-1): no float ties, same on every machine.
    span_s, span_t = n_student - 1, n_teacher - 1
    return [(2 * i * span_t + span_s) // (2 * span_s) for i in range(n_student)]


def minilm_layer_map(n_student, n_teacher):
    """MiniLMv2's choice (Wang et al. 2021, arXiv 2012.15828): only the student's last layer
    learns, from one upper-middle teacher layer, which for large teachers transferred better
    than the teacher's last. The paper took layer 19 of 24 (RoBERTa-large, XLM-R-large; 21 of
    24 for BERT-large); kava generalises it as layer round(0.8·L) counted from 1, i.e. index
    round(0.8·L) − 1 (18 layers: 13; 30 layers: 23). The other student layers map to None."""
    if n_student < 1 or n_teacher < 1:
        raise KavaError(f"layer map needs at least one layer, got {n_student} student and "
                        f"{n_teacher} teacher layers")
    # Integer round-half-up of 0.8·L, as ratio_layer_map rounds.
    upper_middle = max((8 * n_teacher + 5) // 10 - 1, 0)
    return [None] * (n_student - 1) + [upper_middle]


def pruned_from(card):
    """(base model name, keep_layers) of a depth-pruned (`derive`) model's card, else None."""
    derive = card["source"].get("derive")
    return (derive["base"], list(derive["keep_layers"])) if derive else None


def auto_layer_map(n_student, n_teacher, teacher, pruned=None):
    """(layer map, why it was chosen). A student pruned from this very teacher (`pruned`, from
    pruned_from) holds the teacher's layers `keep_layers` in the teacher's own coordinates, so
    each student layer maps to the layer it was copied from; a ratio map would score most of
    them against a neighbouring layer whose K/V live in other coordinates. Otherwise ratio."""
    if pruned is not None and pruned[0] == teacher:
        return list(pruned[1]), f"the student is {teacher} pruned to layers {pruned[1]}"
    return ratio_layer_map(n_student, n_teacher), "ratio: the student is not pruned from it"


def explicit_layer_map(mapping, n_student, n_teacher, teacher_name):
    """Check a user-given map (one teacher layer per student layer) against both models."""
    mapping = list(mapping)
    if len(mapping) != n_student:
        raise KavaError(f"layer map for teacher {teacher_name} has {len(mapping)} entries, "
                        f"the student has {n_student} layers")
    for student_layer, teacher_layer in enumerate(mapping):
        if isinstance(teacher_layer, bool) or not isinstance(teacher_layer, int):
            raise KavaError(f"layer map for teacher {teacher_name}: student layer {student_layer} "
                            f"maps to {teacher_layer!r}, not a layer index")
        if not 0 <= teacher_layer < n_teacher:
            raise KavaError(f"layer map for teacher {teacher_name}: student layer {student_layer} "
                            f"maps to teacher layer {teacher_layer}, but {teacher_name} has layers "
                            f"0..{n_teacher - 1}")
    return mapping


def resolve(arm, student_card, teacher_dims, stored_layers, cka_maps=None):
    """(the teacher layer each student layer of `arm` learns from, why), checked against what
    the teacher's KV store holds (precompute may have stored only some layers).

    arm: {layer_map, explicit_layer_map}; student_card: its num_layers and, for a depth-pruned
    student, the layers it kept (pruned_from); teacher_dims: the teacher's model name and
    num_layers; cka_maps: the cka stage's maps, for layer_map cka."""
    mode, teacher = arm["layer_map"], teacher_dims["model"]
    n_student, n_teacher = student_card["num_layers"], teacher_dims["num_layers"]
    why = mode
    if mode == "auto":
        mapping, why = auto_layer_map(n_student, n_teacher, teacher, pruned_from(student_card))
    elif mode == "ratio":
        mapping = ratio_layer_map(n_student, n_teacher)
    elif mode == "minilm":
        mapping = minilm_layer_map(n_student, n_teacher)
        why = f"minilm: the student's last layer learns from upper-middle layer {mapping[-1]}"
    elif mode == "explicit":
        explicit = arm.get("explicit_layer_map") or {}
        if teacher not in explicit:
            raise KavaError(f"train.layer_map is explicit but train.explicit_layer_map has no "
                            f"entry for teacher {teacher}")
        mapping = explicit_layer_map(explicit[teacher], n_student, n_teacher, teacher)
    elif mode == "cka":
        if teacher not in (cka_maps or {}):
            raise KavaError(f"train.layer_map is cka but no CKA layer map was given for "
                            f"teacher {teacher}")
        mapping = explicit_layer_map(cka_maps[teacher]["layer_map"], n_student, n_teacher,
                                     teacher)
    else:
        raise KavaError(f"unknown layer map {mode!r}; choose one of {', '.join(LAYER_MAPS)}")
    stored = set(stored_layers)
    for student_layer, teacher_layer in enumerate(mapping):
        if teacher_layer is not None and teacher_layer not in stored:
            raise KavaError(f"student layer {student_layer} maps to teacher {teacher} layer "
                            f"{teacher_layer}, which its KV store does not hold (stored layers: "
                            f"{sorted(stored)}); precompute it or change the layer map")
    return mapping, why


def layers_to_store(spec, n_teacher, student_card=None, teacher="teacher", arms=None):
    """Sorted teacher layer indices precompute stores (precompute.layers). `mapped`: every layer
    some arm's layer map uses (`arms`: {arm: {layer_map, explicit_layer_map}}; None: one arm
    with the auto map), all of them if an arm picks its map by CKA, which searches the stored
    layers."""
    if spec == "all":
        return list(range(n_teacher))
    if spec == "mapped":
        used = set()
        teacher_dims = {"model": teacher, "num_layers": n_teacher}
        for arm in (arms or {"auto": {"layer_map": "auto"}}).values():
            if arm["layer_map"] == "cka":
                return list(range(n_teacher))
            mapping, _ = resolve(arm, student_card, teacher_dims, range(n_teacher))
            used.update(layer for layer in mapping if layer is not None)
        return sorted(used)
    bad = [layer for layer in spec if not 0 <= layer < n_teacher]
    if bad:
        raise KavaError(f"precompute.layers {bad} out of range for teacher {teacher} "
                        f"(layers 0..{n_teacher - 1})")
    return sorted(set(spec))


def probe_layer_maps(train_info, n_student, teacher_dims, student_card):
    """{teacher: layer map} the held-out probe scores, for every teacher of the run: the map
    training used for a teacher the student learned from, else the one layer_map auto would
    give. So an arm that learned from one teacher is still measured against the others, which
    tells whether its KV moved towards its teacher only or towards any teacher. A student
    layer the training map leaves out (minilm) is probed against the map's last teacher layer:
    the probe scores every student layer, and the store may hold no other layer. A kv_target
    self arm learned from no teacher (its map is the student's own layers): it gets auto's."""
    learned = train_info["config"]["kv_target"] != "self"
    maps = {}
    for name, dims in teacher_dims.items():
        if learned and name in train_info["teachers"]:
            trained = train_info["teachers"][name]["layer_map"]
            last = [layer for layer in trained if layer is not None][-1]
            maps[name] = [last if layer is None else layer for layer in trained]
        else:
            maps[name] = auto_layer_map(n_student, dims["num_layers"], name,
                                        pruned_from(student_card))[0]
    return maps


def _centre(x):
    # float64: CKA is a ratio of large sums, and centring in float32 loses the small variations
    # that sit on top of a large mean.
    x = x.double()
    return x - x.mean(dim=0, keepdim=True)


def _hsic(xc, yc):
    # Unnormalised linear HSIC, ||Yc^T Xc||_F^2; the feature-space form is cheap for N >> d.
    return (yc.T @ xc).square().sum()


def _cka(xc, yc, x_norm, y_norm):
    # A constant representation (zero norm) shares no linear structure with anything: CKA 0.
    return _hsic(xc, yc) / (x_norm * y_norm).clamp_min(torch.finfo(torch.float64).tiny)


def linear_cka(x, y):
    """Linear CKA (Kornblith et al. 2019) between `[N, d1]` and `[N, d2]` features of the same N
    inputs: 1 for identical representations, invariant to orthogonal maps and isotropic scaling,
    0 when either side is constant. Returns a float64 scalar tensor."""
    if x.shape[0] != y.shape[0]:
        raise KavaError(f"linear_cka needs features of the same inputs, got {x.shape[0]} and "
                        f"{y.shape[0]} rows")
    xc, yc = _centre(x), _centre(y)
    return _cka(xc, yc, _hsic(xc, xc).sqrt(), _hsic(yc, yc).sqrt())


def cka_layer_map(student_feats, teacher_feats):
    """For each student layer, the teacher layer whose features (e.g. flattened KV, `[N, d]`,
    same N tokens for every layer) have the highest linear CKA with it. Returns the map and the
    float64 `[n_student, n_teacher]` score matrix (for the report)."""
    n_rows = {f.shape[0] for f in [*student_feats, *teacher_feats]}
    if len(n_rows) != 1:
        raise KavaError(f"cka_layer_map needs features of the same tokens for every layer, got "
                        f"row counts {sorted(n_rows)}")
    # Centre and self-normalise each layer once; only the cross terms are per pair.
    student = [_centre(f) for f in student_feats]
    teacher = [_centre(f) for f in teacher_feats]
    s_norms = [_hsic(f, f).sqrt() for f in student]
    t_norms = [_hsic(f, f).sqrt() for f in teacher]
    scores = torch.stack([
        torch.stack([_cka(s, t, sn, tn) for t, tn in zip(teacher, t_norms)])
        for s, sn in zip(student, s_norms)
    ])
    return scores.argmax(dim=1).tolist(), scores
