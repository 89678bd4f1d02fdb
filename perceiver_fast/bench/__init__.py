"""Benchmark harness of ``perceiver-fast bench``.

* :mod:`.shapes`: the one source of shapes and their FLOP / byte counts;
* :mod:`.backends`: eager, torch.compile, each SDPA backend, fused;
* :mod:`.timing`: do_bench median and peak-memory measurement;
* :mod:`.runner`: the run and its row schema; :mod:`.models`: model cases;
* :mod:`.report`: table, CSV, JSON, plots; :mod:`.targets`: issue 6 targets.
"""
