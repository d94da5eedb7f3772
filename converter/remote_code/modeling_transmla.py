"""TransMLA model for transformers (``trust_remote_code=True``).

A converted LLaMA / Qwen2 / Mistral / Qwen3 checkpoint in DeepSeek-V3 dense layout, served by
plain torch code so it can be evaluated and fine-tuned without vLLM. It differs from stock DeepSeek
code exactly where converted checkpoints differ: no latent RMSNorm (the source model had none, and
RMSNorm does not commute with the conversion), optional q / kv_a biases (Qwen2), tied embeddings,
the source's rope scaling law applied to an r-dim interleaved (GPT-J) rope, and for Qwen3 its
per-head q/k RMSNorm kept in front of linear maps to the converted query and latent. Qwen3-MoE
keeps its mixture-of-experts MLPs and routing (``transmla.mlp``), not DeepSeek's.

This file is copied verbatim next to every converted checkpoint; it must not import the
transmla_vllm package.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DeepseekV3Config, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

_SUPPORTED_ROPE = ("default", "linear", "llama3")


def causal_mask(
    seq: int, past: int, attention_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Additive mask [B or 1, 1, seq, past + seq]: causal, and padding masked out."""
    total = past + seq
    q_pos = torch.arange(past, total, device=device)
    k_pos = torch.arange(total, device=device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :total].bool()
    mask = torch.zeros(allowed.shape, dtype=torch.float32, device=device)
    return mask.masked_fill(~allowed, torch.finfo(torch.float32).min)


class TransMLARMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class TransMLARotary(nn.Module):
    """r-dim rope with the source model's theta and scaling law (transformers' own init).

    Frequencies are computed on first use, not in __init__: transformers builds models on the
    meta device and leaves non-persistent buffers uninitialised.
    """

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        rope_type = config.rope_parameters.get("rope_type", "default")
        if rope_type not in _SUPPORTED_ROPE:
            raise ValueError(
                f"rope_type {rope_type!r} is not supported (use one of {_SUPPORTED_ROPE})"
            )
        self.config = config
        self._inv_freq: torch.Tensor | None = None

    def inv_freq(self) -> torch.Tensor:
        if self._inv_freq is None:
            cfg = self.config
            rope_type = cfg.rope_parameters.get("rope_type", "default")
            if rope_type == "default":
                dim, base = cfg.qk_rope_head_dim, cfg.rope_parameters["rope_theta"]
                inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
            else:
                inv, _ = ROPE_INIT_FUNCTIONS[rope_type](cfg, device=torch.device("cpu"))
            self._inv_freq = inv.to(torch.float32)
        return self._inv_freq

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self.inv_freq().to(position_ids.device)
        freqs = position_ids[..., None].to(torch.float32) * inv
        return freqs.cos(), freqs.sin()


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (2m, 2m+1) by frequency m. x: [B, heads, T, r]; cos/sin: [B, T, r/2]."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.flatten(-2)


