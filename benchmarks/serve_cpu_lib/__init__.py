"""The parts of ``benchmarks/serve_cpu.py`` (the entry point; run that file, not this package).

* ``common``: paths, logging, the per-pair ``Workload`` and the engine variants;
* ``models``: the bundled SmolLM2 and the random Llama-3-8B-attention model, converted;
* ``engine_loop``: submitting requests and stepping a vLLM engine by hand, timing each step;
* ``profile``: torch.profiler over the prompt step and the decode steps, apart;
* ``worker``: one engine in its own process (measure, write JSON) and how it is started;
* ``stats``: the table, ratios and comparisons computed from the results;
* ``report``: the docs/benchmarks.md section (reading, profile, command) and the plot;
* ``cli``: the command line and the orchestration.
"""
