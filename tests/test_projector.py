import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import PROJECT
from kava.layer_maps import ratio_layer_map
from kava.errors import KavaError
from kava.projector import (KVProjector, group_average_init, load_projectors, ridge_solution,
                            save_projectors)

# (num_key_value_heads, head_dim) of the real models
GEMMA3_270M = (1, 256)
SMOLLM2_135M = (3, 64)


def _kv(n_layers, shape, batch=(2, 5), dtype=torch.float32):
    """One (K, V) pair per student layer, each `[*batch, *shape]`."""
    return [(torch.randn(*batch, *shape).to(dtype), torch.randn(*batch, *shape).to(dtype))
            for _ in range(n_layers)]


def test_group_average_init():
    six_to_three = group_average_init(6, 3)
    assert torch.equal(six_to_three, torch.tensor([[0.5, 0.5, 0, 0, 0, 0],
                                                   [0, 0, 0.5, 0.5, 0, 0],
                                                   [0, 0, 0, 0, 0.5, 0.5]]))
    assert torch.equal(group_average_init(1, 3), torch.ones(3, 1))
    assert torch.equal(group_average_init(2, 4), torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]]))
    assert torch.equal(group_average_init(2, 3), torch.tensor([[1.0, 0], [0.5, 0.5], [0, 1]]))
    assert torch.equal(group_average_init(3, 3), torch.eye(3))


# ---- identity ----------------------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["student_to_teacher", "teacher_to_student"])
def test_identity_projector_is_the_exact_identity(direction):
    projector = KVProjector([0, 2, 3], SMOLLM2_135M, SMOLLM2_135M, kind="identity", hidden=512,
                            direction=direction)
    assert list(projector.parameters()) == []  # nothing to train, nothing to co-adapt
    kv = _kv(3, SMOLLM2_135M)
    out = projector(kv)
    assert len(out) == 3
    for (k, v), (k_in, v_in) in zip(out, kv):
        assert torch.equal(k, k_in) and torch.equal(v, v_in)
    # Stored teacher KV is bf16: compared in float32, values unchanged.
    half = _kv(3, SMOLLM2_135M, dtype=torch.bfloat16)
    for (k, v), (k_in, v_in) in zip(projector(half), half):
        assert k.dtype == torch.float32 and torch.equal(k, k_in.float())
        assert torch.equal(v, v_in.float())


def test_identity_projector_refuses_unequal_shapes():
    with pytest.raises(KavaError, match=r"an identity projector needs equal KV shapes, got teacher "
                                        r"\(1, 256\) and student \(3, 64\) \(heads, head_dim\); "
                                        r"use projector ridge, linear or mlp"):
        KVProjector([0], GEMMA3_270M, SMOLLM2_135M, kind="identity", hidden=512,
                    direction="teacher_to_student")
    with pytest.raises(KavaError, match=r"got teacher \(3, 64\) and student \(3, 32\)"):
        KVProjector([0], SMOLLM2_135M, (3, 32), kind="identity", hidden=512,
                    direction="student_to_teacher")


# ---- linear and mlp ----------------------------------------------------------------------------

def test_linear_with_equal_shapes_starts_as_the_exact_identity():
    projector = KVProjector([0, 2, 3], SMOLLM2_135M, SMOLLM2_135M, kind="linear", hidden=512,
                            direction="teacher_to_student")
    kv = _kv(3, SMOLLM2_135M)
    for (k, v), (k_in, v_in) in zip(projector(kv), kv):
        assert torch.equal(k, k_in) and torch.equal(v, v_in)


def test_six_heads_to_three_is_an_exact_group_average():
    projector = KVProjector([0], (6, 64), (3, 64), kind="linear", hidden=512,
                            direction="teacher_to_student")
    x = torch.randn(2, 5, 6, 64)
    ((k, _),) = projector([(x, x)])
    torch.testing.assert_close(k, x.unflatten(-2, (3, 2)).mean(dim=-2), rtol=0, atol=1e-6)


@pytest.mark.parametrize("teacher_shape", [GEMMA3_270M, (2, 256)])
def test_gemma3_to_smollm2_shapes_and_norms(teacher_shape):
    layer_map = ratio_layer_map(15, 18)
    projector = KVProjector(layer_map, teacher_shape, SMOLLM2_135M, kind="linear", hidden=512,
                            direction="teacher_to_student")
    out = projector(_kv(15, teacher_shape, batch=(4, 16), dtype=torch.bfloat16))
    assert len(out) == 15
    for k, v in out:
        assert k.shape == v.shape == (4, 16, 3, 64) and k.dtype == torch.float32
    # The 256→64 head_dim map starts norm-preserving for isotropic input: the log-norm loss
    # compares norms.
    x = torch.randn(4096, 256)
    y = projector.maps["k0"].dims(x)
    ratio = y.square().sum(-1).mean() / x.square().sum(-1).mean()
    assert 0.9 < ratio.item() < 1.1


