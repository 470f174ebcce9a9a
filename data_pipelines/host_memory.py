"""Memory of the processes that make examples: fewer page faults per batch.

An augmented example costs ~2 ms of CPU; what the kernel spends mapping fresh
pages is a large part of that unless the processes keep their pages:

- `keep_heap_pad`: each example allocates and frees tens of arrays of
  0.1-1 MB; glibc keeps the freed heap instead of returning it.
- `stack_batch`: in a grain worker a batch is stacked straight into shared
  memory, whose pages are mapped in one call, so grain ships it to the main
  process without the copy (and the page faults) of `copy_to_shm`. Waveforms
  can go as 16-bit PCM in that copy: half the pages.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import grain
import numpy as np

from data_pipelines import storage

# glibc `mallopt` parameters (malloc.h) and Linux `madvise` advice (>= 5.14).
_M_TOP_PAD, _M_MMAP_THRESHOLD = -2, -3
_MADV_POPULATE_WRITE = 23

try:
  _LIBC = ctypes.CDLL(None)
except OSError:  # No C library to ask: the defaults stay.
  _LIBC = None

# Set in grain worker processes by `in_worker` (their `worker_init_fn`):
# only there does a batch go to shared memory, which the main process
# unlinks once it has read it.
_IN_WORKER = False


def keep_heap_pad(nbytes: int = 64 << 20) -> None:
  """Asks glibc's malloc to keep `nbytes` of freed heap rather than return it,
  and to serve arrays of up to 32 MB (a batch) from the heap, not from mmap.

  By default the heap is trimmed after an example's frees (or the array
  unmapped) and grown again by the next example, and the page faults of that
  regrowth cost a quarter of an augmented example's CPU time (measured: ~410
  -> ~500 mixtures per CPU-second). Process-wide; a no-op where the C
  library has no `mallopt`.
  """
  try:
    _LIBC.mallopt(_M_TOP_PAD, nbytes)
    _LIBC.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
  except AttributeError:
    pass


def in_worker(worker_index: int, worker_count: int) -> None:
  """`worker_init_fn` of grain's `mp_prefetch`: batches go to shared memory."""
  del worker_index, worker_count
  global _IN_WORKER
  _IN_WORKER = True


def _shared_array(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  """A fresh shared-memory array with its pages already mapped.

  Written page by page, fresh shared memory takes one fault per 4 KiB (a
  batch of 32 augmented 4 s examples: ~4,000 faults, ~0.2 ms per example);
  `MADV_POPULATE_WRITE` maps them in one call. Kernels before 5.14 refuse it
  and the pages fault in as they are written.
  """
  out = grain.multiprocessing.SharedMemoryArray(shape, dtype)
  if _LIBC is not None and out.nbytes:
    _LIBC.madvise(ctypes.c_void_p(out.ctypes.data),
                  ctypes.c_size_t(out.nbytes), _MADV_POPULATE_WRITE)
  return out


def stack_batch(examples: Sequence[dict[str, np.ndarray]],
                pcm16_keys: Sequence[str] = ()) -> dict[str, np.ndarray]:
  """Batch of flat example dicts (grain's `batch_fn`): `np.stack` per key, into
  shared memory inside a grain worker. Float waveforms under `pcm16_keys` are
  stored as int16 PCM (`storage.to_int16`: full scale [-1, 1), rounded,
  clipped) row by row in the same copy; grain takes
  `functools.partial(stack_batch, pcm16_keys=...)`.

  It must be the worker's last step: grain ships a shared array as it is and
  the main process unlinks it once read; an array a later worker-side map
  replaced would never be unlinked. grain's own shared-memory batching
  (`enable_shared_memory_output`) creates its arrays inside the stack, so
  their pages could not be mapped before the write.
  """
  batch = {}
  for key in examples[0]:
    leaves = [np.asarray(e[key]) for e in examples]
    shape = (len(leaves),) + leaves[0].shape
    pcm16 = key in pcm16_keys and leaves[0].dtype.kind == "f"
    dtype = np.dtype(np.int16) if pcm16 else leaves[0].dtype
    shared = _IN_WORKER and leaves[0].size and not dtype.hasobject
    if pcm16:
      out = _shared_array(shape, dtype) if shared else np.empty(shape, dtype)
      for row, leaf in zip(out, leaves):
        storage.to_int16(leaf, out=row)
      batch[key] = out
    elif shared:
      batch[key] = np.stack(leaves, out=_shared_array(shape, dtype))
    else:
      batch[key] = np.stack(leaves)
  return batch
