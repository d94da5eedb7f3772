"""``python -m converter.measure.lm_eval_cli ARGS``: lm-eval's own command line (``lm_eval
ARGS``), able to run ``--model vllm`` on vLLM's CPU build too (see vllm_dist_alias). On a GPU
install plain ``lm_eval`` does the same; our plugin is found through its entry point either way.
"""

from __future__ import annotations

from converter.measure import vllm_dist_alias


def main() -> None:
    vllm_dist_alias.install()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
