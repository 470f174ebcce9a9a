"""Batches stacked into shared memory in grain workers, plain elsewhere."""

import grain
import numpy as np

from data_pipelines import host_memory
from data_pipelines import storage


def _examples(count=3):
  rng = np.random.default_rng(0)
  return [{"mixture": rng.standard_normal(1000).astype(np.float32),
           "speakers": np.array([i, -1], np.int32),
           "skipped": np.asarray(i, np.int32),
           "empty": np.zeros((0, 4), np.float32)} for i in range(count)]


def _assert_stacked(batch, examples):
  assert set(batch) == set(examples[0])
  for key, value in batch.items():
    expected = np.stack([e[key] for e in examples])
    assert value.dtype == expected.dtype and value.shape == expected.shape
    np.testing.assert_array_equal(value, expected)


def test_outside_a_worker_batches_are_private_arrays():
  examples = _examples()
  batch = host_memory.stack_batch(examples)
  _assert_stacked(batch, examples)
  assert not any(isinstance(v, grain.multiprocessing.SharedMemoryArray)
                 for v in batch.values())


def test_in_a_worker_batches_are_shared_memory(monkeypatch):
  monkeypatch.setattr(host_memory, "_IN_WORKER", False)
  host_memory.in_worker(0, 2)
  assert host_memory._IN_WORKER
  examples = _examples()
  batch = host_memory.stack_batch(examples)
  _assert_stacked(batch, examples)
  shared = {k for k, v in batch.items()
            if isinstance(v, grain.multiprocessing.SharedMemoryArray)}
  assert shared == {"mixture", "speakers", "skipped"}  # Not the empty one.
  for key in shared:
    batch[key].unlink_on_del()   # What the main process does once read.


def test_pcm16_keys_are_stacked_as_int16(monkeypatch):
  examples = _examples()
  for worker in (False, True):
    monkeypatch.setattr(host_memory, "_IN_WORKER", worker)
    batch = host_memory.stack_batch(examples,
                                    pcm16_keys=("mixture", "speakers"))
    assert batch["mixture"].dtype == np.int16
    assert (isinstance(batch["mixture"], grain.multiprocessing.SharedMemoryArray)
            == worker)
    np.testing.assert_array_equal(
        batch["mixture"],
        storage.to_int16(np.stack([e["mixture"] for e in examples])))
    # Integer entries are not waveforms: as they were.
    _assert_stacked({k: v for k, v in batch.items() if k != "mixture"},
                    [{k: v for k, v in e.items() if k != "mixture"}
                     for e in examples])
    if worker:
      for value in batch.values():
        if isinstance(value, grain.multiprocessing.SharedMemoryArray):
          value.unlink_on_del()
