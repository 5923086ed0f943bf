"""The benchmark (``flotilla bench``, ``make bench``): what the batching tier buys, measured.

Its parts, each a module here:

- ``run``: the whole bench and its stacks' load points; ``flotilla bench`` calls its ``main``;
- ``report``: bench/results.json's summary and the results tables (docs/benchmarks.md);
- ``inputs``: what every part measures on (the bench's configuration, model and photos);
- ``meter``: CPU accounting of processes by tier (psutil) and the metered closed loop;
- ``cpu``: CPU per image by tier and the physical limit (``--only cpu``);
- ``overhead``: the mesh with a near-free model against Triton alone (``--only overhead``);
- ``ceiling``: the router and a model's batcher alone at their ceilings (``--only ceiling``);
- ``fleet``: the control plane: cold start, placement, autoscaling (``--only fleet``);
- ``peer_app`` and ``peer_run``: the same job on Ray Serve (``--only peer``;
  ``python -m flotilla.bench.peer_run`` runs it alone);
- ``ab``: two revisions measured alternately (``flotilla bench --against REV``).

Importing this package imports none of them: the CLI imports the bench only when
``flotilla bench`` runs.
"""
