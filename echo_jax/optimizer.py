"""Optimizer: AdamW with schedules, per-group learning rates and freezing.

Groups are chosen by regular expressions over parameter paths such as
`encoder/blocks_3/mlp/Dense_0/kernel`, so a stage config can freeze or slow
down parts of the shared encoder without code changes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import jax
import optax

FROZEN = "frozen"


def param_path(path) -> str:
  """'encoder/blocks_0/attn/kernel' from a jax tree path."""
  def name(k):
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey.
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return "/".join(name(k) for k in path)


def lr_schedule(config) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine to `end_lr` at `total_steps`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.optim.lr,
      warmup_steps=config.optim.warmup_steps,
      decay_steps=max(config.total_steps, config.optim.warmup_steps + 1),
      end_value=config.optim.end_lr)


def group_labels(params, lr_mult: Sequence[tuple[str, float]],
                 freeze: Sequence[str]):
  """Labels each param: FROZEN, or 'mult_<i>' for the first matching rule."""
  def label(path, _):
    name = param_path(path)
    if any(re.search(p, name) for p in freeze):
      return FROZEN
    for i, (pattern, _) in enumerate(lr_mult):
      if re.search(pattern, name):
        return f"mult_{i}"
    return "default"
  return jax.tree_util.tree_map_with_path(label, params)


def _decay_mask(params):
  # No weight decay on biases, norm scales and other vectors (I-JEPA).
  return jax.tree.map(lambda x: x.ndim > 1, params)


def make_optimizer(config) -> optax.GradientTransformation:
  """Clip by global norm, then AdamW per group; frozen groups get zeros."""
  schedule = lr_schedule(config)
  o = config.optim
  lr_mult = [tuple(rule) for rule in o.lr_mult]

  def adamw(mult: float):
    return optax.adamw(lambda step: mult * schedule(step), b1=o.b1, b2=o.b2,
                       weight_decay=o.weight_decay, mask=_decay_mask)

  transforms = {"default": adamw(1.0), FROZEN: optax.set_to_zero()}
  transforms.update({f"mult_{i}": adamw(float(m))
                     for i, (_, m) in enumerate(lr_mult)})
  labels = functools.partial(group_labels, lr_mult=lr_mult,
                             freeze=tuple(o.freeze))
  return optax.chain(optax.clip_by_global_norm(o.clip_norm),
                     optax.multi_transform(transforms, labels))
