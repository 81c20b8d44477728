"""Model FLOPs per trained token and model FLOPs utilisation (MFU), for LLaMA-architecture models.

Model FLOPs per trained token (N_mm: every weight that multiplies, the vocabulary projection
included, the embedding lookup not; L layers; d = heads x head_dim; l = the example's length;
recomputation under gradient checkpointing is not counted, as MFU requires):
- full fine-tuning: 6 N_mm (forward 2, backward 4) + 12 L d l (attention scores and values);
- LoRA / QLoRA: 4 N_mm (forward 2 + input gradients 2; frozen weights need no weight gradient)
  + 6 N_adapter + 12 L d l.
Corral projects onto the vocabulary only where a token is trained, so it does a little less work
than this counts. MFU = tokens/s x FLOPs per token / the peak FLOP/s of the hardware.

One model for every caller (the training benchmarks, the GPU check), so their figures agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Architecture:
    """The numbers of a LLaMA-architecture config that memory and FLOPs depend on."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Architecture:
        """From a model's config.json, as a dict."""
        needed = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
        missing = [key for key in (*needed, "num_attention_heads") if not config.get(key)]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        heads = int(config["num_attention_heads"])
        return cls(
            vocab=int(config["vocab_size"]),
            hidden=int(config["hidden_size"]),
            intermediate=int(config["intermediate_size"]),
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
            tied=bool(config.get("tie_word_embeddings", False)),
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of every linear layer of one decoder layer."""
        h, q, kv, i = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.intermediate,
        )
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    @property
    def quantized_params(self) -> int:
        """What NF4 quantizes: the decoder layers' linear weights."""
        return self.layers * self.layer_linear_params

    @property
    def unquantized_params(self) -> int:
        """Embeddings, the untied lm_head and the norms: kept in fp32 under QLoRA."""
        head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + head + (2 * self.layers + 1) * self.hidden

    @property
    def parameters(self) -> int:
        return self.quantized_params + self.unquantized_params

    @property
    def matmul_params(self) -> int:
        """Weights that multiply per token: the layers' linears and the vocabulary projection."""
        return self.quantized_params + self.vocab * self.hidden

    def lora_params(self, rank: int, targets: list[str]) -> int:
        """Parameters of a LoRA adapter of `rank` on the named linear layers (or all-linear)."""
        shapes = self.linear_shapes()
        names = list(shapes) if [t.lower() for t in targets] == ["all-linear"] else targets
        return self.layers * sum(rank * sum(shapes[name]) for name in names if name in shapes)


def flops_per_token(
    arch: Architecture, *, method: str, adapter_params: int, context: float
) -> dict[str, Any]:
    """Model FLOPs per trained token (see the module docstring), at mean attention context l."""
    attention = 12 * arch.layers * arch.heads * arch.head_dim * context
    if method == "full":
        weights, formula = 6 * arch.matmul_params, "6*N_mm + 12*L*d*l"
    else:
        weights = 4 * arch.matmul_params + 6 * adapter_params
        formula = "4*N_mm + 6*N_adapter + 12*L*d*l"
    return {
        "formula": formula,
        "N_mm": arch.matmul_params,
        "N_adapter": adapter_params if method != "full" else 0,
        "L": arch.layers,
        "d": arch.heads * arch.head_dim,
        "l": round(context, 1),
        "flops_per_token": weights + attention,
        "six_n_flops_per_token": 6 * arch.parameters,
    }
