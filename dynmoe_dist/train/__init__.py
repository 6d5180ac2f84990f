"""The training application: hydra configs, a transformer with MoE blocks, data, engines, loop, metrics, report."""
