"""Teacher KV capture into shards: values checked against hand computations, tokenisation and
offsets, sliding windows, dtypes, layer selection, too-long examples, the stage and resume."""

import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from transformers import DynamicCache

from conftest import PROJECT
from kava.capture import cache_kv, forward_kv, forward_kv_logits
from kava.data import write_split
from kava.dims import detect_dims
from kava.errors import KavaError
from kava.io import write_json
from kava.kvstore import KVStore, logits_layout, logits_spec
from kava.models import load_model, load_tokenizer
from kava.config import kd_teachers
from kava.layer_maps import layers_to_store
from kava.precompute import length_batches
from test_kvstore import build_store, synthetic_rows

ARCHITECTURES = ["llama", "mistral", "phi3", "qwen2", "qwen3", "gemma3_text"]


def hidden_states(model, input_ids):
    """The hidden state entering each decoder layer, from one plain forward of one example."""
    with torch.no_grad():
        return [h[0] for h in model.model(input_ids[None], output_hidden_states=True).hidden_states]


def hand_kv(model, input_ids, layer, hidden=None):
    """K (pre-RoPE) and V of one layer computed from the hidden state entering it, by hand:
    k_proj(input_layernorm(h)), split into heads, then k_norm where the family has one. phi3's
    fused projection: x @ W.T with W's rows [Q | K | V], the K and V rows taken from the config's
    head counts."""
    hidden = (hidden or hidden_states(model, input_ids))[layer]
    with torch.no_grad():
        block = model.model.layers[layer]
        attention = block.self_attn
        x = block.input_layernorm(hidden)
        head_dim = attention.head_dim
        if hasattr(attention, "qkv_proj"):
            q_rows = model.config.num_attention_heads * head_dim
            kv_rows = model.config.num_key_value_heads * head_dim
            weight = attention.qkv_proj.weight
            k_proj = weight[q_rows:q_rows + kv_rows]
            v_proj = weight[q_rows + kv_rows:]
            assert len(v_proj) == kv_rows
            k = (x @ k_proj.T).view(len(input_ids), -1, head_dim)
            v = (x @ v_proj.T).view(len(input_ids), -1, head_dim)
        else:
            k = attention.k_proj(x).view(len(input_ids), -1, head_dim)
            v = attention.v_proj(x).view(len(input_ids), -1, head_dim)
        if hasattr(attention, "k_norm"):
            k = attention.k_norm(k)
    return k, v


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_pre_rope_kv_equals_hand_computation(tiny_card, tmp_path, architecture):
    card = tiny_card(architecture)
    rows = synthetic_rows(5)
    # batch_tokens forces several padded batches of mixed lengths.
    store = KVStore(build_store(card, rows, tmp_path, dtype="fp32", batch_tokens=400))
    model = load_model(card)
    assert hasattr(model.model.layers[0].self_attn, "k_norm") == (architecture in ("qwen3", "gemma3_text"))
    for i in range(len(rows)):
        example = store.example(i)
        hidden = hidden_states(model, example["input_ids"])
        for layer in store.layers:
            k, v = hand_kv(model, example["input_ids"], layer, hidden)
            torch.testing.assert_close(example["k"][layer], k, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(example["v"][layer], v, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("architecture", ["llama", "mistral", "phi3", "gemma3_text"])
def test_post_rope_keys_equal_the_cache(tiny_card, tmp_path, architecture):
    card = tiny_card(architecture)
    store = KVStore(build_store(card, synthetic_rows(4), tmp_path, dtype="fp32",
                                key_space="post_rope", batch_tokens=400))
    model = load_model(card)
    for i in range(len(store)):
        example = store.example(i)
        cache = DynamicCache()
        with torch.no_grad():
            model.model(example["input_ids"][None], use_cache=True, past_key_values=cache)
        for layer in store.layers:
            keys = cache.layers[layer].keys[0].transpose(0, 1)
            values = cache.layers[layer].values[0].transpose(0, 1)
            torch.testing.assert_close(example["k"][layer], keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(example["v"][layer], values, atol=1e-5, rtol=1e-4)
        if i == 0:
            # Not the same as pre-RoPE: rotary really was applied (position 0 is unrotated).
            pre, _ = hand_kv(model, example["input_ids"], 1)
            assert not torch.allclose(example["k"][1][1:], pre[1:], atol=1e-3)


@pytest.mark.parametrize("architecture", ["llama", "phi3"])
@pytest.mark.parametrize("key_space", ["pre_rope", "post_rope"])
def test_the_forward_stops_after_the_last_requested_layer(tiny_card, architecture, key_space):
    model = load_model(tiny_card(architecture))
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    mask = torch.ones_like(ids)
    ran = []
    handles = [module.register_forward_hook(lambda *_, name=name: ran.append(name))
               for name, module in [("layer 0 mlp", model.model.layers[0].mlp),
                                    ("layer 1", model.model.layers[1]), ("norm", model.model.norm)]]
    with torch.no_grad():
        early = forward_kv(model, ids, mask, [0], key_space)
    assert ran == []
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        full = forward_kv(model, ids, mask, range(len(model.model.layers)), key_space)
    for got, want in zip(early[0], full[0]):
        torch.testing.assert_close(got, want)


def test_sliding_window_layers_keep_the_full_sequence(tiny_card, tmp_path):
    card = tiny_card("gemma3_text")  # window 8
    model = load_model(card)
    assert model.config.sliding_window == 8 and model.config.layer_types[0] == "sliding_attention"
    rows = synthetic_rows(2)
    for key_space in ("pre_rope", "post_rope"):
        store = KVStore(build_store(card, rows, tmp_path / key_space, dtype="fp32",
                                    key_space=key_space))
        example = store.example(0)
        n_tokens = len(example["input_ids"])
        assert n_tokens > 8
        for layer in store.layers:
            assert example["k"][layer].shape[0] == example["v"][layer].shape[0] == n_tokens
    # The model's own cache keeps only the window on a sliding layer: that is what was avoided.
    default_cache = cache_kv(model, example["input_ids"][None], torch.ones(1, n_tokens, dtype=torch.long))
    assert default_cache.layers[0].keys.shape[2] < n_tokens
    # And the stored keys past the window are the hand-computed ones (post-RoPE store is last).
    pre_store = KVStore(tmp_path / "pre_rope" / "kv" / "manifest.json")
    k, _ = hand_kv(model, example["input_ids"], 0)
    torch.testing.assert_close(pre_store.example(0)["k"][0][8:], k[8:], atol=1e-5, rtol=1e-4)


def test_storage_dtypes_are_the_rounded_fp32_values(tiny_card, tmp_path):
    card = tiny_card("qwen2")
    rows = synthetic_rows(3)
    exact = KVStore(build_store(card, rows, tmp_path / "fp32", dtype="fp32"))
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        store = KVStore(build_store(card, rows, tmp_path / dtype, dtype=dtype))
        assert store.dtype == dtype
        for i in range(len(rows)):
            for layer in store.layers:
                assert torch.equal(store.example(i)["k"][layer], exact.example(i)["k"][layer].to(torch_dtype))


def test_offsets_pack_examples_without_padding(tiny_card, tmp_path):
    from safetensors.torch import load_file

    card = tiny_card("llama")
    rows = synthetic_rows(6)
    manifest = build_store(card, rows, tmp_path, per_shard=6, batch_tokens=300)
    store = KVStore(manifest)
    tensors = load_file((manifest.parent / store.manifest["shards"][0]["path"]).resolve())
    lengths = [len(store.example(i)["input_ids"]) for i in range(6)]
    assert tensors["offsets"].tolist() == [sum(lengths[:i]) for i in range(7)]
    assert tensors["k.0"].shape[0] == sum(lengths) == store.manifest["tokens"]
    assert len(set(lengths)) > 1  # really mixed lengths, so padding would have shown


def test_too_long_examples_are_truncated_or_skipped_and_counted(tiny_card, tmp_path):
    card = tiny_card("llama")
    rows = synthetic_rows(6)
    tokenizer = load_tokenizer(card["dir"])
    lengths = [len(tokenizer(r["text"])["input_ids"]) for r in rows]
    limit = sorted(lengths)[3]  # two or three examples are longer
    too_long = [r["id"] for r, n in zip(rows, lengths) if n > limit]
    assert 2 <= len(too_long) < 6

    store = KVStore(build_store(card, rows, tmp_path / "t", max_length=limit))
    assert store.manifest["truncated"] == len(too_long) and store.manifest["skipped"] == 0
    assert len(store) == 6
    assert max(len(store.example(i)["input_ids"]) for i in range(6)) == limit
    truncated = store.example(store.index_of(too_long[0]))
    assert truncated["input_ids"].tolist() == tokenizer(rows[store.index_of(too_long[0])]["text"])["input_ids"][:limit]

    store = KVStore(build_store(card, rows, tmp_path / "s", max_length=limit, on_too_long="skip"))
    assert store.manifest["skipped"] == len(too_long) and store.manifest["skipped_ids"] == too_long
    assert store.manifest["truncated"] == 0 and len(store) == 6 - len(too_long)
    assert not set(store.ids) & set(too_long)

    with pytest.raises(KavaError, match="every example was skipped as longer than data.max_length 8"):
        build_store(card, rows, tmp_path / "none", max_length=8, on_too_long="skip")


def test_nf4_teacher_goes_through_the_same_path(tiny_card, tmp_path):
    card = tiny_card("llama")
    rows = synthetic_rows(2)
    exact = KVStore(build_store(card, rows, tmp_path / "fp", dtype="fp32"))
    quantized = KVStore(build_store({**card, "quantize": "nf4"}, rows, tmp_path / "nf4", dtype="fp32"))
    assert quantized.ids == exact.ids and quantized.layers == exact.layers
    for layer in exact.layers:
        got, want = quantized.example(0)["k"][layer], exact.example(0)["k"][layer]
        assert not torch.equal(got, want)  # 4-bit weights really were used
        assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.95


def test_layer_selection():
    assert layers_to_store("all", 4) == [0, 1, 2, 3]
    pruned = {"num_layers": 10, "source": {"derive": {
        "base": "smollm2", "keep_layers": [0, 3, 6, 9, 12, 15, 18, 21, 24, 29]}}}
    # The teacher the student was pruned from: the layers it kept; any other: the ratio map.
    assert layers_to_store("mapped", 30, pruned, "smollm2") == [0, 3, 6, 9, 12, 15, 18, 21, 24, 29]
    assert layers_to_store("mapped", 30, pruned, "other") == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert layers_to_store([5, 1, 5], 6) == [1, 5]
    # Several arms: every layer one of their maps reads, and every layer when one picks by CKA.
    arms = {"kv": {"layer_map": "auto"}, "ratio": {"layer_map": "ratio"},
            "hand": {"layer_map": "explicit", "explicit_layer_map": {"smollm2": [1] * 10}}}
    assert layers_to_store("mapped", 30, pruned, "smollm2", arms) == sorted(
        {0, 3, 6, 9, 12, 15, 18, 21, 24, 29, 10, 13, 16, 19, 23, 26, 1})
    assert layers_to_store("mapped", 30, pruned, "smollm2", {**arms, "c": {"layer_map": "cka"}}) \
        == list(range(30))
    with pytest.raises(KavaError, match="explicit_layer_map has no entry for teacher other"):
        layers_to_store("mapped", 30, pruned, "other", arms)
    with pytest.raises(KavaError, match=r"precompute.layers \[6\] out of range for teacher t"):
        layers_to_store([1, 6], 6, teacher="t")


def test_mapped_layers_store_only_those(tiny_card, tmp_path):
    card = tiny_card("qwen3")
    layers = layers_to_store("mapped", card["num_layers"], {"num_layers": 3, "source": {"random": {}}})
    store = KVStore(build_store(card, synthetic_rows(2), tmp_path, layers=layers))
    assert store.layers == layers == [0, 2, 3]
    assert set(store.example(0)["k"]) == {0, 2, 3}


def test_length_batches_respect_the_token_budget():
    lengths = [5, 9, 3, 9, 7, 1]
    batches = length_batches(lengths, batch_tokens=18)
    assert sorted(i for batch in batches for i in batch) == list(range(6))
    assert batches[0] == [1, 3]  # longest first, ties in row order
    assert all(len(b) * lengths[b[0]] <= 18 for b in batches)
    assert all(lengths[b[0]] == max(lengths[i] for i in b) for b in batches)
    assert length_batches([30, 2], batch_tokens=10) == [[0], [1]]


# ---- the stage, resume after kill -9 -----------------------------------------------------------

@pytest.fixture(scope="module")
def stage_inputs(tiny_card, tmp_path_factory):
    """A card, a prepared split and dims on disk, as the stage gets them from Snakemake."""
    folder = tmp_path_factory.mktemp("stage")
    card = tiny_card("llama", hidden_size=128, intermediate_size=256)
    (folder / "card.json").write_text(json.dumps(card))
    # Enough tokens (~60k) that a kill after the first batches lands seconds before the end.
    write_split(synthetic_rows(160), folder / "train.parquet")
    model = load_model(card)
    write_json(folder / "dims.json", detect_dims(model, load_tokenizer(card["dir"]), card["name"]))
    return folder


def stage_command(inputs, out, shard=0, **precompute):
    precompute = {"examples_per_shard": 160, "batch_tokens": 1024, "dtype": "bf16",
                  "key_space": "pre_rope", "layers": "all", "compute_dtype": "fp32", **precompute}
    return [sys.executable, "-m", "stages.precompute", "--threads", "1",
            "--card", str(inputs / "card.json"), "--data", str(inputs / "train.parquet"),
            "--split", "train", "--shard", str(shard), "--precompute", json.dumps(precompute),
            "--max-length", "512", "--on-too-long", "truncate",
            "--teacher-dims", str(inputs / "dims.json"),
            "--shard-out", str(out / "shard-00000.safetensors"), "--info", str(out / "info.json")]


def run_stage(command):
    return subprocess.run(command, cwd=PROJECT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(PROJECT)})


def test_kill_9_mid_shard_then_rerun_is_bit_identical(stage_inputs, tmp_path):
    clean = tmp_path / "clean"
    assert run_stage(stage_command(stage_inputs, clean)).returncode == 0
    killed = tmp_path / "killed"
    process = subprocess.Popen(stage_command(stage_inputs, killed), cwd=PROJECT,
                               stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(PROJECT)})
    # Kill once tqdm reports tokens done, i.e. batches have been written into the temporary shard.
    progress, done = b"", None
    while done is None:
        chunk = process.stderr.read1(4096)
        assert chunk, f"stage ended before any progress: {progress.decode()[-2000:]}"
        progress += chunk
        done = re.search(rb"train shard 0:[^\r\n]*\| *([1-9]\d*)/(\d+) \[", progress)
    assert int(done.group(1)) < int(done.group(2)), done.group(0)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "shard-00000.safetensors").exists() and not (killed / "info.json").exists()
    assert list(killed.glob(".shard-00000.safetensors.tmp-*"))  # what the kill left behind

    result = run_stage(stage_command(stage_inputs, killed))
    assert result.returncode == 0, result.stderr
    assert not list(killed.glob(".shard-00000.safetensors.tmp-*"))
    assert (killed / "shard-00000.safetensors").read_bytes() == (clean / "shard-00000.safetensors").read_bytes()
    info = json.loads((killed / "info.json").read_text())
    assert info == {**json.loads((clean / "info.json").read_text()),
                    "path": str(killed / "shard-00000.safetensors")}
    assert info["rows"] == [0, 160] and info["examples"] == 160


