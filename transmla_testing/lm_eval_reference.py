"""The shipped lm-eval tasks' items scored by hand in transformers (fp32, full recompute, no
lm-eval code): the independent reference the lm-eval tests and the side-by-side benchmark
compare each backend's per-item results with."""

from __future__ import annotations

from pathlib import Path

import torch

from converter.measure.lm_eval import TASKS_DIR

# lm-eval model_args for runs on this CPU box, besides the folder: fp32 so both backends compute
# alike; vLLM eager (no compile wait), short context and a small cache (the items are short).
CPU_MODEL_ARGS = {
    "hf": "dtype=float32",
    "vllm": "dtype=float32,enforce_eager=True,max_model_len=512,kv_cache_memory_bytes=268435456",
}


def complete_generation_kwargs() -> dict:
    """transmla_complete.yaml's ``generation_kwargs`` (stop strings, token budget)."""
    import yaml

    class _Loader(yaml.SafeLoader):  # the YAML's ``!function`` tag read as plain text
        pass

    _Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    text = (TASKS_DIR / "transmla_complete.yaml").read_text()
    return yaml.load(text, _Loader)["generation_kwargs"]


class DirectScorer:
    """One model folder (our remote code for converted ones), loaded once."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, trust_remote_code=True
        )

    @torch.no_grad()
    def loglikelihood(self, context: str, continuation: str) -> float:
        """log P(continuation | context), each tokenized on its own as the tokenizer does."""
        ctx, cont = self.tok(context).input_ids, self.tok(continuation).input_ids
        logp = self.model(torch.tensor([ctx + cont]), use_cache=False).logits[0].log_softmax(-1)
        return float(logp[len(ctx) - 1 : -1].gather(-1, torch.tensor(cont)[:, None]).sum())

    def choice_loglikelihoods(self, doc: dict) -> list[float]:
        """A transmla_cloze item: each choice after the context and a space."""
        return [self.loglikelihood(doc["context"], " " + c) for c in doc["choices"]]

    def cloze_acc(self, docs: list[dict]) -> float:
        right = 0
        for doc in docs:
            lls = self.choice_loglikelihoods(doc)
            right += max(range(len(lls)), key=lls.__getitem__) == doc["answer"]
        return right / len(docs)

    @torch.no_grad()
    def greedy(self, context: str) -> str:
        """A transmla_complete item: greedy text up to EOS, the token budget or a stop string."""
        kwargs = complete_generation_kwargs()
        seq = torch.tensor([self.tok(context).input_ids])
        start = seq.shape[1]
        for _ in range(kwargs["max_gen_toks"]):
            nxt = self.model(seq, use_cache=False).logits[0, -1].argmax()
            if nxt == self.tok.eos_token_id:
                break
            seq = torch.cat([seq, nxt.view(1, 1)], 1)
        text = self.tok.decode(seq[0, start:])
        for stop in kwargs["until"]:
            text = text.split(stop)[0]
        return text


def complete_chars(text: str) -> str:
    """``text`` without a trailing U+FFFD: a last byte-level token may end inside a UTF-8
    character, which tokenizer.decode shows as U+FFFD and vLLM's incremental detokenizer holds
    back."""
    return text.rstrip("\ufffd")
