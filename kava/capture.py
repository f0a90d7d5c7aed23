"""Capture a decoder's per-layer K and V from one forward pass, without the lm_head.

Layout of everything returned: `[B, T, H_kv, D]`.

- `pre_rope` keys come from hooks on the key projection (phi3: the K slice of its fused
  qkv_proj), normalised by the layer's own k_norm where the architecture has one (qwen3, gemma3). Gemma3 applies k_norm after the
  head transpose and qwen3 before; k_norm acts on the last dim only, so applying the module to
  the projection output is the same computation in either order.
- `post_rope` keys are what the attention caches. They are read from a `DynamicCache()` built
  without the model config: that cache keeps every layer at full length, whereas the model's
  default cache truncates sliding-window layers to their window.

forward_kv stops the forward once the last requested layer's K and V exist: that layer's
attention output and MLP, any later layers and the final norm would be computed for nothing.
forward_kv_logits, for a teacher whose logits are stored too, runs the whole model.
"""

from contextlib import contextmanager, nullcontext

import torch

from kava.config import schema_enum
from kava.errors import KavaError

KEY_SPACES = schema_enum("key_space")


def decoder_layers(model):
    """The decoder layer list of a *ForCausalLM of a supported family (or its base model)."""
    return getattr(model, "model", model).layers


def attention_shape(attention):
    """(num KV heads, head_dim) as the attention module really computes them."""
    head_dim = attention.head_dim
    if hasattr(attention, "qkv_proj"):
        return attention.num_key_value_heads, head_dim
    return attention.k_proj.out_features // head_dim, head_dim


def _fused_kv_hook(attention, index, n_heads, head_dim, captured):
    """phi3's one qkv_proj: K and V are slices of its output, [Q | K | V] along the last dim,
    split exactly as Phi3Attention.forward splits them, before RoPE."""
    start = attention.config.num_attention_heads * head_dim
    size = n_heads * head_dim

    def keep_kv(module, inputs, output):
        shape = (*output.shape[:-1], n_heads, head_dim)
        captured[index] = {"k": output[..., start:start + size].reshape(shape),
                           "v": output[..., start + size:start + 2 * size].reshape(shape)}

    return attention.qkv_proj.register_forward_hook(keep_kv)


@contextmanager
def pre_rope_hooks(model, layers):
    """Record `{layer: (k, v)}` pre-RoPE from every forward run inside the block."""
    captured = {}
    handles = []
    modules = decoder_layers(model)
    for index in layers:
        attention = modules[index].self_attn
        n_heads, head_dim = attention_shape(attention)
        if hasattr(attention, "qkv_proj"):
            handles.append(_fused_kv_hook(attention, index, n_heads, head_dim, captured))
            continue

        def keep_k(module, inputs, output, index=index, attention=attention,
                   n_heads=n_heads, head_dim=head_dim):
            keys = output.view(*output.shape[:-1], n_heads, head_dim)
            k_norm = getattr(attention, "k_norm", None)
            captured.setdefault(index, {})["k"] = k_norm(keys) if k_norm is not None else keys

        def keep_v(module, inputs, output, index=index, n_heads=n_heads, head_dim=head_dim):
            captured.setdefault(index, {})["v"] = output.view(*output.shape[:-1], n_heads, head_dim)

        handles.append(attention.k_proj.register_forward_hook(keep_k))
        handles.append(attention.v_proj.register_forward_hook(keep_v))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class _Enough(Exception):
    """Raised by stop_after's hook: everything forward_kv returns has been computed."""


@contextmanager
def stop_after(module):
    """End any forward run inside the block as soon as `module` has returned."""
    def stop(module, inputs, output):
        raise _Enough

    handle = module.register_forward_hook(stop)
    try:
        yield
    except _Enough:
        pass
    finally:
        handle.remove()


@contextmanager
def capturing_kv(model, layers, key_space):
    """The one way K and V are captured: yields (the keyword arguments the forward run inside
    the block must get, `{layer: (k, v)}`), the latter filled, `[B, T, H, D]`, once the block
    ends."""
    from transformers import DynamicCache

    if key_space not in KEY_SPACES:
        raise KavaError(f"key_space '{key_space}' is not one of {', '.join(KEY_SPACES)}")
    kv = {}
    if key_space == "post_rope":
        # Post-RoPE keys are what the attention caches; a config-less DynamicCache keeps every
        # layer at full length (the model's own cache would truncate sliding-window layers).
        cache = DynamicCache()
        yield {"use_cache": True, "past_key_values": cache}, kv
        kv.update({layer: (cache.layers[layer].keys.transpose(1, 2),
                           cache.layers[layer].values.transpose(1, 2)) for layer in layers})
        return
    with pre_rope_hooks(model, layers) as captured:
        yield {"use_cache": False}, kv
    kv.update({layer: (captured[layer]["k"], captured[layer]["v"]) for layer in layers})


def forward_kv(model, input_ids, attention_mask, layers, key_space="pre_rope"):
    """The decoder body's forward up to the last of `layers` (no lm_head, no logits):
    `{layer: (k, v)}`, [B,T,H,D]."""
    return _capture(model, input_ids, attention_mask, layers, key_space, logits=False)[0]


def forward_kv_logits(model, input_ids, attention_mask, layers, key_space="pre_rope"):
    """The whole model's forward: (forward_kv's `{layer: (k, v)}`, logits [B, T, V])."""
    return _capture(model, input_ids, attention_mask, layers, key_space, logits=True)


def _capture(model, input_ids, attention_mask, layers, key_space, logits):
    n_layers = len(decoder_layers(model))
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise KavaError(f"layers {bad} out of range for a model with {n_layers} layers")
    last = decoder_layers(model)[max(layers)].self_attn
    # The body alone, stopped at the last stored layer, unless the logits are wanted.
    # post_rope: the cache is filled inside the attention, before its output projection.
    # pre_rope: stop_after is registered after the capture hooks, so it runs after them on the
    # last V projection (K is projected before V in every supported family; phi3 projects both
    # at once).
    stop_at = last if key_space == "post_rope" else getattr(last, "qkv_proj", None) or last.v_proj
    with capturing_kv(model, layers, key_space) as (forward_args, kv):
        with nullcontext() if logits else stop_after(stop_at):
            output = (model if logits else model.model)(
                input_ids=input_ids, attention_mask=attention_mask, **forward_args)
    return kv, output.logits if logits else None


def student_forward(model, batch, key_space, ce_items=None):
    """One student forward: the model's outputs (with the answer CE when batch.labels is set)
    and its K, V per layer, `[B, T, H, D]`, in the store's key space, with autograd.

    ce_items: answer tokens of the whole (accumulated, all-GPU) batch: the CE is this
    micro-batch's summed token loss divided by it, so micro-batches weigh by tokens."""
    layers = range(len(decoder_layers(model)))
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if ce_items is not None:
        kwargs.update(labels=batch.labels, num_items_in_batch=max(int(ce_items), 1))
    else:
        kwargs["logits_to_keep"] = 1  # no CE: skip the LM head over the whole sequence
    with capturing_kv(model, layers, key_space) as (forward_args, kv):
        outputs = model(**kwargs, **forward_args)
    return outputs, [kv[i] for i in layers]


def cache_kv(model, input_ids, attention_mask):
    """The model's own default cache after one forward, as the runtime would build it
    (sliding-window layers truncated). Used to report what the KV cache really looks like."""
    with torch.inference_mode():
        output = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
    return output.past_key_values
