"""Stage 3 chains from a real stage-2 checkpoint (strict tree checks), fits
its anchor GMM when the file is missing, logs the content term next to the
earlier ones, and keeps content-term gradients out of the speaker branch."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echo_jax import anchors, checkpointing, losses, trainer
from echo_jax.model import build_model, clip_samples
from echo_jax.terms import StepInputs, content_term
from experiments import stage1_jepa, stage2_speaker, stage3_content
from smoke_configs import smoke


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  runs = tmp_path_factory.mktemp("runs")
  trainer.train(smoke(stage1_jepa.get_config, total_steps=2),
                str(runs / "stage1"))
  trainer.train(smoke(stage2_speaker.get_config, total_steps=2),
                str(runs / "stage2"))
  return runs


def test_stage3_chains_from_stage2(runs, tmp_path):
  stage2_state, _, _ = checkpointing.load_state(str(runs / "stage2"))
  gmm_path = str(tmp_path / "anchor.npz")
  config = smoke(stage3_content.get_config, total_steps=2, **{
      "optim.lr": 0.0, "objective.content.anchor.path": gmm_path})
  assert config.init_from.workdir == "{parent}/stage2"
  with config.unlocked():
    config.evals = stage3_content.get_config("smoke").evals
    config.evals.content.every = 2
    config.evals.content.anchor = config.objective.content.anchor
  workdir = str(runs / "stage3")
  final = trainer.train(config, workdir)

  # The GMM was fitted on the first step and saved with its settings.
  gmm = anchors.load(gmm_path, anchors.AnchorSettings.from_config(
      config.objective.content.anchor))
  assert gmm.means.shape == (config.model.content_components, 39)

  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train_rows = [r for r in rows if "train/loss" in r]
  assert len(train_rows) == 2
  o = config.objective
  for r in train_rows:
    assert np.isfinite(r["content/loss"]) and r["content/ce"] > 0
    assert 0 <= r["content/xcorr"] <= 1
    np.testing.assert_allclose(
        r["train/loss"], o.jepa.weight * r["jepa/total"]
        + o.crop.weight * r["crop/total"] + r["arcface/loss"]
        + o.activity.weight * r["activity/loss"]
        + o.content.weight * r["content/loss"], rtol=1e-5)
  for key in ("content/gap_points", "content/content_per",
              "content/random_per", "content/content_phone_linear",
              "content/speaker_phone_knn", "content/random_phone_linear",
              "speaker/projection_top1", "content/gap_anchor_points"):
    assert np.isfinite(final[key]), key
  assert 0 <= final["content/anchor_top1"] <= 1
  np.testing.assert_allclose(
      final["content/gap_anchor_points"],
      100 * (final["content/speaker_top1"] - final["content/anchor_top1"]))

  # lr 0: every restored tree is exactly stage 2's (strict: same structure).
  stage3_state, _, _ = checkpointing.load_state(workdir)
  for tree in ("encoder", "predictor"):
    jax.tree.map(np.testing.assert_array_equal, stage2_state["params"][tree],
                 stage3_state["params"][tree])
  for head in stage3_content.STAGE2_HEADS:
    jax.tree.map(np.testing.assert_array_equal,
                 stage2_state["params"]["heads"][head],
                 stage3_state["params"]["heads"][head])
  assert set(stage3_state["params"]["heads"]) == set(
      stage3_content.STAGE2_HEADS) | {"content"}


def test_stage3_from_a_stage1_checkpoint_fails_naming_the_tree(runs,
                                                               tmp_path):
  config = smoke(stage3_content.get_config, total_steps=1, **{
      "init_from.workdir": str(runs / "stage1")})
  with pytest.raises(KeyError, match="params/heads/"):
    trainer.train(config, str(tmp_path / "stage3"))


@pytest.mark.parametrize("extra",
                         ["", "adversary", "invariance", "conditioned"])
def test_no_content_gradient_reaches_the_speaker_branch(tmp_path, extra):
  config = stage3_content.get_config("smoke")
  cfg = config.objective.content
  adversary = extra == "adversary"
  with config.unlocked():
    config.model.content_adversary = adversary
    config.model.content_speaker_conditioned = extra == "conditioned"
    cfg.adversary_weight = 1.0 if adversary else 0.0
    cfg.invariance_weight = 1.0 if extra == "invariance" else 0.0
  settings = anchors.AnchorSettings.from_config(cfg.anchor)
  rng = np.random.default_rng(0)
  path = str(tmp_path / "gmm.npz")
  anchors.save(anchors.fit(rng.normal(size=(400, settings.dim)) * 5,
                           settings), path)
  with cfg.unlocked():
    cfg.anchor.path = path
  model = build_model(config, num_classes=4)
  n = clip_samples(config)
  params = model.init(jax.random.PRNGKey(0), n)
  sources = jnp.asarray(0.1 * rng.normal(size=(4, config.data.k_max, n)),
                        jnp.float32)
  batch = {"mixture": sources.sum(1), "clean": sources.sum(1),
           "speakers": jnp.array([[0], [1], [2], [3]], jnp.int32)}

  def content_loss(p):
    inputs = StepInputs(model, p, p["encoder"], batch, jnp.int32(0))
    return content_term.loss(cfg, inputs, jax.random.PRNGKey(1))[0]

  grads = jax.grad(content_loss)(params)
  for head in ("speaker", "arcface"):
    for g in jax.tree.leaves(grads["heads"][head]):
      np.testing.assert_array_equal(g, 0.0)
  for tree in (grads["encoder"], grads["heads"]["content"],
               grads["heads"]["rwse"]):
    assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(tree)) > 0
  if adversary:
    assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(
        grads["heads"]["content"]["adversary"])) > 0
  if extra == "conditioned":   # The classifier learns to read the speaker.
    assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(
        grads["heads"]["content"]["speaker_input"])) > 0
  # The speaker branch still trains through its own term.
  assert "content" in losses.active_terms(config.objective)


def test_speaker_adversary_gradients_stay_on_their_side():
  from echo_jax.models.content_head import ContentHead

  class Model:  # The two things the loss reads of a model.
    heads = {"content": ContentHead(dim=3, num_components=2,
                                    adversary_classes=4)}

    def apply_head(self, name, params, *args, **kwargs):
      return self.heads[name].apply({"params": params["heads"][name]}, *args,
                                    **kwargs)

  model = Model()
  head = model.heads["content"].init(jax.random.PRNGKey(0),
                                     jnp.ones((1, 5, 6)))["params"]
  params = {"heads": {"content": head}}
  pooled = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3)),
                       jnp.float32)
  labels = jnp.array([1, 3])
  loss = lambda p, x: content_term.speaker_adversary_loss(  # noqa: E731
      model, p, x, labels)
  # Hand case: a zero classifier gives the uniform posterior, where both
  # parts equal log 4 and the confusion part has no gradient.
  zero = jax.tree.map(jnp.zeros_like, params)
  value, metrics = loss(zero, pooled)
  np.testing.assert_allclose(metrics["content/adversary_ce"], np.log(4),
                             rtol=1e-6)
  np.testing.assert_allclose(metrics["content/confusion"], np.log(4),
                             rtol=1e-6)
  np.testing.assert_allclose(value, 2 * np.log(4), rtol=1e-6)
  # Classifier CE moves the classifier only; the confusion moves the pooled
  # projection only (and pushes it toward a uniform posterior).
  (g_params, g_pooled), _ = jax.grad(loss, argnums=(0, 1), has_aux=True)(
      params, pooled)
  np.testing.assert_array_equal(g_params["heads"]["content"]["projection"]
                                ["kernel"], 0.0)
  assert float(jnp.abs(g_params["heads"]["content"]["adversary"]["kernel"])
               .sum()) > 0
  conf = lambda x: content_term.speaker_adversary_loss(  # noqa: E731
      model, params, x, labels)[1]["content/confusion"]
  np.testing.assert_allclose(
      g_pooled, jax.grad(conf)(pooled), rtol=1e-5, atol=1e-7)
  # Without the classifier the term says what to set.
  model.heads["content"] = ContentHead(dim=3, num_components=2)
  with pytest.raises(ValueError, match="content_adversary=True"):
    loss(params, pooled)


def test_speaker_conditioned_head_reads_the_speaker_only_in_its_logits():
  from echo_jax.models.content_head import ContentHead
  head = ContentHead(dim=8, num_components=5, speaker_conditioned=True)
  rng = np.random.default_rng(0)
  feats = jnp.asarray(rng.normal(size=(2, 7, 12)), jnp.float32)
  spk_a = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)
  params = head.init(jax.random.PRNGKey(0), feats, spk_a)
  proj_a, logits_a = head.apply(params, feats, spk_a)
  proj_b, logits_b = head.apply(params, feats, -spk_a)
  np.testing.assert_array_equal(proj_a, proj_b)
  assert float(jnp.abs(logits_a - logits_b).max()) > 1e-3
  np.testing.assert_array_equal(
      head.apply(params, feats, method="project"), proj_a)
  with pytest.raises(ValueError, match="speaker embedding"):
    head.apply(params, feats)
  # Off: the tree is the unconditioned head's, whatever init was given.
  plain = ContentHead(dim=8, num_components=5).init(
      jax.random.PRNGKey(0), feats, spk_a)
  assert "speaker_input" not in plain["params"]
