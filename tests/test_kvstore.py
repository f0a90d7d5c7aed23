"""The shard format, the manifest and the reader: round trips, zero-copy views, verification."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from kava.errors import KavaError
from kava.kvstore import KVStore, ShardWriter, build_manifest, quantize_fp8, sha256_file
from kava.models import load_tokenizer
from kava.precompute import precompute_split
from kava.synthetic import generate

OPTIONS = dict(key_space="pre_rope", dtype="bf16", max_length=1024, on_too_long="truncate",
               batch_tokens=256)


def synthetic_rows(n, split="train", seed=0):
    rows = generate(n, seed, split)
    return [{"id": f"synthetic-{split}-{i:05d}", "question": r["question"], "answer": r["answer"],
             "text": f"Question: {r['question']}\nAnswer: {r['answer']}"} for i, r in enumerate(rows)]


def build_store(card, rows, folder, per_shard=4, **options):
    """A store of `rows`, made in-process as the stages make it (small shards by default)."""
    return precompute_split(card, rows, folder, examples_per_shard=per_shard, **{**OPTIONS, **options})


@pytest.fixture(scope="module")
def llama_store(tiny_card, tmp_path_factory):
    card = tiny_card("llama")
    rows = synthetic_rows(10)
    return card, rows, build_store(card, rows, tmp_path_factory.mktemp("store"))


def test_reader_api_round_trip(llama_store):
    card, rows, manifest = llama_store
    store = KVStore(manifest)
    tokenizer = load_tokenizer(card["dir"])
    assert len(store) == 10 and store.ids == [r["id"] for r in rows]
    assert store.layers == [0, 1, 2, 3] and store.kv_shape == (2, 16)
    assert len(store.manifest["shards"]) == 3
    for i in (0, 3, 4, 9):  # first and last of a shard, across shard boundaries
        example = store.example(i)
        encoded = tokenizer(rows[i]["text"], return_offsets_mapping=True)
        assert example["id"] == rows[i]["id"] and store.index_of(rows[i]["id"]) == i
        assert example["input_ids"].dtype == torch.long
        assert example["input_ids"].tolist() == encoded["input_ids"]
        assert example["char_spans"].tolist() == [list(span) for span in encoded["offset_mapping"]]
        # The byte-level tokenizer covers the text exactly: the spans rebuild it.
        assert "".join(rows[i]["text"][a:b] for a, b in example["char_spans"].tolist()) == rows[i]["text"]
        n_tokens = len(encoded["input_ids"])
        for layer in store.layers:
            assert example["k"][layer].shape == example["v"][layer].shape == (n_tokens, 2, 16)
            assert example["k"][layer].dtype == torch.bfloat16
    with pytest.raises(KavaError, match="no example 'nope'"):
        store.index_of("nope")
    with pytest.raises(IndexError):
        store.example(10)


def test_examples_are_zero_copy_views_of_one_mapping(llama_store):
    _, _, manifest = llama_store
    store = KVStore(manifest)
    first, second = store.example(0), store.example(1)
    for layer in store.layers:
        # Consecutive examples of a shard are consecutive rows of the same mapped storage.
        k0, k1 = first["k"][layer], second["k"][layer]
        assert k0.untyped_storage().data_ptr() == k1.untyped_storage().data_ptr()
        assert k1.data_ptr() - k0.data_ptr() == k0.numel() * k0.element_size()


def test_expect_mismatch_names_manifest_and_field(llama_store):
    card, _, manifest = llama_store
    KVStore(manifest, expect={"teacher": card["name"], "weights_sha256": card["weights_sha256"],
                              "dtype": "bf16", "key_space": "pre_rope", "layers": [1, 3]})
    for field, wanted in [("teacher", "other"), ("dtype", "fp8"), ("key_space", "post_rope"),
                          ("weights_sha256", "0" * 64), ("layers", [3, 4])]:
        with pytest.raises(KavaError, match=rf"manifest {manifest}: {field} is .* the config asks"):
            KVStore(manifest, expect={field: wanted})
    with pytest.raises(KavaError, match="unknown field 'colour'"):
        KVStore(manifest, expect={"colour": "red"})


def copy_store(manifest, tmp_path):
    """A copy of a store (shards + manifest) to damage, leaving the shared one intact."""
    manifest_data = json.loads(manifest.read_text())
    for entry in manifest_data["shards"]:
        source = (manifest.parent / entry["path"]).resolve()
        target = tmp_path / source.name
        target.write_bytes(source.read_bytes())
        entry["path"] = str(target)
    copy = tmp_path / "manifest.json"
    copy.write_text(json.dumps(manifest_data))
    return copy, [tmp_path / f"shard-{n:05d}.safetensors" for n in range(len(manifest_data["shards"]))]


def test_corrupted_and_truncated_shards_are_named(llama_store, tmp_path):
    copy, shards = copy_store(llama_store[2], tmp_path)
    data = bytearray(shards[1].read_bytes())
    data[len(data) // 2] ^= 0xFF
    shards[1].write_bytes(bytes(data))
    shards[2].write_bytes(shards[2].read_bytes()[:-100])
    store = KVStore(copy)
    store.example(0)  # shard 0 is intact: lazily, nothing else is checked yet
    with pytest.raises(KavaError, match=rf"shard {shards[1]}: sha256 differs .*corrupted"):
        store.example(4)
    with pytest.raises(KavaError, match=rf"shard {shards[2]}: .* bytes, the manifest says"):
        store.example(9)
    shards[0].unlink()
    with pytest.raises(KavaError, match=rf"shard {shards[0]}: missing"):
        KVStore(copy).example(0)


def test_shard_metadata_must_match_the_manifest(llama_store, tmp_path):
    copy, _ = copy_store(llama_store[2], tmp_path)
    manifest = json.loads(copy.read_text())
    manifest["shards"][0]["ids"][0] = "someone-else"
    copy.write_text(json.dumps(manifest))
    with pytest.raises(KavaError, match="shard .*shard-00000.safetensors: metadata ids does not match"):
        KVStore(copy).example(0)


def test_manifest_errors(llama_store, tmp_path):
    manifest = json.loads(llama_store[2].read_text())
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({**manifest, "shards": []}))
    with pytest.raises(KavaError, match=rf"manifest {empty}: lists no shards"):
        KVStore(empty)
    with pytest.raises(KavaError, match="unreadable"):
        KVStore(tmp_path / "absent.json")


def test_manifest_must_cover_every_row_once(llama_store, tmp_path):
    card, rows, manifest_path = llama_store
    infos = [{"path": f"s{i}", "rows": rows_range, "examples": 1, "tokens": 1, "bytes": 1,
              "ids": [], "truncated": [], "skipped": [], "sha256": "", "dtype": "bf16",
              "key_space": "pre_rope", "compute_dtype": "fp32", "layers": [0], "kv_shape": [2, 16],
              "tokenizer": {}, "max_length": 8, "on_too_long": "truncate"}
             for i, rows_range in enumerate([[0, 4], [8, 10]])]
    data_info = {"source": "synthetic", "path": None, "splits": {"train": {"rows": 10, "sha256": ""}}}
    with pytest.raises(KavaError, match=r"not 0..10 of split 'train' once each"):
        build_manifest(card, data_info, "train", infos, tmp_path / "m.json")
    infos[1].update(rows=[4, 10], dtype="fp8")
    with pytest.raises(KavaError, match="shard s1: dtype 'fp8' differs from shard s0's 'bf16'"):
        build_manifest(card, data_info, "train", infos, tmp_path / "m.json")


def test_writer_is_a_valid_deterministic_safetensors_file(tmp_path):
    tensors = {"offsets": torch.arange(5, dtype=torch.int64),
               "k.0": torch.randn(7, 2, 3).to(torch.bfloat16),
               "k_scale.0": torch.rand(4, 2, 3),
               "v.0": torch.randn(7, 2, 3).to(torch.float8_e4m3fn),
               "empty": torch.zeros(0, 2, dtype=torch.int32)}
    layout = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    digests = []
    for number in (1, 2):
        writer = ShardWriter(tmp_path / f"w{number}.safetensors", layout,
                             {"b": "2", "a": "1", "format": "x"})
        for name, tensor in tensors.items():
            writer.tensors[name].copy_(tensor)
        digests.append(writer.close())
    assert digests[0] == digests[1] == sha256_file(tmp_path / "w1.safetensors")
    loaded = load_file(tmp_path / "w1.safetensors")
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name].view(torch.uint8),
                                                                  tensor.view(torch.uint8))
    # With one metadata key (safetensors orders several at random), save_file writes the very
    # same bytes: the layout, alignment and header are safetensors' own.
    writer = ShardWriter(tmp_path / "w3.safetensors", layout, {"format": "x"})
    for name, tensor in tensors.items():
        writer.tensors[name].copy_(tensor)
    writer.close()
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "x"})
    assert (tmp_path / "w3.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_fp8_quantisation_by_hand():
    # One example of 3 tokens (the 4th a pad), 3 channels. Channel 0's largest real magnitude
    # is 1000: 1000 / 448 = 2.23, so its scale is the next power of two, 2**2; 3.0 is stored as
    # 0.75 (exact in e4m3) and -1000 as -250, which e4m3 (steps of 16 in [128, 256)) rounds to
    # -256. Channel 1 peaks at 0.1: 0.1 / 448 → 2**-12; the pad's
    # 5000 is not a real token and must not set the scale. An all-zero channel keeps 2**0.
    x = torch.tensor([[[3.0, 0.1, 0.0], [-1000.0, 0.05, 0.0], [0.5, -0.1, 0.0],
                       [5000.0, 5000.0, 0.0]]])
    valid = torch.tensor([[True, True, True, False]])
    values, exp = quantize_fp8(x, valid)
    assert values.dtype == torch.float8_e4m3fn and exp.dtype == torch.int8
    assert exp.tolist() == [2, -12, 0]
    assert values[0, 0, 0].item() == 0.75 and values[0, 1, 0].item() == -256.0
    restored = values.float() * torch.exp2(exp.float())
    assert restored[0, 0, 0].item() == 3.0 and restored[0, 1, 0].item() == -1024.0
    assert restored[0, :3, 2].tolist() == [0.0, 0.0, 0.0]
    # 0.1 * 2**12 = 409.6 → e4m3 has 3 mantissa bits: 416 (2**8 * 1.625), i.e. 0.1015625.
    assert restored[0, 0, 1].item() == 416 * 2.0 ** -12


def test_fp8_store_dequantises_to_float32_close_to_fp32(tiny_card, tmp_path):
    card = tiny_card("qwen3")
    rows = synthetic_rows(4)
    exact = KVStore(build_store(card, rows, tmp_path / "fp32", dtype="fp32"))
    fp8 = KVStore(build_store(card, rows, tmp_path / "fp8", dtype="fp8", batch_tokens=64))
    shards = fp8.manifest["shards"]
    # fp8 bytes per value plus one byte per channel and forward batch: under a quarter of fp32.
    assert exact.manifest["bytes"] > 3 * fp8.manifest["bytes"]
    tensors = load_file((fp8.path.parent / shards[0]["path"]).resolve())
    assert tensors["k.0"].dtype == torch.float8_e4m3fn and tensors["k_exp.0"].dtype == torch.int8
    groups = tensors["group"].max().item() + 1
    assert groups > 1 and tensors["k_exp.0"].shape == tensors["v_exp.0"].shape == (groups, 3, 16)
    for i in range(4):
        example = fp8.example(i)
        group = tensors["group"][i].item()
        start, end = tensors["offsets"][i:i + 2].tolist()
        for layer in fp8.layers:
            for kind in ("k", "v"):
                got, want = example[kind][layer], exact.example(i)[kind][layer]
                assert got.dtype == torch.float32 and got.shape == want.shape
                # The reader's dequantisation is exactly value * 2**exponent of its group.
                scale = torch.exp2(tensors[f"{kind}_exp.{layer}"][group].float())
                assert torch.equal(got, tensors[f"{kind}.{layer}"][start:end].float() * scale)
                cosine = torch.nn.functional.cosine_similarity(got.flatten(1), want.flatten(1), dim=1)
                assert (1 - cosine).mean() < 2e-3, (kind, layer)


def test_pca_store_reconstructs_from_its_basis(tiny_card, tmp_path):
    card = tiny_card("qwen3")
    rows, held_out = synthetic_rows(4), synthetic_rows(2, "test")
    exact = KVStore(build_store(card, held_out, tmp_path / "fp32", dtype="fp32"))
    manifest = build_store(card, held_out, tmp_path / "pca", dtype="pca", basis_rows=rows,
                           variance=0.999)
    pca = KVStore(manifest)
    assert pca.manifest["format"] == "kava-kv/2"
    assert pca.manifest["basis"]["path"] == str(manifest.parent / "basis.safetensors")
    basis = load_file(manifest.parent / "basis.safetensors")
    shard = load_file((pca.path.parent / pca.manifest["shards"][0]["path"]).resolve())
    for layer in pca.layers:
        for kind in ("k", "v"):
            components = basis[f"basis_{kind}.{layer}"]
            rank = components.shape[0]
            assert shard[f"{kind}.{layer}"].shape == (pca.manifest["shards"][0]["tokens"], rank)
            # Orthonormal components, fewer than the 48 channels where 99.9 % allows it.
            assert torch.allclose(components @ components.T, torch.eye(rank), atol=1e-5)
    first = pca.example(0)
    start, end = shard["offsets"][0:2].tolist()
    group = shard["group"][0].item()
    for layer in pca.layers:
        coefficients = shard[f"v.{layer}"][start:end].float() * torch.exp2(
            shard[f"v_exp.{layer}"][group].float())
        by_hand = basis[f"mean_v.{layer}"] + coefficients @ basis[f"basis_v.{layer}"]
        assert torch.allclose(first["v"][layer], by_hand.view(-1, 3, 16), atol=1e-6)
    # Fitted on other rows, the basis still reconstructs the held-out KV closely.
    for i in range(len(exact)):
        for kind in ("k", "v"):
            for layer in pca.layers:
                got, want = pca.example(i)[kind][layer], exact.example(i)[kind][layer]
                residual = (got - want).square().sum() / (want - want.mean(0)).square().sum()
                assert residual < 0.05, (kind, layer, residual)


def test_bad_format_dtype_and_basis_are_named(tiny_card, tmp_path):
    card = tiny_card("qwen3")
    manifest = build_store(card, synthetic_rows(2), tmp_path / "pca", dtype="pca")
    original = manifest.read_text()
    data = json.loads(original)
    manifest.write_text(json.dumps({**data, "format": "kava-kv/1"}))
    with pytest.raises(KavaError, match=r"format 'kava-kv/1', this reader reads kava-kv/2"):
        KVStore(manifest)
    manifest.write_text(json.dumps({**data, "dtype": "fp4"}))
    with pytest.raises(KavaError, match=r"unknown storage dtype 'fp4'"):
        KVStore(manifest)
    manifest.write_text(original)
    basis = manifest.parent / "basis.safetensors"
    tensors = load_file(basis)
    blob = bytearray(basis.read_bytes())
    blob[-1] ^= 0xFF
    basis.write_bytes(bytes(blob))
    with pytest.raises(KavaError, match=rf"basis {basis}: sha256 differs"):
        KVStore(manifest)
    # A basis that hashes as listed but lacks a layer's components (e.g. rewritten by hand).
    save_file({name: t for name, t in tensors.items() if name != "basis_k.1"}, basis,
              metadata={"format": "kava-basis/1"})
    manifest.write_text(json.dumps({**data, "basis": {"path": "basis.safetensors",
                                                      "sha256": sha256_file(basis)}}))
    with pytest.raises(KavaError, match=rf"basis {basis}: metadata teacher is None"):
        KVStore(manifest)
    basis.unlink()
    with pytest.raises(KavaError, match=rf"basis {basis}: missing"):
        KVStore(manifest)
