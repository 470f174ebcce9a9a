"""`content`: phonetic content in the shared space (stage 3).

Targets are the anchor GMM's posteriors of the *clean* frames (the stream's
`clean` entry: the dry mixture, before room, noise and channel augmentation),
averaged over each token's frames. The encoder sees the clean clip,
or with `perturb.prob` a speaker-perturbed copy (`echo_jax.perturb`), with
time spans masked out of its input (masked frames set to 0, the normalised
log-mel's mean), and the content head predicts the targets at the masked
tokens (soft cross-entropy).

Speaker out of content: `cross_cov_weight` adds the mean squared
cross-correlation, over the batch, between the pooled speaker projection and
the pooled content projection of the clean clip. The speaker projection is
behind a stop-gradient and the content term never applies the ArcFace head,
so no gradient of this term reaches the speaker or ArcFace heads.

Perturbation invariance: `invariance_weight` asks the content projection of
the perturbed, masked copy to point where the unperturbed clip's projection
points, at the unmasked tokens (cosine, the unperturbed side behind a
stop-gradient), as ContentVec's invariance loss does: predicting the clean
copy's targets alone lets the projection keep the shift, so long as the
classifier undoes it.

Speaker-conditioned prediction: with `model.content_speaker_conditioned`
the component classifier also reads the clip's (stop-gradient) speaker
projection, so the speaker-dependent part of the acoustic targets need not
pass through the content projection (ContentVec).

Speaker adversary: with `adversary_weight`, a speaker classifier over the
pooled content projection (`ContentHead.speaker_logits`, train speakers)
learns from the projection behind a stop-gradient, while the projection
learns to leave that classifier's posterior uniform (the "domain confusion"
loss of Tzeng et al. 2015, steadier than a reversed gradient), the
classifier's weights behind a stop-gradient. The correlation penalty only
removes what is linear in the speaker projection; the adversary removes what
any linear read-out of the pooled projection finds.

The GMM (`echo_jax.anchors`) is read by a host callback (the file, fitted
first if missing, then cached in memory), so tracing the step, e.g. under
`jax.eval_shape`, never needs the corpus.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from echo_jax import anchors, audio, masking, perturb
from echo_jax.objectives import content as content_lib
from echo_jax.terms.base import StepInputs, Term


@functools.lru_cache(maxsize=4)
def _gmm(path: str, manifest: str, corpus_size: str,
         settings: anchors.AnchorSettings) -> anchors.Gmm:
  from data_pipelines import stream  # The corpus only when it is needed.
  manifest_path = stream.resolve_manifest(
      _DataRef(manifest=manifest, corpus_size=corpus_size))
  return anchors.load_or_fit(
      path or anchors.default_path(manifest_path, settings), manifest_path,
      settings)


class _DataRef(dict):
  __getattr__ = dict.__getitem__


def anchor_gmm(anchor_cfg) -> anchors.Gmm:
  """The GMM the content block `anchor_cfg` names (fitted if missing)."""
  return _gmm(anchor_cfg.path, anchor_cfg.manifest, anchor_cfg.corpus_size,
              anchors.AnchorSettings.from_config(anchor_cfg))


def anchor_arrays(anchor_cfg) -> dict[str, jax.Array]:
  """The GMM's arrays as step values (a host callback; see module doc)."""
  settings = anchors.AnchorSettings.from_config(anchor_cfg)
  fetch = lambda: anchor_gmm(anchor_cfg).arrays()  # noqa: E731
  return jax.pure_callback(fetch, anchors.shapes(settings))


def token_targets(model, anchor_cfg, clean_log_mel: jax.Array,
                  num_tokens: int) -> jax.Array:
  """GMM posteriors [B, T, K] of raw clean log-mel [B, F, n_mels]."""
  settings = anchors.AnchorSettings.from_config(anchor_cfg)
  feats = anchors.frame_features(clean_log_mel, settings)
  log_post = anchors.log_posteriors(anchor_arrays(anchor_cfg), feats)
  return jax.lax.stop_gradient(
      anchors.token_targets(log_post, model.patch_frames, num_tokens))


