"""Run a converted checkpoint in vLLM (CPU) in a fresh process and dump greedy outputs as JSON.

Tests call this as a subprocess (``python -m transmla_testing.vllm_runner``) so every engine
starts the way a user's does: vLLM finds our plugin through the ``vllm.general_plugins`` entry
point in each of its own processes.
"""

from __future__ import annotations

import argparse
import json

from converter.vllm_setup import cpu_engine_kwargs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=args.model,
        **cpu_engine_kwargs(),
        tensor_parallel_size=args.tp,
        seed=0,
        trust_remote_code=True,
        distributed_executor_backend="mp" if args.tp > 1 else None,
    )
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in json.load(open(args.prompts))]
    params = SamplingParams(
        temperature=0.0, max_tokens=args.max_tokens, logprobs=1, ignore_eos=True
    )
    results = []
    for out in llm.generate(prompts, params):
        comp = out.outputs[0]
        pairs = zip(comp.token_ids, comp.logprobs, strict=True)
        results.append(
            {"tokens": list(comp.token_ids), "logprobs": [lp[t].logprob for t, lp in pairs]}
        )
    cfg = llm.llm_engine.vllm_config
    info = {
        "use_mla": cfg.model_config.use_mla,
        "architecture": cfg.model_config.architectures,
        "head_size": cfg.model_config.get_head_size(),
    }
    json.dump({"results": results, "info": info}, open(args.out, "w"))


if __name__ == "__main__":
    main()