@pytest.mark.parametrize("kind", ["ridge", "linear", "mlp"])
def test_student_to_teacher_maps_student_shape_to_teacher_shape(kind):
    """The FitNets direction: the student's KV goes in, the teacher's shape comes out, so the
    teacher's fixed KV is the target."""
    projector = KVProjector([0, 5], GEMMA3_270M, SMOLLM2_135M, kind=kind, hidden=16,
                            direction="student_to_teacher")
    assert projector.in_shape == SMOLLM2_135M and projector.out_shape == GEMMA3_270M
    out = projector(_kv(2, SMOLLM2_135M, batch=(2, 7)))
    assert [(tuple(k.shape), tuple(v.shape)) for k, v in out] == [((2, 7, 1, 256),) * 2] * 2
    with pytest.raises(KavaError, match=r"student K for student layer 0 has \(heads, head_dim\) "
                                        r"\(1, 256\), expected \(3, 64\)"):
        projector(_kv(2, GEMMA3_270M))


def test_projector_rejects_wrong_shapes_layer_counts_kinds_and_directions():
    projector = KVProjector([0, 4], GEMMA3_270M, SMOLLM2_135M, kind="linear", hidden=512,
                            direction="teacher_to_student")
    with pytest.raises(KavaError, match="projector: got KV of 1 layers, it maps 2"):
        projector(_kv(1, GEMMA3_270M))
    with pytest.raises(KavaError, match=r"teacher K for student layer 0 has \(heads, head_dim\) "
                                        r"\(4, 256\), expected \(1, 256\)"):
        projector(_kv(2, (4, 256)))
    with pytest.raises(KavaError, match="unknown projector kind 'conv'"):
        KVProjector([0], GEMMA3_270M, SMOLLM2_135M, kind="conv", hidden=512,
                    direction="teacher_to_student")
    with pytest.raises(KavaError, match="unknown projector direction 'sideways'; choose one of "
                                        "student_to_teacher, teacher_to_student"):
        KVProjector([0], GEMMA3_270M, SMOLLM2_135M, kind="linear", hidden=512, direction="sideways")


def test_mlp_projector_shapes_and_gradients():
    projector = KVProjector([0, 1, 1], (2, 256), SMOLLM2_135M, kind="mlp", hidden=32,
                            direction="teacher_to_student")
    out = projector(_kv(3, (2, 256)))
    assert [tuple(k.shape) for k, _ in out] == [(2, 5, 3, 64)] * 3
    sum(k.sum() + v.sum() for k, v in out).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    # One module per student layer and per K/V, none shared.
    assert sorted(projector.maps.keys()) == ["k0", "k1", "k2", "v0", "v1", "v2"]


# ---- ridge -------------------------------------------------------------------------------------

def test_ridge_solution_by_hand():
    # y = 2x + 1 on x = 0, 1, 2. Centred: Sxx = 2, Sxy = 4; λ = ridge·Sxx/d_in = 2·ridge, so
    # w = Sxy / (Sxx + λ) and b = ȳ − w·x̄ (the bias is not penalised).
    x = torch.tensor([[0.0], [1.0], [2.0]])
    y = 2 * x + 1
    weight, bias = ridge_solution(x, y, 1.0)
    assert weight.tolist() == [[1.0]] and bias.tolist() == [2.0]  # w = 4/4, b = 3 − 1·1
    weight, bias = ridge_solution(x, y, 0.0)
    assert weight.tolist() == [[2.0]] and bias.tolist() == [1.0]
    assert weight.dtype == bias.dtype == torch.float32


def test_ridge_solution_recovers_a_linear_map_with_bias():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g) * 3 + 5  # off-centre inputs: the bias must absorb it
    true_w, true_b = torch.randn(4, 6, generator=g), torch.randn(4, generator=g)
    y = x @ true_w.T + true_b
    weight, bias = ridge_solution(x, y, 1e-12)
    torch.testing.assert_close(weight, true_w, rtol=0, atol=1e-5)
    torch.testing.assert_close(bias, true_b, rtol=0, atol=1e-4)


