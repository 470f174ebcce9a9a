"""Heads over the shared encoder, by name.

`config.model.heads` lists the heads a stage trains; `build_heads` makes their
Flax modules through `HEADS`, and each head initialises itself from the
encoder's feature shapes (`FeatureShapes`). Params live in
`params['heads'][name]`, so a later stage that lists more heads still restores
an earlier stage's ones by name.

A new head: its module (e.g. in `echo_jax/models/`), then one `HeadSpec` entry
in `HEADS` saying how to build it from the config and what it is applied to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax.numpy as jnp

from echo_jax.models import heads as heads_lib
from echo_jax.models.content_head import ContentHead
from echo_jax.models.router import SlotRouter
from echo_jax.models.rwse import RWSE
from echo_jax.objectives import arcface


@dataclasses.dataclass(frozen=True)
class FeatureShapes:
  """What heads are applied to, for one example of a training clip."""
  layers: int       # Encoder blocks (RWSE input: [layers, 1, tokens, width]).
  tokens: int
  width: int        # Encoder / RWSE feature width.
  speaker_dim: int  # Speaker embedding size (`config.model.speaker_embed_dim`).


@dataclasses.dataclass(frozen=True)
class BuildInfo:
  """Facts about the data a head may need to size itself."""
  num_classes: int = 0  # Train speakers (ArcFace class centres).


@dataclasses.dataclass(frozen=True)
class HeadSpec:
  build: Callable[[object, BuildInfo], nn.Module]  # (config.model, info).
  init_inputs: Callable[[FeatureShapes], tuple]     # Dummy inputs for `init`.


def _frames(s: FeatureShapes) -> tuple:
  return (jnp.zeros((1, s.tokens, s.width)),)


def _arcface(model_config, info: BuildInfo) -> nn.Module:
  if info.num_classes < 2:
    raise ValueError(
        f"The arcface head needs >= 2 train speakers, got {info.num_classes}.")
  return arcface.ArcFaceClassifier(num_classes=info.num_classes,
                                   embed_dim=model_config.speaker_embed_dim)


def _router(model_config) -> nn.Module:
  r = model_config.router
  return SlotRouter(num_slots=r.num_slots, width=r.width, depth=r.depth,
                    num_heads=r.num_heads, mlp_dim=r.mlp_dim,
                    latent_dim=model_config.encoder.width,
                    latent_hidden=r.latent_hidden,
                    activity_dim=r.activity_dim,
                    # Configs saved before the residual router lack it.
                    residual_layers=r.get("residual_layers", 0))


def _activity(model_config) -> nn.Module:
  hidden = model_config.get("activity_hidden", 0)
  if not hidden:  # Configs saved before the context head: a linear one.
    return nn.Dense(1)
  return heads_lib.ActivityHead(hidden=hidden,
                                kernel=model_config.activity_kernel)


HEADS: Mapping[str, HeadSpec] = {
    # Learned weighted sum of the encoder blocks: the features other heads read.
    "rwse": HeadSpec(
        build=lambda m, info: RWSE(num_heads=m.rwse_heads),
        init_inputs=lambda s: (jnp.zeros((s.layers, 1, s.tokens, s.width)),)),
    # Attentive statistics pooling -> speaker embedding.
    "speaker": HeadSpec(
        build=lambda m, info: heads_lib.SpeakerHead(
            embed_dim=m.speaker_embed_dim),
        init_inputs=_frames),
    # ArcFace class centres (train speakers) for the speaker embedding.
    "arcface": HeadSpec(
        build=_arcface,
        init_inputs=lambda s: (jnp.zeros((1, s.speaker_dim)),
                               jnp.zeros((1,), jnp.int32))),
    # Per-token speech logit (blind diarization's speech activity).
    "activity": HeadSpec(build=lambda m, info: _activity(m),
                         init_inputs=_frames),
    # Frame-level content projection + anchor-GMM component logits (stage 3).
    "content": HeadSpec(
        build=lambda m, info: ContentHead(
            dim=m.content_dim, num_components=m.content_components,
            # Configs saved before the speaker adversary lack the key.
            adversary_classes=(info.num_classes
                               if m.get("content_adversary", False) else 0),
            speaker_conditioned=m.get("content_speaker_conditioned", False)),
        init_inputs=lambda s: _frames(s) + (jnp.zeros((1, s.speaker_dim)),)),
    # Routing slots (stage 4): per slot a latent sequence, existence, activity.
    "router": HeadSpec(build=lambda m, info: _router(m),
                       init_inputs=lambda s: _frames(s) * 2),  # + base.
}


def build_heads(model_config, info: BuildInfo) -> dict[str, nn.Module]:
  """Modules of the heads `model_config.heads` lists, in that order."""
  unknown = [h for h in model_config.heads if h not in HEADS]
  if unknown:
    raise ValueError(f"config.model.heads has unknown heads {unknown}; known:"
                     f" {sorted(HEADS)}.")
  return {name: HEADS[name].build(model_config, info)
          for name in model_config.heads}
