import math

import pytest
import torch

from kava.errors import KavaError
from kava.layer_maps import (auto_layer_map, cka_layer_map, explicit_layer_map, layers_to_store,
                             linear_cka, probe_layer_maps, pruned_from, ratio_layer_map, resolve)

PRUNED = {"num_layers": 5, "source": {"derive": {"base": "smollm2", "keep_layers": [0, 3, 6, 9, 29]}}}
SMOLLM2 = {"model": "smollm2", "num_layers": 30}


# ---- layer maps -------------------------------------------------------------------------------

def test_auto_layer_map_follows_the_pruned_students_kept_layers():
    card = {"source": {"derive": {"base": "smollm2", "keep_layers": [0, 3, 6, 9, 29]}}}
    assert pruned_from(card) == ("smollm2", [0, 3, 6, 9, 29])
    mapping, why = auto_layer_map(5, 30, "smollm2", pruned_from(card))
    assert mapping == [0, 3, 6, 9, 29] and "pruned" in why
    mapping, why = auto_layer_map(5, 18, "gemma3", pruned_from(card))
    assert mapping == ratio_layer_map(5, 18) and why.startswith("ratio")
    assert pruned_from({"source": {"gguf": {}}}) is None


def test_ratio_map_18_to_20_spreads_evenly():
    layer_map = ratio_layer_map(18, 20)
    assert layer_map == [math.floor(i * 19 / 17 + 0.5) for i in range(18)]
    assert layer_map[0] == 0 and layer_map[-1] == 19
    assert all(a < b for a, b in zip(layer_map, layer_map[1:]))


def test_ratio_map_15_to_30_rounds_half_up():
    # i*29/14 hits exactly 14.5 at i=7.
    assert ratio_layer_map(15, 30) == [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 29]


def test_ratio_map_deeper_student_repeats_every_teacher_layer():
    layer_map = ratio_layer_map(30, 18)
    assert len(layer_map) == 30 and layer_map[0] == 0 and layer_map[-1] == 17
    assert all(a <= b for a, b in zip(layer_map, layer_map[1:]))
    assert set(layer_map) == set(range(18))


def test_ratio_map_edge_cases():
    assert ratio_layer_map(7, 7) == list(range(7))
    assert ratio_layer_map(1, 20) == [19]
    assert ratio_layer_map(4, 1) == [0, 0, 0, 0]
    with pytest.raises(KavaError, match="at least one layer"):
        ratio_layer_map(0, 20)


def test_explicit_map_accepts_a_valid_map():
    assert explicit_layer_map([0, 5, 5, 17], 4, 18, "gemma3-270m") == [0, 5, 5, 17]


def test_explicit_map_out_of_range_names_the_layers_and_teacher():
    with pytest.raises(KavaError) as err:
        explicit_layer_map([0, 1, 2, 18], 4, 18, "gemma3-270m")
    message = str(err.value)
    assert "student layer 3" in message and "teacher layer 18" in message
    assert "gemma3-270m" in message and "\n" not in message
    with pytest.raises(KavaError, match="student layer 0 maps to teacher layer -1"):
        explicit_layer_map([-1, 1], 2, 18, "gemma3-270m")


def test_explicit_map_wrong_length_or_type():
    with pytest.raises(KavaError, match="3 entries, the student has 4 layers"):
        explicit_layer_map([0, 1, 2], 4, 18, "gemma3-270m")
    with pytest.raises(KavaError, match="student layer 1 maps to '3'"):
        explicit_layer_map([0, "3"], 2, 18, "gemma3-270m")


# ---- CKA --------------------------------------------------------------------------------------

def _orthogonal(d, generator):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator))
    return q


def test_cka_of_a_representation_with_itself_is_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 48, generator=g) + 5.0  # a large mean, removed by centring
    assert linear_cka(x, x).item() == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_rotation_and_isotropic_scaling():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 32, generator=g)
    y = x[:, :20] @ torch.randn(20, 24, generator=g) + 0.5 * torch.randn(300, 24, generator=g)
    base = linear_cka(x, y).item()
    assert 0.2 < base < 0.99
    rotated = linear_cka(x @ _orthogonal(32, g) * 3.7, y @ _orthogonal(24, g)).item()
    assert rotated == pytest.approx(base, abs=1e-6)  # the rotation itself is float32


def test_cka_of_independent_features_is_small():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(2000, 16, generator=g), torch.randn(2000, 16, generator=g)
    assert linear_cka(x, y).item() < 0.05


