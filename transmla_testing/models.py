"""Tiny seeded LLaMA / Qwen2 / Mistral / Qwen3 / Qwen3-MoE checkpoints and the BPE tokenizers
they carry."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from transmla_testing.text import play_text

BOS_CONVENTIONS = ("added", "defined", "none")
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def make_tokenizer(
    folder: Path,
    vocab_size: int = 512,
    *,
    texts: Iterable[str] | None = None,
    chat_template: bool = True,
    bos: str = "defined",
):
    """A byte-level BPE tokenizer trained offline, saved as a fast tokenizer in ``folder``.

    By default it learns from two Shakespeare comedies and carries a small chat template (what
    the tests' checkpoints use); ``texts`` trains it on other documents and ``chat_template=False``
    leaves the template out (the benchmarks' synthetic checkpoints). ``bos`` is one of the
    BOS_CONVENTIONS real checkpoints follow: "added" (Llama-3: its post-processor puts <s>
    before text), "defined" (SmolLM2, GGUF-built tokenizers: <s> is the BOS but never added),
    "none" (Hub Qwen2.5 / Qwen3: no BOS at all)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if texts is None:
        texts = [play_text("as-you-like-it"), play_text("twelfth-night")]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts), trainer)
    if bos not in BOS_CONVENTIONS:
        raise ValueError(f"bos must be one of {BOS_CONVENTIONS}")
    if bos == "added":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None if bos == "none" else "<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def family_classes(family: str) -> tuple[type, type, dict]:
    """(config class, model class, config fields that keep attention full) of a family."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    return {
        "llama": (LlamaConfig, LlamaForCausalLM, {}),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"use_sliding_window": False}),
        "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"use_sliding_window": False}),
        # 4 experts, top 2 (renormalised); layer 1 of 2 keeps a dense MLP (mlp_only_layers)
        "qwen3_moe": (
            Qwen3MoeConfig,
            Qwen3MoeForCausalLM,
            {
                "use_sliding_window": False,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "norm_topk_prob": True,
                "moe_intermediate_size": 32,
                "mlp_only_layers": [1],
            },
        ),
    }[family]


def make_model(
    folder: Path,
    family: str = "llama",
    *,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    layers: int = 2,
    tied: bool = True,
    rope_scaling: dict | None = None,
    shared_keys: bool = False,
    seed: int = 0,
    vocab_size: int = 512,
    dtype: torch.dtype = torch.float32,
    init: tuple[float, float, float, float] = (1.0, 2.0, 2.0, 2.0),
    bos: str = "defined",
) -> Path:
    """Save a random model (and tokenizer) in HF format. ``shared_keys`` makes every KV head's
    key projection a scalar multiple of head 0's, so no key energy falls outside rope dims
    (+-1 for families with a per-head k norm: the normalised keys are then equal up to sign)."""
    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer(folder, vocab_size, bos=bos)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=1024,
        tie_word_embeddings=tied,
        bos_token_id=None if bos == "none" else 1,
        eos_token_id=2,
        rms_norm_eps=1e-6,
    )
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling:
        rope = {**rope_scaling, "rope_theta": 10000.0}
    config_cls, model_cls, extra = family_classes(family)
    config = config_cls(**common, rope_parameters=rope, **extra)
    torch.manual_seed(seed)
    model = model_cls(config)
    emb_std, proj_gain, out_gain, head_gain = init
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(emb_std * torch.randn_like(p))
            else:  # std gain / sqrt(fan_in); residual writers larger so layers matter
                gain = out_gain if ("o_proj" in name or "down_proj" in name) else proj_gain
                gain = head_gain if "lm_head" in name else gain
                p.copy_(torch.randn_like(p) * gain / p.shape[-1] ** 0.5)
        if shared_keys:
            for layer in model.model.layers:
                k = layer.self_attn.k_proj
                # powers of two: the keys stay exact multiples after a cast to bf16 / fp16;
                # +-1 under a k norm (RMSNorm(c k) = sign(c) RMSNorm(k) only when |c| = 1,
                # the epsilon breaks it otherwise)
                base = -1.0 if hasattr(layer.self_attn, "k_norm") else -0.5
                scales = (base ** torch.arange(kv_heads)).repeat_interleave(head_dim)
                k.weight.copy_(k.weight[:head_dim].repeat(kv_heads, 1) * scales[:, None])
                if k.bias is not None:
                    k.bias.copy_(k.bias[:head_dim].repeat(kv_heads) * scales)
    model.to(dtype).save_pretrained(folder)
    return folder


def edit_tensors(folder: Path, file: str, edit) -> None:
    """Rewrite one safetensors file of a real (copied) checkpoint with ``edit(state)``."""
    from safetensors.torch import load_file, save_file

    path = folder / file
    state = load_file(path)
    edit(state)
    path.unlink()  # may be a symlink into a module fixture
    save_file(state, path, metadata={"format": "pt"})


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder's safetensors shards, in shard order."""
    from safetensors import safe_open

    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def teach(folder: Path, text: str, steps: int = 150, edit=None, seqlen: int = 64) -> Path:
    """A few seconds of language modelling on ``text`` for the tiny model saved in ``folder``,
    so its perplexities mean something. ``edit(model, "before" | "after")`` changes the model
    around the training (the heal tests build models with one property each that way)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if edit is not None:
        edit(model, "before")
    ids = torch.tensor(tok(text)["input_ids"])
    rows = ids[: len(ids) // seqlen * seqlen].view(-1, seqlen)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = rows[torch.randint(len(rows), (16,), generator=g)]
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    if edit is not None:
        edit(model, "after")
    model.save_pretrained(folder)
    return folder
