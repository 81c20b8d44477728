"""The batching engine's fast path for LLaMA-family models: its own decode step, packed weights.

`DecodeStep` runs one decode step (one new token per running request) over the model's modules
directly. transformers' forward does the same arithmetic but, per step, builds a 4D mask and the
rotary angles in every layer and sends attention through PyTorch's fused CPU kernel, which is
several times slower in bf16 for a single query row. Here the mask and rotary angles are built
once per step, and attention is the plain multiply, fp32 softmax and multiply that transformers'
eager path computes, over the engine's own KV cache (`kv_cache.py`) with grouped query heads (no repeated key/value
heads).

`PackedLinear` holds a linear layer's weight in oneDNN's blocked layout for CPU inference, the
larger gain (see the class); `pack_linear_weights` swaps it in for every projection of a model the
caller owns.

The norms, rotary embedding, activation and projections are the model's own modules, so greedy
answers match transformers' forward in fp32 (in bf16, within bf16 rounding);
`tests/test_decode_step.py` checks tokens and logprobs against it. Models outside the family, or
whose layers are not plain `nn.Linear` (a LoRA adapter left unmerged, a 4-bit base), get neither
and run transformers' forward; `unsupported_reason` says why.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# Architectures whose decoder layer is exactly: RMSNorm, q/k/v/o attention with rotary positions
# (optional q/k/v bias), RMSNorm, gated MLP. Qwen3 (per-head q/k norms), Gemma (scaled embeddings,
# extra norms) and the others differ and use transformers' forward.
FAMILY = {"llama", "mistral", "qwen2"}


def unsupported_reason(model: Any) -> str | None:
    """Why `DecodeStep` cannot run this model (None when it can)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILY:
        return f"model type {model_type!r} is not one of {sorted(FAMILY)}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} is not silu"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1 splits the projections"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return "the model is not a plain causal LM (an unmerged adapter wraps it)"
    linears = [model.lm_head]
    for layer in inner.layers:
        attention, mlp = layer.self_attn, layer.mlp
        if any(hasattr(attention, name) for name in ("q_norm", "k_norm")):
            return "the attention normalises queries and keys"
        linears += [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj]
        linears += [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    for linear in linears:
        if isinstance(linear, PackedLinear):
            continue
        if type(linear) is not torch.nn.Linear:
            return f"{type(linear).__name__} layers (adapters or quantization) are not plain Linear"
        if not linear.weight.dtype.is_floating_point:
            return "quantized weights"
    return None


class DecodeStep:
    """`step(token_ids, positions, mask, cache)` -> next-token logits; see the module docstring."""

    def __init__(self, model: Any) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"no decode step for this model: {reason}")
        self.model = model
        config = model.config
        self.inner = model.model
        self.head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.scaling = self.inner.layers[0].self_attn.scaling

    def step(
        self, token_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        """Logits [batch, vocab] for one new token per row.

        token_ids and positions: [batch, 1]; mask: [batch, cached length + 1], 1 where a row has a
        real token (the new one included); cache: the engine's `KVCache`, one slab per decoder
        layer, appended to in place.
        """
        batch = token_ids.shape[0]
        hidden = self.inner.embed_tokens(token_ids)  # [batch, 1, hidden]
        cos, sin = self.inner.rotary_emb(hidden, positions)  # [batch, 1, head_dim]
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        # Additive mask over the cached length, [batch, 1, 1, length]: 0 to attend, min to skip.
        bias = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device)
        bias = bias.masked_fill_(mask == 0, torch.finfo(hidden.dtype).min)[:, None, None, :]
        # Each key/value head serves `group` consecutive query heads: [batch, kv, group, dim].
        grouped = (batch, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
        half = self.head_dim // 2
        for layer, cache_layer in zip(self.inner.layers, cache.layers, strict=True):
            attention, mlp = layer.self_attn, layer.mlp
            normed = layer.input_layernorm(hidden)
            q = attention.q_proj(normed).view(batch, self.heads, 1, self.head_dim)
            k = attention.k_proj(normed).view(batch, self.kv_heads, 1, self.head_dim)
            v = attention.v_proj(normed).view(batch, self.kv_heads, 1, self.head_dim)
            q = q * cos + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin
            k = k * cos + torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin
            keys, values = cache_layer.update(k, v)
            # Attention as transformers' eager path computes it (scores in the model's dtype,
            # softmax in fp32): PyTorch's fused CPU attention is several times slower in bf16
            # for a single query row. The keys are copied out of the slab first: a batched
            # multiply by a transposed, strided view takes a slow path (3x the copy and multiply).
            keys = keys.contiguous()
            scores = torch.matmul(q.view(grouped), keys.transpose(-1, -2)) * self.scaling
            weights = (scores + bias).softmax(dim=-1, dtype=torch.float32).to(values.dtype)
            attended = torch.matmul(weights, values).view(batch, 1, -1)
            hidden = hidden + attention.o_proj(attended)
            normed = layer.post_attention_layernorm(hidden)
            hidden = hidden + mlp.down_proj(F.silu(mlp.gate_proj(normed)) * mlp.up_proj(normed))
        return self.model.lm_head(self.inner.norm(hidden[:, -1]))


class PackedLinear(torch.nn.Module):
    """A linear layer whose weight is held in oneDNN's blocked layout, for CPU inference.

    PyTorch's CPU matrix multiply reads a row-major weight as it is; oneDNN's packed layout lets
    it stream the weight once per call at the vector units' width. At the decode step's few rows
    this is 1.4-2.4x faster in bf16 and fp32 on this machine (`benchmarks/serve_vs_vllm.py` shows
    what it gives end to end). The plain weight is dropped, so the model holds no weight twice.
    """

    def __init__(self, linear: torch.nn.Linear, rows_hint: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(inputs, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def packing_unavailable_reason(model: Any) -> str | None:
    """Why the model's linear weights cannot be packed for oneDNN (None when they can)."""
    reason = unsupported_reason(model)
    if reason is not None:
        return reason
    weight = model.model.embed_tokens.weight
    if weight.device.type != "cpu":
        return f"the model is on {weight.device.type}, not the CPU"
    if weight.dtype not in (torch.float32, torch.bfloat16):
        return f"{weight.dtype} weights"
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN"
    return None


def pack_linear_weights(model: Any, rows_hint: int = 8) -> None:
    """Replace the decoder's and the output head's linear layers with `PackedLinear`, in place.

    Only for inference: the packed layers have no gradient and no `.weight` (a tied output head
    keeps its embedding, which now holds its own copy). Call after any adapter is merged.
    """
    reason = packing_unavailable_reason(model)
    if reason is not None:
        raise ValueError(f"cannot pack this model's weights: {reason}")
    for layer in model.model.layers:
        for parent, names in (
            (layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
            (layer.mlp, ("gate_proj", "up_proj", "down_proj")),
        ):
            for name in names:
                _pack(parent, name, rows_hint)
    _pack(model, "lm_head", rows_hint)


def _pack(parent: torch.nn.Module, name: str, rows_hint: int) -> None:
    linear = getattr(parent, name)
    if not isinstance(linear, PackedLinear):
        setattr(parent, name, PackedLinear(linear, rows_hint))
