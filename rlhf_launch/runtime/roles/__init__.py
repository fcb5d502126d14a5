"""The five PPO roles. Each owns its model and gives and takes only tensors, so that a role
can run in this process or in its own group of processes behind the same methods."""