def speaker_adversary_loss(model, params: dict, pooled: jax.Array,
                           labels: jax.Array) -> tuple[jax.Array, dict]:
  """Classifier cross-entropy on the frozen pooled projection [B, D] plus the
  confusion loss (cross-entropy to the uniform posterior) through the frozen
  classifier; each part's gradient reaches only its own side."""
  if not getattr(model.heads["content"], "adversary_classes", 0):
    raise ValueError("objective.content.adversary_weight > 0 needs the "
                     "content head's speaker classifier: set "
                     "config.model.content_adversary=True.")
  logits = model.apply_head("content", params, jax.lax.stop_gradient(pooled),
                            method="speaker_logits")
  classifier = optax.softmax_cross_entropy_with_integer_labels(
      logits, labels).mean()
  frozen = {**params, "heads": {
      **params["heads"],
      "content": jax.lax.stop_gradient(params["heads"]["content"])}}
  log_q = jax.nn.log_softmax(model.apply_head(
      "content", frozen, pooled, method="speaker_logits"), -1)
  confusion = -jnp.mean(log_q)
  return classifier + confusion, {
      "content/adversary_ce": classifier, "content/confusion": confusion,
      "content/adversary_top1": jnp.mean(jnp.argmax(logits, -1) == labels)}


def loss(cfg, inputs: StepInputs, rng):
  model, params = inputs.model, inputs.params
  mask_rng, perturb_rng = jax.random.split(rng)
  clean = inputs.batch["clean"]                                   # [B, N]
  raw = audio.log_mel(clean, n_mels=model.n_mels)
  mel = audio.normalize_log_mel(raw, model.mel_mean, model.mel_std)
  b, num_tokens = mel.shape[0], model.num_tokens(clean.shape[-1])
  targets = token_targets(model, cfg.anchor, raw, num_tokens)

  metrics = {}
  if cfg.perturb.prob > 0:
    mel, shift = perturb.speaker_perturb(
        perturb_rng, mel, max_semitones=cfg.perturb.max_semitones,
        equalizer_db=cfg.perturb.equalizer_db, mel_std=model.mel_std,
        prob=cfg.perturb.prob)
    metrics["content/abs_shift"] = jnp.mean(jnp.abs(shift))
  _, target_idx = masking.span_mask(mask_rng, b, num_tokens,
                                    cfg.mask_fraction, tuple(cfg.span_tokens))
  masked = jnp.zeros((b, num_tokens), bool).at[
      jnp.arange(b)[:, None], target_idx].set(True)
  frame_masked = jnp.repeat(masked, model.patch_frames, axis=1)
  frame_masked = jnp.pad(frame_masked,
                         ((0, 0), (0, mel.shape[1] - frame_masked.shape[1])))
  mel = jnp.where(frame_masked[..., None], 0.0, mel)
  feats, _ = model.features(params, params["encoder"], mel)
  conditioned = getattr(model.heads["content"], "speaker_conditioned", False)
  speaker = None
  if cfg.cross_cov_weight or conditioned:  # Never trained by this term.
    speaker = jax.lax.stop_gradient(
        model.apply_head("speaker", params, inputs.features))
  view_projection, logits = model.apply_head(
      "content", params, feats, speaker if conditioned else None)
  ce = content_lib.soft_cross_entropy(targets, logits, masked)
  target_entropy = content_lib.entropy(targets, masked)
  agree = (jnp.argmax(logits, -1) == jnp.argmax(targets, -1)) & masked
  metrics.update({
      "content/ce": ce, "content/kl": ce - target_entropy,
      "content/target_entropy": target_entropy,
      "content/top1": jnp.sum(agree) / jnp.sum(masked)})
  total = ce
  if cfg.cross_cov_weight or cfg.adversary_weight or cfg.invariance_weight:
    projection = model.apply_head("content", params, inputs.features,
                                  method="project")
    pooled = projection.mean(1)
  if cfg.invariance_weight:
    invariance = content_lib.invariance_loss(view_projection, projection,
                                             ~masked)
    metrics["content/invariance"] = invariance
    total = total + cfg.invariance_weight * invariance
  if cfg.cross_cov_weight:
    xcorr = content_lib.cross_correlation_penalty(speaker, pooled)
    metrics["content/xcorr"] = xcorr
    total = total + cfg.cross_cov_weight * xcorr
  if cfg.adversary_weight:
    adversary, adversary_metrics = speaker_adversary_loss(
        model, params, pooled, inputs.batch["speakers"][:, 0])
    metrics.update(adversary_metrics)
    total = total + cfg.adversary_weight * adversary
  metrics["content/loss"] = total
  return total, metrics


TERM = Term(loss=loss, heads=("rwse", "content"),
            batch_keys=lambda cfg: ("mixture", "clean") + (
                ("speakers",) if cfg.adversary_weight else ()))
