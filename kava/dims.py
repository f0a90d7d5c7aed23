"""What a model's KV cache really looks like, from a real forward pass.

The user's earlier system guessed KV widths from hidden_size and confused GQA with quantisation; here
every number comes from the tensors the model actually cached, and each way the declared
config differs from them is spelled out.
"""

from kava.capture import attention_shape, cache_kv, decoder_layers
from kava.errors import KavaError

PROBE_TEXT = "Question: Natalia sold 48 clips in April and half as many in May. How many in all?"


def declared(config):
    heads = config.num_attention_heads
    return {
        "hidden_size": config.hidden_size,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None),
    }


def _mismatches(decl, n_kv_heads, head_dim, layer_kinds, config):
    notes = []
    heads, hidden = decl["num_attention_heads"], decl["hidden_size"]
    if n_kv_heads != heads:
        notes.append(
            f"GQA: {n_kv_heads} KV heads serve {heads} query heads (groups of "
            f"{heads // n_kv_heads}), so each layer's K and V are {n_kv_heads}x{head_dim}="
            f"{n_kv_heads * head_dim} wide, not hidden_size {hidden}; this is grouping, "
            f"not quantisation")
    if head_dim * heads != hidden:
        notes.append(
            f"explicit head_dim: {head_dim} differs from hidden_size/num_attention_heads = "
            f"{hidden}/{heads} = {hidden / heads:g}")
    if decl["num_key_value_heads"] != n_kv_heads:
        notes.append(f"config declares num_key_value_heads {decl['num_key_value_heads']} "
                     f"but the cache holds {n_kv_heads}")
    if decl["head_dim"] is not None and decl["head_dim"] != head_dim:
        notes.append(f"config declares head_dim {decl['head_dim']} but the cache holds {head_dim}")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        expected = ["sliding" if t == "sliding_attention" else "full" for t in layer_types]
        actual = [layer["kind"] for layer in layer_kinds]
        if expected != actual:
            notes.append(f"config layer_types {expected} differ from the cache's {actual}")
    return notes


def detect_dims(model, tokenizer, name, probe_text=PROBE_TEXT):
    """Run one short forward and describe each layer's cached K and V."""
    encoded = tokenizer(probe_text, return_tensors="pt")
    device = next(model.parameters()).device
    cache = cache_kv(model, encoded["input_ids"].to(device),
                     encoded["attention_mask"].to(device))
    modules = decoder_layers(model)
    layers = []
    for index, cached in enumerate(cache.layers):
        keys, values = cached.keys, cached.values
        sliding = bool(getattr(cached, "is_sliding", False))
        layer = {"index": index, "kind": "sliding" if sliding else "full"}
        if sliding:
            layer["window"] = cached.sliding_window
        layer.update({
            "k_shape": [keys.shape[1], keys.shape[3]],
            "v_shape": [values.shape[1], values.shape[3]],
            "dtype": str(keys.dtype).removeprefix("torch."),
            "module_kv_shape": list(attention_shape(modules[index].self_attn)),
        })
        layers.append(layer)
    n_kv_heads, head_dim = layers[0]["k_shape"]
    if any(layer["k_shape"] != [n_kv_heads, head_dim] or layer["v_shape"] != [n_kv_heads, head_dim]
           for layer in layers):
        raise KavaError(f"model '{name}': KV shapes differ across layers: "
                         f"{[layer['k_shape'] for layer in layers]}")
    decl = declared(model.config)
    kv_dim_per_layer = n_kv_heads * head_dim
    return {
        "model": name,
        "architecture": model.config.model_type,
        "num_layers": len(layers),
        "vocab_size": model.config.vocab_size,
        "num_kv_heads": n_kv_heads,
        "head_dim": head_dim,
        # Width of K (and equally of V) per layer; the total is what the earlier system called
        # 7168 for Qwen2.5-1.5B (28 layers x 2 KV heads x 128).
        "kv_dim_per_layer": kv_dim_per_layer,
        "kv_dim_total": kv_dim_per_layer * len(layers),
        "num_sliding_layers": sum(layer["kind"] == "sliding" for layer in layers),
        "probe_tokens": int(encoded["input_ids"].shape[1]),
        "param_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "quantized": getattr(model, "is_loaded_in_4bit", False),
        "config_declared": decl,
        "mismatches": _mismatches(decl, n_kv_heads, head_dim, layers, model.config),
        "layers": layers,
    }

