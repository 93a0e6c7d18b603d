"""The benches: one module per bench, run from the repository root as `python -m bench.NAME`
(`--help` lists its flags); each prints one JSON document. bench/README.md says what each
measures and gives the latest figures.

The other modules are what the benches share (common, serving, sse, worker_load) and the tiny
random models they build (tiny_models, tiny_vlms); the tests import these too, never the
other way round."""
