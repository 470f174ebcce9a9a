"""The development view of a corpus (tools/dev_corpus.py)."""

import numpy as np
import pytest

from data_pipelines import default_corpus
from data_pipelines import manifest as manifest_lib
from data_pipelines import storage
from echo_jax.evaluators.eval_mixtures import HeldoutMixtures
from tools import dev_corpus


def test_dev_view_holds_out_train_speakers_only(tmp_path):
  source = default_corpus.ensure_default_corpus(size="tiny")
  original = manifest_lib.read_manifest(source)
  path = dev_corpus.main(["--manifest", source, "--out_dir",
                          str(tmp_path / "dev"), "--every", "3"])
  view = manifest_lib.read_manifest(path)

  train = manifest_lib.speakers_of(original, manifest_lib.TRAIN)
  dev = manifest_lib.speakers_of(view, manifest_lib.HELDOUT)
  assert dev == train[::3]
  assert manifest_lib.speakers_of(view, manifest_lib.TRAIN) == sorted(
      set(train) - set(dev))
  # The corpus's own held-out and unseen-variant speakers stay out.
  assert {u.split for u in view} == {manifest_lib.TRAIN, manifest_lib.HELDOUT}
  assert len(view) == len(manifest_lib.utterances_of(original,
                                                     manifest_lib.TRAIN))

  # Same audio and alignments through the relative paths.
  by_id = {u.utt_id: u for u in original}
  old_store, new_store = storage.AudioStore(source), storage.AudioStore(path)
  for u in view[::max(1, len(view) // 5)]:
    np.testing.assert_array_equal(new_store.read(u),
                                  old_store.read(by_id[u.utt_id]))
  mixes = HeldoutMixtures(path, seconds=2.0, k_min=1, k_max=2, seed=0)
  assert set(mixes.speakers) == set(dev)
  assert mixes.example(0)["mixture"].any()


def test_dev_view_refuses_too_few_speakers(tmp_path):
  source = default_corpus.ensure_default_corpus(size="tiny")
  with pytest.raises(ValueError, match="every must be >= 2"):
    dev_corpus.write_dev_manifest(source, str(tmp_path), every=1)
  with pytest.raises(ValueError, match="too few"):
    dev_corpus.write_dev_manifest(source, str(tmp_path), every=1000)
