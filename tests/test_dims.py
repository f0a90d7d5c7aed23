"""dims reports what the cache really holds, for every supported family and the real models."""

import pytest

from kava.dims import detect_dims
from kava.errors import KavaError
from kava.models import load_model, load_tokenizer


def dims_of(card):
    return detect_dims(load_model(card), load_tokenizer(card["dir"]), card["name"])


@pytest.mark.parametrize("architecture, layers, heads, head_dim", [
    ("llama", 4, 2, 16), ("mistral", 2, 2, 16), ("phi3", 2, 2, 16), ("qwen2", 3, 2, 16),
    ("qwen3", 4, 3, 16), ("gemma3_text", 4, 1, 32)])
def test_dims_of_each_family(tiny_card, architecture, layers, heads, head_dim):
    dims = dims_of(tiny_card(architecture))
    assert (dims["num_layers"], dims["num_kv_heads"], dims["head_dim"]) == (layers, heads, head_dim)
    assert all(layer["k_shape"] == layer["v_shape"] == [heads, head_dim] for layer in dims["layers"])
    assert dims["kv_dim_per_layer"] == heads * head_dim
    assert dims["kv_dim_total"] == layers * heads * head_dim
    assert any(note.startswith("GQA") for note in dims["mismatches"])


def test_gemma3_sliding_layers_and_explicit_head_dim(tiny_card):
    dims = dims_of(tiny_card("gemma3_text"))
    kinds = [(layer["kind"], layer.get("window")) for layer in dims["layers"]]
    assert kinds == [("sliding", 8)] * 3 + [("full", None)]
    assert any("explicit head_dim: 32" in note for note in dims["mismatches"])


def test_mistral_sliding_window_is_every_layer(tiny_card):
    dims = dims_of(tiny_card("mistral"))
    assert [(layer["kind"], layer.get("window")) for layer in dims["layers"]] == [("sliding", 8)] * 2


def test_llama_without_gqa_has_no_mismatch(tiny_card):
    dims = dims_of(tiny_card("llama", num_key_value_heads=4))
    assert dims["mismatches"] == []


def test_quantised_teacher_dims(tiny_card):
    card = dict(tiny_card("qwen2"), quantize="nf4")
    dims = dims_of(card)
    assert dims["quantized"] is True and dims["num_kv_heads"] == 2


def test_unsupported_architecture_at_load(tiny_card, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(KavaError, match="unsupported architecture 'gpt2'"):
        load_model({"name": "g", "dir": str(tmp_path), "quantize": "none"})


def test_real_default_models_match_the_design_facts(real_cards):
    smol = dims_of(real_cards["smollm2"])
    assert smol["num_layers"] == 30 and smol["num_sliding_layers"] == 0
    assert {tuple(layer["k_shape"]) for layer in smol["layers"]} == {(3, 64)}
    assert smol["config_declared"]["num_attention_heads"] == 9 and smol["vocab_size"] == 49152

    gemma = dims_of(real_cards["gemma3"])
    assert gemma["num_layers"] == 18 and gemma["num_sliding_layers"] == 15
    assert {tuple(layer["k_shape"]) for layer in gemma["layers"]} == {(1, 256)}
    assert {layer.get("window") for layer in gemma["layers"] if layer["kind"] == "sliding"} == {512}
    assert gemma["vocab_size"] == 262144
