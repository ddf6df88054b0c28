"""Layer 3, training: one sharded train step and the runs built around it.

experiment (the experiment config: schema, checks, what config.json holds), train (the step),
optim, sharding, checkpoint (the only module that talks to orbax), runner, sweep, cli.
Imports: core, data.
"""
