"""The reference-world benchmark (`distill3d bench`) and its metrics.

* :mod:`.metrics` - exact analogues of the paper's metrics (agreement, reference FID, IQ, IV),
  the front-feature count and the Chamfer distance after the best vertical rotation;
* :mod:`.config` - method specs, bias presets, the shared budget (:class:`~.config.BenchConfig`);
* :mod:`.runner` - one training run per (object, bias, seed, method) in worker processes, measured;
* :mod:`.report` - aggregation, the markdown report (Table 1 layout), JSON and PNG plots.
"""