class HeadwiseLinear(nn.Module):
    """One (out x in) map per head, weight stored as (heads * out, in): [..., heads, in] ->
    [..., heads, out]. The normed attention's query map (per-head q norm comes before it)."""

    def __init__(self, heads: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.heads, self.out_features = heads, out_features
        self.weight = nn.Parameter(torch.empty(heads * out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.view(self.heads, self.out_features, -1)
        return torch.einsum("...hi,hoi->...ho", x, weight)


class TransMLAAttention(nn.Module):
    def __init__(self, config: DeepseekV3Config, layer_idx: int) -> None:
        super().__init__()
        tm = getattr(config, "transmla", None) or {}
        if tm.get("latent_norm", False):
            raise ValueError(
                "transmla.latent_norm=true is not supported: converted checkpoints "
                "carry no latent RMSNorm"
            )
        if config.q_lora_rank is not None:
            raise ValueError("q_lora_rank must be null for TransMLA checkpoints")
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.rank = config.kv_lora_rank
        self.rope_dim = config.qk_rope_head_dim
        self.nope_dim = config.qk_nope_head_dim
        self.v_dim = config.v_head_dim
        self.scaling = (self.nope_dim + self.rope_dim) ** -0.5
        hidden = config.hidden_size
        # per-head q/k RMSNorm sources (Qwen3): the source projections and norms stay, linear
        # maps follow them (format: transmla_vllm/checkpoint_format.py, normed attention)
        self.qk_norm = tm.get("qk_norm")
        if self.qk_norm:
            kv_heads, head_dim = self.qk_norm["num_kv_heads"], self.qk_norm["head_dim"]
            eps = self.qk_norm["eps"]
            self.head_dim = head_dim
            self.q_head_proj = nn.Linear(hidden, self.num_heads * head_dim, bias=False)
            self.q_norm = TransMLARMSNorm(head_dim, eps)
            self.q_head_map = HeadwiseLinear(
                self.num_heads, head_dim, self.nope_dim + self.rope_dim
            )
            self.k_head_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
            self.k_norm = TransMLARMSNorm(head_dim, eps)
            self.kv_a_key_map = nn.Linear(
                kv_heads * head_dim, self.rank + self.rope_dim, bias=False
            )
        else:
            self.q_proj = nn.Linear(
                hidden,
                self.num_heads * (self.nope_dim + self.rope_dim),
                bias=bool(tm.get("q_bias", False)),
            )
        self.kv_a_proj_with_mqa = nn.Linear(
            hidden, self.rank + self.rope_dim, bias=bool(tm.get("kv_a_bias", False))
        )
        self.kv_b_proj = nn.Linear(
            self.rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False
        )
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, hidden, bias=False)

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query [B, T, heads, nope + rope] and [latent; rope key] [B, T, rank + rope]."""
        if not self.qk_norm:
            q = self.q_proj(hidden_states)
            return q.unflatten(-1, (self.num_heads, -1)), self.kv_a_proj_with_mqa(hidden_states)
        q = self.q_norm(self.q_head_proj(hidden_states).unflatten(-1, (-1, self.head_dim)))
        k = self.k_norm(self.k_head_proj(hidden_states).unflatten(-1, (-1, self.head_dim)))
        kv_a = self.kv_a_proj_with_mqa(hidden_states) + self.kv_a_key_map(k.flatten(-2))
        return self.q_head_map(q), kv_a

    def forward(
        self,
        hidden_states: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        past_key_values: Cache | None,
    ) -> torch.Tensor:
        bsz, seq, _ = hidden_states.shape
        q, kv_a = self.project(hidden_states)
        q_nope, q_pe = q.transpose(1, 2).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_pe = kv_a.split([self.rank, self.rope_dim], -1)
        kv = self.kv_b_proj(latent).view(bsz, seq, self.num_heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        cos, sin = rope
        q_pe = apply_interleaved_rope(q_pe, cos, sin)
        k_pe = apply_interleaved_rope(k_pe[:, None], cos, sin).expand(-1, self.num_heads, -1, -1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe), dim=-1)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        # torch's fused attention keeps no [T, T] scores for the backward pass (heal trains
        # here); its flash kernels want one head size, so the values are zero-padded to the keys'
        if mask is not None:  # finite in every dtype, so a fully masked (padding) row stays finite
            mask = mask.to(q.dtype).clamp_min(torch.finfo(q.dtype).min)
        pad = q.shape[-1] - self.v_dim
        out = F.scaled_dot_product_attention(
            q,
            k,
            F.pad(v, (0, pad)) if pad > 0 else v,
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scaling,
        )[..., : self.v_dim]
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq, -1))


class TransMLAMLP(nn.Module):
    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransMLAQwen3MoE(nn.Module):
    """A Qwen3-MoE MLP (config ``transmla.mlp``): transformers' own Qwen3-MoE router (softmax,
    top-k, optional renormalisation) and experts (``Qwen3MoeMLP``), combined as transformers'
    ``Qwen3MoeExperts`` does. The experts stay one module each so the checkpoint's per-expert
    tensor names load and save as they are (transformers applies its fused-expert weight mapping
    to its own classes only, not to remote code)."""

    def __init__(self, hidden_size: int, moe: dict) -> None:
        super().__init__()
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import (
            Qwen3MoeMLP,
            Qwen3MoeTopKRouter,
        )

        cfg = Qwen3MoeConfig(
            hidden_size=hidden_size,
            num_experts=moe["num_experts"],
            num_experts_per_tok=moe["num_experts_per_tok"],
            norm_topk_prob=moe["norm_topk_prob"],
            moe_intermediate_size=moe["moe_intermediate_size"],
            hidden_act="silu",
        )
        self.gate = Qwen3MoeTopKRouter(cfg)
        self.experts = nn.ModuleList(
            Qwen3MoeMLP(cfg, intermediate_size=cfg.moe_intermediate_size)
            for _ in range(cfg.num_experts)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        _, weights, chosen = self.gate(x)
        out = torch.zeros_like(x)
        for expert in chosen.unique().tolist():
            token, slot = torch.where(chosen == expert)
            y = self.experts[expert](x[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out.view_as(hidden_states)


class TransMLADecoderLayer(nn.Module):
    def __init__(self, config: DeepseekV3Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = TransMLAAttention(config, layer_idx)
        moe = (getattr(config, "transmla", None) or {}).get("mlp")
        if moe and layer_idx in moe["sparse_layers"]:
            self.mlp = TransMLAQwen3MoE(config.hidden_size, moe)
        else:
            self.mlp = TransMLAMLP(config)
        self.input_layernorm = TransMLARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = TransMLARMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, rope, mask, past_key_values):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, past_key_values)
        return x + self.mlp(self.post_attention_layernorm(x))


class TransMLAPreTrainedModel(PreTrainedModel):
    config_class = DeepseekV3Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True  # heal trains through it (converter/heal)
    _no_split_modules = ["TransMLADecoderLayer"]
    _keys_to_ignore_on_load_unexpected = [r"rotary\.inv_freq"]

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, (nn.Linear, HeadwiseLinear)) or type(module).__name__ == (
            "Qwen3MoeTopKRouter"
        ):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, TransMLARMSNorm):
            nn.init.ones_(module.weight)


class TransMLAModel(TransMLAPreTrainedModel):
    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            TransMLADecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = TransMLARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = TransMLARotary(config)
        self.gradient_checkpointing = False  # gradient_checkpointing_enable() switches it on
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        bsz, seq, _ = inputs_embeds.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        total = past + seq
        device = inputs_embeds.device
        if position_ids is None:
            if attention_mask is not None:
                # left padding: positions count real tokens only, like HF LLaMA generate()
                pos_all = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                position_ids = pos_all[:, past:total]
            else:
                position_ids = torch.arange(past, total, device=device)[None].expand(bsz, -1)
        # None: plain causal attention over the new tokens alone (training, evaluation)
        plain = attention_mask is None and past == 0
        mask = None if plain else causal_mask(seq, past, attention_mask, device)
        rope = self.rotary(position_ids)
        x = inputs_embeds
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:  # keep only each layer's input
                x = self._gradient_checkpointing_func(layer.__call__, x, rope, mask, None)
            else:
                x = layer(x, rope, mask, past_key_values if use_cache else None)
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(x), past_key_values=past_key_values if use_cache else None
        )


class TransMLAForCausalLM(TransMLAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeepseekV3Config) -> None:
        super().__init__(config)
        self.model = TransMLAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)