def test_cka_constant_features_and_row_mismatch():
    x = torch.randn(50, 8)
    assert linear_cka(x, torch.ones(50, 8)).item() == 0.0
    with pytest.raises(KavaError, match="50 and 49 rows"):
        linear_cka(x, x[:49])


def test_cka_layer_map_recovers_a_planted_permutation():
    g = torch.Generator().manual_seed(3)
    teacher = [torch.randn(400, d, generator=g) for d in (24, 32, 40, 24, 32)]
    planted = [3, 0, 4, 1]
    student = [teacher[t] @ _orthogonal(teacher[t].shape[1], g)[:, :16] * 2.0
               + 0.1 * torch.randn(400, 16, generator=g) for t in planted]
    layer_map, scores = cka_layer_map(student, teacher)
    assert layer_map == planted
    assert scores.shape == (4, 5)
    assert scores[torch.arange(4), torch.tensor(planted)].min() > 0.5


def test_cka_layer_map_needs_the_same_tokens():
    with pytest.raises(KavaError, match=r"row counts \[10, 11\]"):
        cka_layer_map([torch.randn(10, 4)], [torch.randn(11, 4)])


# ---- resolve: each mode, checked against the stored layers --------------------------------------

def test_resolve_auto_on_a_pruned_student_reads_its_kept_layers():
    assert resolve({"layer_map": "auto"}, PRUNED, SMOLLM2, range(30)) == (
        [0, 3, 6, 9, 29], "the student is smollm2 pruned to layers [0, 3, 6, 9, 29]")
    other = {"model": "gemma3", "num_layers": 18}
    assert resolve({"layer_map": "auto"}, PRUNED, other, range(18)) == (
        ratio_layer_map(5, 18), "ratio: the student is not pruned from it")


def test_resolve_ratio_ignores_the_pruning():
    assert resolve({"layer_map": "ratio"}, PRUNED, SMOLLM2, range(30)) == (
        [0, 7, 15, 22, 29], "ratio")


def test_resolve_explicit_takes_the_teachers_entry():
    arm = {"layer_map": "explicit", "explicit_layer_map": {"smollm2": [1, 1, 2, 3, 5]}}
    assert resolve(arm, PRUNED, SMOLLM2, range(30)) == ([1, 1, 2, 3, 5], "explicit")
    with pytest.raises(KavaError, match="explicit_layer_map has no entry for teacher gemma3"):
        resolve(arm, PRUNED, {"model": "gemma3", "num_layers": 18}, range(18))


def test_resolve_cka_takes_the_cka_stages_map():
    cka = {"smollm2": {"layer_map": [0, 2, 4, 6, 8]}}
    assert resolve({"layer_map": "cka"}, PRUNED, SMOLLM2, range(30), cka) == ([0, 2, 4, 6, 8], "cka")
    with pytest.raises(KavaError, match="no CKA layer map was given for teacher smollm2"):
        resolve({"layer_map": "cka"}, PRUNED, SMOLLM2, range(30))


def test_resolve_refuses_unstored_layers_and_unknown_modes():
    with pytest.raises(KavaError, match=r"student layer 1 maps to teacher smollm2 layer 3, which "
                                        r"its KV store does not hold \(stored layers: \[0, 29\]\)"):
        resolve({"layer_map": "auto"}, PRUNED, SMOLLM2, [29, 0])
    with pytest.raises(KavaError, match="unknown layer map 'nearest'"):
        resolve({"layer_map": "nearest"}, PRUNED, SMOLLM2, range(30))


def test_probe_layer_maps_cover_every_teacher_of_the_run():
    """The teacher an arm learned from keeps its training map; one it did not learn from gets
    layer_map auto's: the pruned student's own layers for its parent, ratio for another."""
    info = {"config": {"kv_target": "teacher"}, "teachers": {"taught": {"layer_map": [0, 0, 5]}}}
    dims = {"taught": {"num_layers": 6}, "parent": {"num_layers": 12},
            "other": {"num_layers": 7}}
    card = {"source": {"derive": {"base": "parent", "keep_layers": [0, 4, 11]}}}
    maps = probe_layer_maps(info, 3, dims, card)
    assert maps == {"taught": [0, 0, 5], "parent": [0, 4, 11], "other": [0, 3, 6]}
    # kv_target self trained each student layer against itself: its map names student layers,
    # which the teacher's store need not hold, so the probe uses auto's map for every teacher.
    self_info = {"config": {"kv_target": "self"},
                 "teachers": {"parent": {"layer_map": [0, 1, 2]}}}
    assert probe_layer_maps(self_info, 3, {"parent": {"num_layers": 12}}, card) == {
        "parent": [0, 4, 11]}