def test_stage_errors_are_one_line(stage_inputs, tmp_path):
    result = run_stage(stage_command(stage_inputs, tmp_path, shard=3))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"kava: error: {stage_inputs / 'train.parquet'}: rows [480, 160) are outside its 160 rows")
    result = run_stage(stage_command(stage_inputs, tmp_path, layers=[0, 9]))
    assert result.returncode == 2 and "precompute.layers [9] out of range" in result.stderr
    assert not list(tmp_path.iterdir())


def test_stage_stores_logits_only_when_asked(stage_inputs, tmp_path):
    # The stage never sees the student: a teacher's top-k logits are its own, whatever its
    # tokenizer, and training decides how to distil them (kava.losses.kd_kind).
    command = stage_command(stage_inputs, tmp_path / "plain", logits_k=4, logits_dtype="bf16")
    assert run_stage(command).returncode == 0
    assert json.loads((tmp_path / "plain" / "info.json").read_text())["logits"] is None
    result = run_stage([*stage_command(stage_inputs, tmp_path / "kd", logits_k=4,
                                       logits_dtype="bf16"), "--logits"])
    assert result.returncode == 0, result.stderr
    info = json.loads((tmp_path / "kd" / "info.json").read_text())
    card = json.loads((stage_inputs / "card.json").read_text())
    assert info["logits"] == logits_spec(4, "bf16", load_model(card).config.vocab_size)


