"""Layer 3, training: the sharded train step, built from typed parts.

setup (Setup: model, head, loss and optimizer configs, batch shape, shardings; TrainState), train
(the train and eval steps), optim, sharding. Nothing here reads the experiment config.
Imports: core, data.
"""
