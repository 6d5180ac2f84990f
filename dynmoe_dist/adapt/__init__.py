"""The control plane: recorder, policy, placement planner, migration protocol."""
