"""Smoke configs for tests: a stage's `smoke` variant with overrides given as
dotted keys, evaluators off unless a test asks for them, and metrics logged
every step (tests compare per-step losses)."""


def smoke(get_config, **overrides):
  """`smoke(stage1_jepa.get_config, total_steps=3, **{"optim.lr": 0.0})`."""
  config = get_config("smoke")
  with config.unlocked():
    config.evals = {}
    config.progress = False
    config.log_every = 1
    for key, value in overrides.items():
      node = config
      *parents, last = key.split(".")
      for p in parents:
        node = node[p]
      node[last] = value
  return config
