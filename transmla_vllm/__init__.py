"""vLLM plugin serving TransMLA checkpoints (GQA models converted to MLA).

vLLM calls ``register`` (entry point group ``vllm.general_plugins``) in every
process it starts, so it must stay cheap and idempotent: the model class is
registered by name and imported lazily by vLLM when it is needed.
"""

__version__ = "0.1.0"

MODEL_CLASS_PATH = "transmla_vllm.model:TransMLAForCausalLM"


def register() -> None:
    """Register the TransMLA architecture, its config hook and (on CPU) the MLA prefill."""
    from vllm import ModelRegistry

    from transmla_vllm.checkpoint_format import ARCHITECTURE

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS_PATH)

    # Per-architecture config hook: validates the config and applies the
    # load-time padding plan while the VllmConfig is built, before any engine
    # or worker process exists (see serve_plan).
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    if ARCHITECTURE not in MODELS_CONFIG_MAP:
        from transmla_vllm.serve_plan import TransMLAConfigHook

        MODELS_CONFIG_MAP[ARCHITECTURE] = TransMLAConfigHook  # type: ignore[assignment]

    # MLA prefill on CPU: torch's fused flash attention in vLLM's CPU prefill slot (see
    # cpu_prefill; TRANSMLA_CPU_PREFILL=0 keeps vLLM's own). Never on other platforms.
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from transmla_vllm.cpu_prefill import register_cpu_prefill

        register_cpu_prefill()


__all__ = ["__version__", "register"]
