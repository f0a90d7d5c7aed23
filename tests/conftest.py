"""Shared fixtures: tiny random models from real architecture configs, saved with
save_pretrained and loaded back through the real loading code; and the real default models."""

import os
from pathlib import Path

import pytest
import yaml

from kava.models import materialize

PROJECT = Path(__file__).resolve().parents[1]

# Small but shaped like the real families: GQA everywhere, explicit head_dim where the family
# has one, and a gemma3 sliding window short enough for tests to exceed it.
TINY = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "qwen3": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=6, num_key_value_heads=3, head_dim=16,
                  max_position_embeddings=512),
    # llama-like with a sliding window (one for every layer) short enough to exceed.
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                    max_position_embeddings=512),
    # One fused qkv_proj per layer.
    "phi3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "gemma3_text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                        sliding_window=8, max_position_embeddings=512,
                        layer_types=["sliding_attention"] * 3 + ["full_attention"]),
}


def tiny_spec(architecture, seed=0, **overrides):
    return {"random": {"architecture": architecture, "seed": seed,
                       **TINY[architecture], **overrides}}


@pytest.fixture(scope="session")
def tiny_card(tmp_path_factory):
    """tiny_card(architecture, **overrides) → card of a materialised tiny random model."""
    built = {}

    def make(architecture, seed=0, **overrides):
        key = (architecture, seed, tuple(sorted(overrides.items(), key=str)))
        if key not in built:
            name = f"tiny_{architecture}_{len(built)}"
            out = tmp_path_factory.mktemp("models") / name
            built[key] = materialize(name, tiny_spec(architecture, seed, **overrides), out)
        return built[key]

    return make


@pytest.fixture(scope="session")
def real_cards(tmp_path_factory):
    """Cards of the real teachers the shipped configs name (GGUF from PyPI packages), built once.

    Set KAVA_TEST_MODELS to a folder to keep them between test sessions."""
    specs = {}
    for path in sorted((PROJECT / "config").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        # An overlay such as five_seeds.yaml, given after a study's config, names no teachers.
        specs.update({name: config["models"][name] for name in config.get("teachers", ())
                      if "gguf" in config["models"][name]})
    root = Path(os.environ.get("KAVA_TEST_MODELS") or tmp_path_factory.mktemp("real"))
    cards = {}
    for name, spec in specs.items():
        out = root / name
        cards[name] = (materialize(name, {"path": str(out)}, None) if (out / "config.json").exists()
                       else materialize(name, spec, out))
        cards[name]["source"] = {"gguf": spec["gguf"]}
    return cards