def test_kd_teachers_are_the_kd_arms_and_need_stored_logits():
    config = {"teachers": ["a", "b"], "precompute": {"logits_k": 64}, "train": {"kd_weight": 0.0,
              "teachers": None}, "arms": {"ce": {}, "kd": {"kd_weight": 1.0, "teachers": ["b"]}}}
    assert kd_teachers(config) == ["b"]
    config["arms"]["kv_kd"] = {"kd_weight": 0.5}
    assert kd_teachers(config) == ["a", "b"]
    config["precompute"]["logits_k"] = 0
    with pytest.raises(KavaError, match="arms.kd: kd_weight 1.0 distils stored logits, but "
                                        "precompute.logits_k is 0"):
        kd_teachers(config)


# ---- the real default teachers ----------------------------------------------------------------

def test_real_teachers_on_a_few_examples(real_cards, tmp_path):
    from test_data import GSM8K

    if (GSM8K / "test.jsonl").is_file():
        lines = (GSM8K / "test.jsonl").read_text().splitlines()[:2]
        rows = [{"id": f"gsm8k-test-{i:05d}", **json.loads(line)} for i, line in enumerate(lines)]
        for row in rows:
            row["text"] = f"Question: {row['question']}\nAnswer: {row['answer']}"
    else:
        rows = synthetic_rows(2)
    expected_shapes = {"smollm2": (3, 64), "gemma3": (1, 256)}
    for name, card in real_cards.items():
        last = card["num_layers"] - 1
        store = KVStore(build_store(card, rows, tmp_path / name, layers=[0, last], dtype="fp32",
                                    per_shard=2, max_length=512))
        assert store.kv_shape == expected_shapes[name] and store.layers == [0, last]
        model = load_model(card)
        tokenizer = load_tokenizer(card["dir"])
        for i, row in enumerate(rows):
            example = store.example(i)
            assert example["input_ids"].tolist() == tokenizer(row["text"])["input_ids"]
            spans = example["char_spans"]
            if name == "gemma3":  # BOS first, with an empty span
                assert example["input_ids"][0] == tokenizer.bos_token_id and spans[0].tolist() == [0, 0]
            assert spans[-1, 1] == len(row["text"])
            hidden = hidden_states(model, example["input_ids"])
            for layer in store.layers:
                k, v = hand_kv(model, example["input_ids"], layer, hidden)
                torch.testing.assert_close(example["k"][layer], k, atol=1e-4, rtol=1e-3)
                torch.testing.assert_close(example["v"][layer], v, atol=1e-4, rtol=1e-3)


