"""vLLM model class for TransMLA checkpoints (LLaMA/Qwen2/Mistral/Qwen3/Qwen3-MoE converted to
MLA).

Built from vLLM's own MLA layers (``MultiHeadLatentAttentionWrapper``), so the MLA backends, the
paged latent cache and weight absorption for decode are vLLM's. It differs from the stock
``DeepseekV2ForCausalLM`` where converted models need it to:

* no latent RMSNorm (``kv_a_layernorm``): the conversion is linear, a norm would change every
  score;
* optional ``q_proj`` / ``kv_a_proj_with_mqa`` biases (Qwen2 q/k/v biases);
* per-head q/k RMSNorm sources (Qwen3): the normed projections of ``normed_attention`` feed the
  same MLA wrapper;
* Qwen3-MoE MLPs on vLLM's fused MoE layer with Qwen3's routing (``moe``);
* ``tie_word_embeddings`` honoured;
* the source rope law (default / linear / llama3) kept as is, GPT-J interleaved, no
  DeepSeek-YaRN rewrite and no mscale in the softmax scale;
* strict load checks (``weight_checks``), then zero padding to the shape the selected backend
  accepts (``serve_plan`` picks it, ``padding`` applies it); softmax scale from the source dims.

With ``VLLM_MLA_DISABLE=1`` the same weights run as ordinary multi-head attention (any shape,
full per-head KV cache).
"""

from collections.abc import Iterable
from itertools import islice
from typing import Any

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mla import MLAModules, MultiHeadLatentAttentionWrapper
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    extract_layer_index,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from transmla_vllm.checkpoint_format import GATE_PROJ, UP_PROJ, biases, moe_mlp, qk_norm
from transmla_vllm.config_checks import rope_parameters_for
from transmla_vllm.flat_rope import FlatRope
from transmla_vllm.moe import EXPERTS_PREFIX, MLP_MODULE, TransMLAQwen3MoE
from transmla_vllm.normed_attention import add_normed_projections
from transmla_vllm.padding import PADDING
from transmla_vllm.serve_plan import ServePlan, ensure_served_shape
from transmla_vllm.weight_checks import WeightChecks

# vLLM's fused gate/up parameter (layer-relative), loaded from two checkpoint tensors.
_GATE_UP_PROJ = "mlp.gate_up_proj.weight"


def _module(tensor_name: str) -> str:
    """Module name of a tensor name (``mlp.gate_proj.weight`` -> ``gate_proj``)."""
    return tensor_name.split(".")[-2]


class _NoLatentNorm(nn.Module):
    """Stands in for ``kv_a_layernorm``: the converted latent is not normalised.

    Returns a contiguous copy because the stock path hands the cache-write and
    kv_b kernels a fresh tensor, not a strided view of ``kv_a_proj`` output.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()


class TransMLAMLP(nn.Module):
    """SiLU-gated MLP (LLaMA style, no bias)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size,
            [intermediate_size] * 2,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            intermediate_size,
            hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.down_proj",
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(x))
        return x


