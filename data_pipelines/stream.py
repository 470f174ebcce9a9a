"""The training stream of a stage, from its `config.data` block.

`config.data` holds the stream's own settings (`STREAM_FIELDS`), every
`MixtureConfig` field and an `augment` block of `AugmentConfig` fields;
anything else is a typo and fails here, naming it. The
stage's objective terms say which example entries reach the devices (`keys`),
so mixtures for speaker training never ship `sources` and routing gets them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from data_pipelines import augment as augment_lib
from data_pipelines import manifest as manifest_lib
from data_pipelines import mixtures

STREAM_FIELDS = ("manifest", "corpus_size", "batch_size", "num_workers",
                 "wire_dtype", "augment")


def resolve_manifest(data_config) -> str:
  """The configured manifest, or the embedded default corpus (built once)."""
  if data_config.manifest:
    if not os.path.exists(data_config.manifest):
      raise FileNotFoundError(
          f"config.data.manifest={data_config.manifest} does not exist; "
          "prepare a corpus with tools/prepare_corpus.py or leave it empty "
          "for the embedded default corpus.")
    return data_config.manifest
  from data_pipelines import default_corpus  # Only needed for the default.
  return default_corpus.ensure_default_corpus(size=data_config.corpus_size)


def mixture_config(data_config) -> mixtures.MixtureConfig:
  """`MixtureConfig` from the matching fields of `config.data`."""
  fields = {f.name for f in dataclasses.fields(mixtures.MixtureConfig)}
  unknown = sorted(set(data_config) - fields - set(STREAM_FIELDS))
  if unknown:
    raise ValueError(f"config.data has unknown fields {unknown}; known: "
                     f"{sorted(fields | set(STREAM_FIELDS))}.")
  return mixtures.MixtureConfig(
      **{k: data_config[k] for k in fields if k in data_config})


def augment_config(data_config) -> augment_lib.AugmentConfig | None:
  """`AugmentConfig` from `config.data.augment` (None when absent)."""
  block = data_config.get("augment")
  if block is None:
    return None
  fields = {f.name for f in dataclasses.fields(augment_lib.AugmentConfig)}
  unknown = sorted(set(block) - fields)
  if unknown:
    raise ValueError(f"config.data.augment has unknown fields {unknown}; "
                     f"known: {sorted(fields)}.")
  return augment_lib.AugmentConfig(
      **{k: tuple(v) if isinstance(v, (list, tuple)) else v
         for k, v in block.items()})


def stage_stream(data_config, manifest_path: str, keys: Sequence[str], *,
                 seed: int, split: str = manifest_lib.TRAIN,
                 shard_index: int = 0, shard_count: int = 1):
  """This host's share of the stream, batched to the per-host batch size."""
  if data_config.batch_size % shard_count:
    raise ValueError(f"Global batch {data_config.batch_size} does not split "
                     f"over {shard_count} hosts.")
  return mixtures.mixture_dataset(
      manifest_path, split, mixture_config(data_config), seed=seed,
      batch_size=data_config.batch_size // shard_count,
      shard_index=shard_index, shard_count=shard_count,
      num_workers=data_config.num_workers, keys=tuple(keys),
      augment=augment_config(data_config),
      wire_dtype=data_config.get("wire_dtype", mixtures.DEFAULT_WIRE_DTYPE))
