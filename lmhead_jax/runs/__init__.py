"""Layer 5, runs: where the experiment config is read, and the runs built from it.

experiment (the config: schema, checks, what config.json holds, `resolve` into a Setup), grid
(sweep grids), runner (the train loop: data, logs, checkpoints, resume, preemption), sweep,
logs, checkpoint (the only module that talks to orbax), divergence, cli, cache (shared,
cross-process), corpus (the measured token data), measurement (the measurement experiments).
Imports: core, data, training, analysis.
"""