class TransMLAAttention(nn.Module):
    """DeepSeek-V2 style attention without latent norm, in the served shape.

    MLA mode hands the projections to vLLM's MLA wrapper (latent cache of
    ``kv_lora_rank + qk_rope_head_dim`` per token).  Non-MLA mode
    (``VLLM_MLA_DISABLE=1``) expands k/v per head and uses ordinary attention.
    """

    def __init__(
        self,
        config: Any,
        plan: ServePlan,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        dims = plan.served
        self.use_mla = plan.use_mla
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        tp_size = get_tensor_model_parallel_world_size()
        if self.num_heads % tp_size:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not divisible by "
                f"tensor_parallel_size={tp_size}."
            )
        self.num_local_heads = self.num_heads // tp_size
        self.kv_lora_rank = dims.kv_lora_rank
        self.qk_nope_head_dim = dims.qk_nope_head_dim
        self.qk_rope_head_dim = dims.qk_rope_head_dim
        self.qk_head_dim = dims.qk_nope_head_dim + dims.qk_rope_head_dim
        self.v_head_dim = dims.v_head_dim
        # Scores are scaled as in the source checkpoint; padding adds zeros only.
        src = plan.source
        self.scaling = (src.qk_nope_head_dim + src.qk_rope_head_dim) ** -0.5
        q_bias, kv_a_bias = biases(config)
        normed = qk_norm(config)

        if normed is None:
            self.q_proj = ColumnParallelLinear(
                self.hidden_size,
                self.num_heads * self.qk_head_dim,
                bias=q_bias,
                quant_config=quant_config,
                prefix=f"{prefix}.q_proj",
            )
        self.kv_a_proj_with_mqa = ReplicatedLinear(
            self.hidden_size,
            self.kv_lora_rank + self.qk_rope_head_dim,
            bias=kv_a_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.kv_a_proj_with_mqa",
        )
        # what the MLA wrapper calls as its q and kv_a projections: ours for the normed path
        if normed is None:
            self.q_path, self.kv_a_path = self.q_proj, self.kv_a_proj_with_mqa
        else:
            self.q_path, self.kv_a_path = add_normed_projections(
                self, normed, self.kv_a_proj_with_mqa, quant_config, prefix
            )
        self.kv_b_proj = ColumnParallelLinear(
            self.kv_lora_rank,
            self.num_heads * (self.qk_nope_head_dim + self.v_head_dim),
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.kv_b_proj",
        )
        self.o_proj = RowParallelLinear(
            self.num_heads * self.v_head_dim,
            self.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.rotary_emb = FlatRope(
            get_rope(
                self.qk_rope_head_dim,
                max_position=getattr(config, "max_position_embeddings", 8192),
                is_neox_style=False,
                rope_parameters=rope_parameters_for(config),
            )
        )

        if self.use_mla:
            mla_modules = MLAModules(
                kv_a_layernorm=_NoLatentNorm(),
                kv_b_proj=self.kv_b_proj,
                rotary_emb=self.rotary_emb,
                o_proj=self.o_proj,
                fused_qkv_a_proj=None,
                kv_a_proj_with_mqa=self.kv_a_path,
                q_a_layernorm=None,
                q_b_proj=None,
                q_proj=self.q_path,
                indexer=None,
                is_sparse=False,
                topk_indices_buffer=None,
            )
            self.mla_attn = MultiHeadLatentAttentionWrapper(
                self.hidden_size,
                self.num_local_heads,
                self.scaling,
                self.qk_nope_head_dim,
                self.qk_rope_head_dim,
                self.v_head_dim,
                None,
                self.kv_lora_rank,
                mla_modules,
                cache_config,
                quant_config,
                prefix,
            )
        else:
            # One padded head size for q, k and v (zero padding is exact).
            self.attn_head_dim = max(self.qk_head_dim, self.v_head_dim)
            self.attn = Attention(
                self.num_local_heads,
                self.attn_head_dim,
                self.scaling,
                num_kv_heads=self.num_local_heads,
                cache_config=cache_config,
                quant_config=quant_config,
                prefix=f"{prefix}.attn",
            )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.use_mla:
            return self.mla_attn(positions, hidden_states)
        return self._forward_mha(positions, hidden_states)

    def _forward_mha(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        heads, nope, rope = self.num_local_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        q = self.q_path(hidden_states)[0].view(-1, heads, self.qk_head_dim)
        latent, k_pe = self.kv_a_path(hidden_states)[0].split([self.kv_lora_rank, rope], dim=-1)
        kv = self.kv_b_proj(latent.contiguous())[0].view(-1, heads, nope + self.v_head_dim)
        k_nope, v = kv.split([nope, self.v_head_dim], dim=-1)
        q_pe, k_pe = self.rotary_emb(positions, q[..., nope:], k_pe.unsqueeze(1))
        q = torch.cat([q[..., :nope], q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(-1, heads, rope)], dim=-1)
        pad = self.attn_head_dim
        q = nn.functional.pad(q, (0, pad - self.qk_head_dim))
        k = nn.functional.pad(k, (0, pad - self.qk_head_dim))
        v = nn.functional.pad(v, (0, pad - self.v_head_dim))
        out = self.attn(
            q.reshape(-1, heads * pad), k.reshape(-1, heads * pad), v.reshape(-1, heads * pad)
        )
        out = out.view(-1, heads, pad)[..., : self.v_head_dim].reshape(-1, heads * self.v_head_dim)
        return self.o_proj(out)[0]


class TransMLADecoderLayer(nn.Module):
    """Pre-norm decoder layer: attention and MLP with fused residual RMSNorms."""

    def __init__(self, vllm_config: VllmConfig, plan: ServePlan, prefix: str) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.self_attn = TransMLAAttention(
            config,
            plan,
            vllm_config.cache_config,
            vllm_config.quant_config,
            prefix=f"{prefix}.self_attn",
        )
        moe = moe_mlp(config)
        self.mlp: nn.Module
        if moe is not None and extract_layer_index(prefix) in moe.sparse_layers:
            self.mlp = TransMLAQwen3MoE(vllm_config, moe, prefix=f"{prefix}.mlp")
        else:
            self.mlp = TransMLAMLP(
                config.hidden_size,
                config.intermediate_size,
                vllm_config.quant_config,
                prefix=f"{prefix}.mlp",
            )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


@support_torch_compile(
    dynamic_arg_dims={
        "input_ids": 0,
        "positions": -1,
        "intermediate_tensors": 0,
        "inputs_embeds": 0,
    }
)
class TransMLAModel(nn.Module):
    """Embeddings, decoder layers and final norm (pipeline-parallel aware)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        plan = ensure_served_shape(vllm_config)
        self.config = config
        pp = get_pp_group()
        if pp.is_first_rank or (config.tie_word_embeddings and pp.is_last_rank):
            self.embed_tokens = VocabParallelEmbedding(
                config.vocab_size,
                config.hidden_size,
                quant_config=vllm_config.quant_config,
                prefix=f"{prefix}.embed_tokens",
            )
        else:
            self.embed_tokens = PPMissingLayer()
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: TransMLADecoderLayer(vllm_config, plan, prefix),
            prefix=f"{prefix}.layers",
        )
        if pp.is_last_rank:
            self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        else:
            self.norm = PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            if inputs_embeds is None:
                inputs_embeds = self.embed_input_ids(input_ids)
            hidden_states, residual = inputs_embeds, None
        else:
            assert intermediate_tensors is not None
            hidden_states = intermediate_tensors["hidden_states"]
            residual = intermediate_tensors["residual"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class TransMLAForCausalLM(nn.Module, SupportsPP):
    """Causal LM head over ``TransMLAModel``; loads the TransMLA safetensors."""

    packed_modules_mapping = {_module(_GATE_UP_PROJ): [_module(GATE_PROJ), _module(UP_PROJ)]}
    # (param_name, shard_name, shard_id), layer-relative: gate and up are one fused linear.
    stacked_params_mapping = ((_GATE_UP_PROJ, GATE_PROJ, 0), (_GATE_UP_PROJ, UP_PROJ, 1))

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.plan = ensure_served_shape(vllm_config)
        self.model = TransMLAModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(
                config.vocab_size,
                config.hidden_size,
                quant_config=vllm_config.quant_config,
                prefix=maybe_prefix(prefix, "lm_head"),
            )
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
            self.logits_processor = LogitsProcessor(config.vocab_size)
        else:
            self.lm_head = PPMissingLayer()
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def _param_name(self, name: str) -> tuple[str, int | None]:
        """Checkpoint tensor name -> (parameter name, stacked shard id or None)."""
        for param_name, shard_name, shard_id in self.stacked_params_mapping:
            if name.endswith("." + shard_name):
                return name[: -len(shard_name)] + param_name, shard_id
        return name, None

    def _to_served(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Zero-pad an attention tensor from the checkpoint's shape to the served one."""
        if not self.plan.is_padded:
            return tensor
        for tensor_name, pad in PADDING.items():
            if name.endswith("." + tensor_name):
                heads = self.config.num_attention_heads
                return pad(tensor, self.plan.source, self.plan.served, heads)
        return tensor

    def _held_here(self, name: str) -> bool:
        """Whether this pipeline rank holds the parameter checkpoint tensor ``name`` loads."""
        return not is_pp_missing_parameter(self._param_name(name)[0], self)

    def _load_expert(self, name: str, tensor: torch.Tensor) -> set[str]:
        """One expert tensor (``...layers.{i}.mlp.experts.{e}.{part}.weight``) through its fused
        MoE layer's own loader; returns the parameter names it set."""
        layer, _, relative = name.partition("." + EXPERTS_PREFIX)
        mlp_path = f"{layer}.{MLP_MODULE}"
        if is_pp_missing_parameter(mlp_path, self):
            return set()
        moe = self.get_submodule(mlp_path)
        return {f"{mlp_path}.{p}" for p in moe.load_experts([(relative, tensor)])}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Check, pad and load the checkpoint; every expected tensor must be there."""
        checks = WeightChecks(self.config, self.plan.source)
        params_dict = dict(self.named_parameters())
        loaded_params: set[str] = set()
        for name, loaded_weight in weights:
            if checks.skipped(name):
                continue
            checks.check(name, loaded_weight)
            if "." + EXPERTS_PREFIX in name:
                loaded_params |= self._load_expert(name, loaded_weight)
                continue
            param_name, shard_id = self._param_name(name)
            if is_pp_missing_parameter(param_name, self):
                continue
            param = params_dict[param_name]
            weight_loader = getattr(param, "weight_loader", default_weight_loader)
            loaded_weight = self._to_served(name, loaded_weight)
            if shard_id is None:
                weight_loader(param, loaded_weight)
            else:
                weight_loader(param, loaded_weight, shard_id)
            loaded_params.add(param_name)
        checks.check_complete(self._held_here)
        return loaded_params
