import pytest
import torch

from kava.align import ratio_layer_map
from kava.errors import KavaError
from kava.projector import KVProjector, group_average_init

# (num_key_value_heads, head_dim) of the real models
GEMMA3_270M = (1, 256)
SMOLLM2_135M = (3, 64)


def _teacher_kv(layer_map, shape, batch=(2, 5), dtype=torch.float32):
    return {t: (torch.randn(*batch, *shape).to(dtype), torch.randn(*batch, *shape).to(dtype))
            for t in set(layer_map)}


def test_group_average_init():
    six_to_three = group_average_init(6, 3)
    assert torch.equal(six_to_three, torch.tensor([[0.5, 0.5, 0, 0, 0, 0],
                                                   [0, 0, 0.5, 0.5, 0, 0],
                                                   [0, 0, 0, 0, 0.5, 0.5]]))
    assert torch.equal(group_average_init(1, 3), torch.ones(3, 1))
    assert torch.equal(group_average_init(2, 4), torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]]))
    assert torch.equal(group_average_init(2, 3), torch.tensor([[1.0, 0], [0.5, 0.5], [0, 1]]))
    assert torch.equal(group_average_init(3, 3), torch.eye(3))


def test_equal_shapes_start_as_the_exact_identity():
    layer_map = [0, 2, 3]
    projector = KVProjector(layer_map, SMOLLM2_135M, SMOLLM2_135M)
    teacher_kv = _teacher_kv(layer_map, SMOLLM2_135M)
    out = projector(teacher_kv)
    assert len(out) == 3
    for (k, v), t in zip(out, layer_map):
        assert torch.equal(k, teacher_kv[t][0]) and torch.equal(v, teacher_kv[t][1])


def test_six_heads_to_three_is_an_exact_group_average():
    projector = KVProjector([0], (6, 64), (3, 64))
    x = torch.randn(2, 5, 6, 64)
    ((k, _),) = projector({0: (x, x)})
    torch.testing.assert_close(k, x.unflatten(-2, (3, 2)).mean(dim=-2), rtol=0, atol=1e-6)


@pytest.mark.parametrize("teacher_shape", [GEMMA3_270M, (2, 256)])
def test_gemma3_to_smollm2_shapes_and_norms(teacher_shape):
    layer_map = ratio_layer_map(15, 18)
    projector = KVProjector(layer_map, teacher_shape, SMOLLM2_135M)
    teacher_kv = _teacher_kv(layer_map, teacher_shape, batch=(4, 16), dtype=torch.bfloat16)
    out = projector(teacher_kv)
    assert len(out) == 15
    for k, v in out:
        assert k.shape == v.shape == (4, 16, 3, 64) and k.dtype == torch.float32
    # The 256→64 head_dim map starts norm-preserving for isotropic input: the log-norm loss
    # compares norms.
    x = torch.randn(4096, 256)
    y = projector.maps["k0"].dims(x)
    ratio = y.square().sum(-1).mean() / x.square().sum(-1).mean()
    assert 0.9 < ratio.item() < 1.1


def test_projector_rejects_wrong_teacher_shapes_and_missing_layers():
    projector = KVProjector([0, 4], GEMMA3_270M, SMOLLM2_135M)
    with pytest.raises(KavaError, match="student layer 1 needs teacher layer 4"):
        projector(_teacher_kv([0], GEMMA3_270M))
    with pytest.raises(KavaError, match=r"teacher K for student layer 0 has \(heads, head_dim\) "
                                        r"\(4, 256\), expected \(1, 256\)"):
        projector(_teacher_kv([0, 4], (4, 256)))
    with pytest.raises(KavaError, match="unknown projector kind 'conv'"):
        KVProjector([0], GEMMA3_270M, SMOLLM2_135M, kind="conv")


def test_mlp_projector_shapes_and_gradients():
    layer_map = [0, 1, 1]
    projector = KVProjector(layer_map, (2, 256), SMOLLM2_135M, kind="mlp", hidden=32)
    out = projector(_teacher_kv(layer_map, (2, 256)))
    assert [tuple(k.shape) for k, _ in out] == [(2, 5, 3, 64)] * 3
    sum(k.sum() + v.sum() for k, v in out).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    # One module per student layer and per K/V, none shared.
    assert sorted(projector.maps.keys()) == ["k0", "k1", "k2", "v0", "v1", "v2"]


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_save_load_round_trip(tmp_path, kind):
    layer_map = [0, 2]
    saved = KVProjector(layer_map, (2, 256), SMOLLM2_135M, kind=kind, hidden=32)
    with torch.no_grad():
        for p in saved.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "projector.safetensors"
    saved.save(path)
    assert [f.name for f in tmp_path.iterdir()] == ["projector.safetensors"]

    loaded = KVProjector(layer_map, (2, 256), SMOLLM2_135M, kind=kind, hidden=32)
    loaded.load(path)
    teacher_kv = _teacher_kv(layer_map, (2, 256))
    for (k1, v1), (k2, v2) in zip(saved(teacher_kv), loaded(teacher_kv)):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


@pytest.mark.parametrize("other,key", [
    (dict(layer_map=[0, 2], teacher_shape=(2, 256), student_shape=(3, 32)), "student_shape"),
    (dict(layer_map=[0, 2], teacher_shape=(1, 256), student_shape=(3, 64)), "teacher_shape"),
    (dict(layer_map=[0, 3], teacher_shape=(2, 256), student_shape=(3, 64)), "layer_map"),
    (dict(layer_map=[0, 2], teacher_shape=(2, 256), student_shape=(3, 64), kind="mlp"), "kind"),
])
def test_load_refuses_a_mismatched_file(tmp_path, other, key):
    path = tmp_path / "projector.safetensors"
    KVProjector([0, 2], (2, 256), SMOLLM2_135M).save(path)
    with pytest.raises(KavaError, match=f"projector.safetensors: projector {key} is"):
        KVProjector(**other).load(path)


def test_load_refuses_an_mlp_of_another_width(tmp_path):
    path = tmp_path / "projector.safetensors"
    KVProjector([0], GEMMA3_270M, SMOLLM2_135M, kind="mlp", hidden=32).save(path)
    with pytest.raises(KavaError, match="projector hidden is 32, this run expects 64"):
        KVProjector([0], GEMMA3_270M, SMOLLM2_135M, kind="mlp", hidden=64).load(path)
