"""Capture a decoder's per-layer K and V from one forward pass, with the lm_head run only
where logits are read.

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
student_forward, the training forward, runs the lm_head only at the positions its losses read.
"""

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kava.batching import IGNORE_INDEX
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


class PositionLogits:
    """The LM head's logits at some positions of a `[B, T]` batch only: indexed with a `[B, T]`
    bool mask of computed positions, it gives the `[n, V]` rows a full `[B, T, V]` logits tensor
    would, so the losses read it as they would read that tensor."""

    def __init__(self, values, computed):
        self.values = values  # [n computed, V]
        self.index = torch.full(computed.shape, -1, dtype=torch.long, device=computed.device)
        self.index[computed] = torch.arange(int(computed.sum()), device=computed.device)

    def __getitem__(self, mask):
        rows = self.index[mask]
        if bool((rows < 0).any()):
            raise KavaError("logits read at a position the LM head was not run on")
        if len(rows) == len(self.values):
            # Every computed position, in the order they were computed (both row-major): the
            # values themselves. Gathering them would copy [n, V] logits, and its backward
            # scatter into [n, V] zeros, at every step of an arm whose one loss reads them all
            # (ce and kv: the answer CE; kd: the KD positions, which hold the CE's).
            return self.values
        return self.values[rows]


def head_logits(model, hidden):
    """The causal LM's own head on hidden states `[..., H]`: its output embedding, then the
    final logit soft-capping of the families that have it (gemma3), as its forward applies."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


@dataclass
class StudentOutputs:
    ce: torch.Tensor | None   # this micro-batch's share of the step's answer CE, or None
    logits: PositionLogits    # at the answer-CE positions and every `logit_masks` position
    kv: list                  # per layer (K, V), [B, T, H, D]


def student_forward(model, batch, key_space, ce_items=None, logit_masks=()):
    """One student forward with autograd: its K, V per layer in the store's key space, the
    answer CE when `ce_items` is given, and its logits where the losses read them.

    The LM head runs only at the positions a loss reads (the answer tokens' predictors, each of
    `logit_masks` `[B, T]`), not over prompts and padding: it is as large as the rest of a
    small student, so this is most of a step's saving. ce_items: answer tokens of the whole
    (accumulated, all-GPU) batch; the CE is this micro-batch's summed token loss divided by it
    (transformers' causal-LM loss with num_items_in_batch), so micro-batches weigh by tokens."""
    layers = range(len(decoder_layers(model)))
    with capturing_kv(model, layers, key_space) as (forward_args, kv):
        hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             **forward_args).last_hidden_state
    masks = list(logit_masks)
    if ce_items is not None:
        # The logits at column t predict the token at t + 1.
        targets = F.pad(batch.labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        ce_positions = targets.ne(IGNORE_INDEX)
        masks.append(ce_positions)
    computed = (torch.stack(masks).any(dim=0) if masks
                else torch.zeros(batch.input_ids.shape, dtype=torch.bool,
                                 device=batch.input_ids.device))
    logits = PositionLogits(head_logits(model, hidden[computed]), computed)
    ce = None
    if ce_items is not None:
        ce = F.cross_entropy(logits[ce_positions].float(), targets[ce_positions],
                             reduction="sum") / max(int(ce_items), 1)
    return StudentOutputs(ce, logits, [kv[i] for i in layers])


def cache_kv(model, input_ids, attention_mask):
    """The model's own default cache after one forward, as the runtime would build it
    (sliding-window layers truncated). Used to report what the KV cache really looks like."""
    with torch.inference_mode():
        output = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
    return output.past_key_values
