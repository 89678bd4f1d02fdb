"""Benchmark harness of ``perceiver-fast bench``.

* :mod:`.schema`: the row schema, ``make_row``, ``Job``, failure reasons and the one timing
  loop; every section imports it, it imports no section;
* :mod:`.ops`: op cases (ceilings, attention shapes, Fourier encoder, the M / head-dim sweeps,
  the largest M that fits); :mod:`.layers`: layer cases; :mod:`.models`: model cases;
* :mod:`.peer`: the community packages' models (perceiver-pytorch, perceiver-ar-pytorch, krasserm's
  perceiver-io, pio-arch) patched by ``patch_model`` against unpatched, and flash-perceiver where it imports;
* :mod:`.shapes`: the one source of shapes and their FLOP / byte counts;
* :mod:`.backends`: eager, torch.compile, each SDPA backend, fused;
* :mod:`.timing`: do_bench / torch.utils.benchmark quantiles and peak memory;
* :mod:`.runner`: collects the sections' jobs and runs them; :mod:`.compare`: ``--compare``;
* :mod:`.report`: table, CSV, JSON, plots; :mod:`.targets`: the speed targets.
"""
