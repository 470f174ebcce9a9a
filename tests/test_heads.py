"""Attentive statistics pooling, the speaker head (+ ArcFace training) and
the speech-activity head."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from echo_jax.models import heads
from echo_jax.objectives import arcface


def _features(seed=0, shape=(3, 7, 5)):
  return jax.random.normal(jax.random.key(seed), shape)


def test_output_shape_and_masked_frames_do_not_matter():
  x = _features()
  mask = jnp.array([[True] * 7, [True] * 4 + [False] * 3,
                    [False, True, True, False, True, False, False]])
  pool = heads.AttentiveStatsPooling(attention_dim=8)
  params = pool.init(jax.random.key(1), x, mask)
  apply = jax.jit(pool.apply)
  out = apply(params, x, mask)
  assert out.shape == (3, 10)
  # Garbage (even inf) in masked frames leaves the output unchanged.
  junk = jnp.where(mask[..., None], x, jnp.inf)
  np.testing.assert_array_equal(np.asarray(apply(params, junk, mask)),
                                np.asarray(out))
  # Same as running row 1 alone on its unmasked prefix, with no mask.
  alone = pool.apply(params, x[1:2, :4])
  np.testing.assert_allclose(np.asarray(out[1:2]), np.asarray(alone),
                             rtol=1e-5, atol=1e-6)


def test_uniform_attention_gives_masked_mean_and_std():
  # With the logit layer zeroed every frame gets the same weight: the output
  # must be the plain mean / std over unmasked frames (numpy reference).
  x = _features(2)
  mask = np.ones((3, 7), bool)
  mask[0, 5:] = False
  pool = heads.AttentiveStatsPooling(attention_dim=4)
  params = pool.init(jax.random.key(0), x, mask)
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.zeros_like(p)
      if "attention_logits" in jax.tree_util.keystr(path) else p, params)
  out = np.asarray(pool.apply(params, x, jnp.asarray(mask)))
  xn = np.asarray(x)
  for b in range(3):
    frames = xn[b][mask[b]]
    np.testing.assert_allclose(out[b, :5], frames.mean(0), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(out[b, 5:], frames.std(0), rtol=1e-5,
                               atol=1e-6)


def test_constant_input_has_finite_gradients():
  x = jnp.ones((2, 6, 4)) * 3.0  # std over time = 0 in every channel.
  head = heads.SpeakerHead(embed_dim=8, attention_dim=4, layer_norm=True)
  params = head.init(jax.random.key(0), x)

  def loss(params, x):
    return jnp.sum(jnp.square(head.apply(params, x)))

  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
  assert any(np.any(np.asarray(g) != 0) for g in leaves)
  # An all-masked row gives a finite output, not NaN.
  out = head.apply(params, x, jnp.zeros((2, 6), bool))
  assert np.all(np.isfinite(np.asarray(out)))


def test_speaker_head_with_arcface_learns_toy_speakers():
  # 4 "speakers": each frame = speaker centre + noise; separable after pooling.
  num_speakers, per_speaker, time, width = 4, 8, 10, 6
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(num_speakers, width)) * 2.0
  labels = np.repeat(np.arange(num_speakers), per_speaker)
  feats = centres[labels][:, None, :] + rng.normal(
      size=(len(labels), time, width))
  feats, labels = jnp.asarray(feats, jnp.float32), jnp.asarray(labels)

  head = heads.SpeakerHead(embed_dim=16, attention_dim=8)
  classifier = arcface.ArcFaceClassifier(num_classes=num_speakers,
                                         embed_dim=16)
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"head": head.init(k1, feats),
            "cls": classifier.init(k2, jnp.zeros((1, 16)), labels[:1])}
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)

  def loss_fn(params, step):
    emb = head.apply(params["head"], feats)
    margin = arcface.margin_schedule(step, ramp_steps=10, max_margin=0.2)
    return classifier.apply(params["cls"], emb, labels, margin=margin,
                            method=arcface.ArcFaceClassifier.loss)

  @jax.jit
  def train_step(params, opt_state, step):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, step)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, metrics

  history = []
  for step in range(25):
    params, opt_state, metrics = train_step(params, opt_state, step)
    history.append(metrics)  # Metrics of the params before this update.
  first, last = history[0], history[-1]
  assert float(first["arcface/accuracy"]) < 0.5  # Chance is 0.25.
  assert float(last["arcface/accuracy"]) == 1.0
  # The last loss already carries the full margin (harder) and is still lower.
  assert float(last["arcface/loss"]) < 0.1 * float(first["arcface/loss"])


def test_activity_head_reads_neighbours_and_the_clip():
  x = _features(4, (2, 20, 6))
  head = heads.ActivityHead(hidden=8, kernel=3)
  params = head.init(jax.random.key(0), x)
  out = np.asarray(head.apply(params, x))
  assert out.shape == (2, 20, 1) and np.isfinite(out).all()
  # Token 10 changes its neighbours' logits (the kernel); token 0 reaches
  # token 15, 15 tokens away, only through the clip statistics.
  near = np.asarray(head.apply(params, x.at[:, 10].add(1.0)))
  assert np.abs(near[:, 9] - out[:, 9]).max() > 1e-4
  far = np.asarray(head.apply(params, x.at[:, 0].add(1.0)))
  assert np.abs(far[:, 15] - out[:, 15]).max() > 1e-4
  # The temporal kernel's reach: with the clip statistics of the changed
  # input equal (two tokens swapped), tokens beyond it do not move.
  swapped = x.at[:, 0].set(x[:, 1]).at[:, 1].set(x[:, 0])
  moved = np.asarray(head.apply(params, swapped))
  np.testing.assert_allclose(moved[:, 5:], out[:, 5:], atol=1e-5)
  assert np.abs(moved[:, :2] - out[:, :2]).max() > 1e-4
  # A constant clip (std 0) keeps finite gradients through the floor.
  grad = jax.grad(lambda p: head.apply(p, jnp.ones((1, 20, 6))).sum())(params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grad))


def test_activity_head_config_keeps_old_checkpoints_linear():
  import ml_collections
  from echo_jax import heads as registry
  old = ml_collections.ConfigDict({"heads": ("activity",)})
  assert type(registry.build_heads(old, registry.BuildInfo())["activity"]) \
      is __import__("flax").linen.Dense
  new = ml_collections.ConfigDict({"heads": ("activity",),
                                   "activity_hidden": 8, "activity_kernel": 5})
  head = registry.build_heads(new, registry.BuildInfo())["activity"]
  assert isinstance(head, heads.ActivityHead) and head.kernel == 5