def test_ridge_solution_matches_the_closed_form():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 5, generator=g), torch.randn(50, 3, generator=g)
    ridge = 0.3
    xd, yd = x.double(), y.double()
    xc, yc = xd - xd.mean(0), yd - yd.mean(0)
    lam = ridge * (xc ** 2).sum() / 5
    expected_w = (torch.linalg.inv(xc.T @ xc + lam * torch.eye(5, dtype=torch.float64))
                  @ xc.T @ yc).T
    expected_b = yd.mean(0) - expected_w @ xd.mean(0)
    weight, bias = ridge_solution(x, y, ridge)
    torch.testing.assert_close(weight, expected_w.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(bias, expected_b.float(), rtol=0, atol=1e-6)
    # The penalty is relative to the inputs' scale: scaling x scales the weight back exactly.
    scaled_w, scaled_b = ridge_solution(10 * x, y, ridge)
    torch.testing.assert_close(scaled_w * 10, weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scaled_b, bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("direction", ["student_to_teacher", "teacher_to_student"])
def test_set_ridge_then_forward_reproduces_the_fit(direction):
    teacher_shape, student_shape = (1, 6), (2, 4)
    projector = KVProjector([0, 1], teacher_shape, student_shape, kind="ridge", hidden=512,
                            direction=direction)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, *projector.in_shape, generator=g)
    true_w = torch.randn(6, 8, generator=g)  # student (8 values) → teacher (6)
    true_w = true_w if direction == "student_to_teacher" else true_w.T
    y = (x.flatten(1) @ true_w.T + 0.5).unflatten(-1, projector.out_shape)
    v_before = {n: p.clone() for n, p in projector.maps["v1"].named_parameters()}
    projector.set_ridge(1, "k", x, y, 1e-10)
    (_, _), (k, v) = projector([(x, x), (x, x)])
    torch.testing.assert_close(k, y, rtol=0, atol=1e-4)  # the exact map, recovered
    # With a real penalty, forward is x·Wᵀ + b of ridge_solution's answer.
    projector.set_ridge(1, "k", x, y, 0.5)
    weight, bias = ridge_solution(x.flatten(1), y.flatten(1), 0.5)
    (_, _), (k, _) = projector([(x, x), (x, x)])
    torch.testing.assert_close(k.flatten(1), x.flatten(1) @ weight.T + bias, rtol=0, atol=1e-5)
    # Only that layer's K map changed.
    assert all(torch.equal(p, v_before[n]) for n, p in projector.maps["v1"].named_parameters())


# ---- saving ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,direction", [("identity", "student_to_teacher"),
                                            ("ridge", "student_to_teacher"),
                                            ("linear", "teacher_to_student"),
                                            ("mlp", "student_to_teacher"),
                                            ("mlp", "teacher_to_student")])
def test_save_load_projectors_round_trip(tmp_path, kind, direction):
    same = kind == "identity"
    saved = {
        "llama": KVProjector([0, 2], SMOLLM2_135M if same else (2, 16), SMOLLM2_135M, kind=kind,
                             hidden=32, direction=direction),
        "gemma": KVProjector([1, 1], SMOLLM2_135M, SMOLLM2_135M, kind="linear", hidden=512,
                             direction="teacher_to_student"),
    }
    with torch.no_grad():
        for projector in saved.values():
            for p in projector.parameters():
                p.add_(torch.randn_like(p))
    path = tmp_path / "projectors.safetensors"
    save_projectors(saved, path)
    assert [f.name for f in tmp_path.iterdir()] == ["projectors.safetensors"]

    loaded = load_projectors(path)
    assert list(loaded) == ["llama", "gemma"]
    for name, projector in saved.items():
        other = loaded[name]
        assert (other.kind, other.direction) == (projector.kind, projector.direction)
        assert other.layer_map == projector.layer_map and other.hidden == projector.hidden
        assert (other.teacher_shape, other.student_shape) == (projector.teacher_shape,
                                                              projector.student_shape)
        kv = _kv(2, projector.in_shape)
        for (k1, v1), (k2, v2) in zip(projector(kv), other(kv)):
            assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_saved_projectors_are_the_same_bytes_in_every_process(tmp_path):
    """A resumed run's projector file must equal an uninterrupted run's byte for byte;
    safetensors' save_file orders the metadata differently in every process."""
    script = (
        "import sys, torch\n"
        "from kava.projector import KVProjector, save_projectors\n"
        "torch.manual_seed(0)\n"
        "save_projectors({t: KVProjector([0, 1], (2, 16), (3, 16), kind='mlp', hidden=8,\n"
        "                                      direction='teacher_to_student')\n"
        "                 for t in ('llama', 'gemma', 'qwen')}, sys.argv[1])\n")
    files = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for path in files:
        subprocess.run([sys.executable, "-c", script, str(path)], cwd=PROJECT, check=True)
    assert len({path.read_bytes() for path in files}) == 1
    loaded = load_projectors(files[0])
    assert list(loaded) == ["llama", "gemma", "qwen"]
    with safe_open(str(files[0]), framework="pt") as f:
        assert all(torch.equal(f.get_tensor(f"llama.{name}"), value)
                   for name, value in loaded["llama"].state_dict().items())


def test_load_projectors_refuses_other_files(tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other), metadata={"format": "kava-projector-1"})
    with pytest.raises(KavaError, match=r"other.safetensors: not a kava projectors file \(format "
                                        r"kava-projector-1, expected kava-projectors-2\)"):
        load_projectors(other)
    path = tmp_path / "projectors.safetensors"
    save_projectors({"llama": KVProjector([0], (2, 16), SMOLLM2_135M, kind="ridge", hidden=512,
                                          direction="teacher_to_student")}, path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.endswith("map.bias")}
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(KavaError, match="projector of teacher llama lacks maps.k0.map.bias"):
        load_projectors(path)