# ---- stored top-k logits ---------------------------------------------------------------------

def test_stored_top_k_logits_equal_hand_computation(tiny_card, tmp_path):
    card = tiny_card("llama")
    model = load_model(card)
    spec = logits_spec(8, "fp32", model.config.vocab_size)
    assert spec["ids"] == "uint16"
    store = KVStore(build_store(card, synthetic_rows(5), tmp_path, dtype="fp32", batch_tokens=400,
                                layers=[0], logits=spec))
    assert store.manifest["logits"] == spec
    for i in range(len(store)):
        example = store.example(i)
        with torch.no_grad():
            logits = model(example["input_ids"][None]).logits[0].double()
        probs = logits.softmax(-1)
        order = probs.argsort(dim=-1, descending=True)[:, :8]
        torch.testing.assert_close(example["top_ids"], order)
        top = probs.gather(-1, order)
        torch.testing.assert_close(example["top_logp"].double(), top.log(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(example["tail_logp"].double(), (1 - top.sum(-1)).log(),
                                   atol=1e-5, rtol=1e-4)
    # The KV is the same as without logits: only the forward's extent differs.
    plain = KVStore(build_store(card, synthetic_rows(5), tmp_path / "plain", dtype="fp32",
                                batch_tokens=400, layers=[0]))
    assert plain.logits is None and "top_ids" not in plain.example(0)
    torch.testing.assert_close(plain.example(2)["k"][0], store.example(2)["k"][0])


def test_logit_store_round_trips_its_compact_dtypes(tiny_card, tmp_path):
    card = tiny_card("llama")
    spec = logits_spec(4, "bf16", 300)
    manifest = build_store(card, synthetic_rows(3), tmp_path, layers=[1], logits=spec)
    example = KVStore(manifest).example(1)
    assert example["top_logp"].dtype == torch.bfloat16 and example["top_ids"].dtype == torch.int64
    assert example["tail_logp"].dtype == torch.float32
    assert bool((example["top_logp"][:, :-1] >= example["top_logp"][:, 1:]).all())
    assert logits_spec(64, "bf16", 262144)["ids"] == "int32"
    # bytes per token of the logits: k·(2 + 2) + 4 at bf16 and uint16 ids.
    layout = logits_layout(10, logits_spec(64, "bf16", 49152))
    assert sum(d.itemsize * math.prod(s) for d, s in layout.values()) / 10 == 260


def test_forward_kv_logits_runs_the_whole_model(tiny_card):
    model = load_model(tiny_card("llama"))
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        kv, logits = forward_kv_logits(model, ids, torch.ones_like(ids), [0])
        torch.testing.assert_close(logits, model(ids).logits)
        torch.testing.assert_close(kv[0][0], forward_kv(model, ids, torch.ones_like(ids), [0])[0][0])
