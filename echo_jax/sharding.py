"""Device mesh, FSDP parameter shardings and global batches.

Params are sharded by one small rule (FSDP): a big enough array is split over
the 'fsdp' axis along its largest dimension that divides evenly; everything
else is replicated. The batch is split over both mesh axes. Nothing here is
global: the mesh is built once and passed around.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_config: Mapping[str, int], devices=None) -> Mesh:
  """Builds a ('data', 'fsdp') mesh; one axis may be -1 (= the rest)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  sizes = {axis: int(mesh_config.get(axis, 1)) for axis in BATCH_AXES}
  unknown = [a for a, s in sizes.items() if s == -1]
  if len(unknown) > 1:
    raise ValueError(f"At most one mesh axis may be -1, got {sizes}.")
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  if unknown:
    if devices.size % known:
      raise ValueError(f"{devices.size} devices do not split into mesh {sizes}.")
    sizes[unknown[0]] = devices.size // known
  if int(np.prod(list(sizes.values()))) != devices.size:
    raise ValueError(f"Mesh {sizes} needs {np.prod(list(sizes.values()))} "
                     f"devices but {devices.size} are available; set "
                     "--config.mesh.data=-1 to use them all.")
  return Mesh(devices.reshape(sizes["data"], sizes["fsdp"]), BATCH_AXES)


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int,
              min_size: int = 2**14) -> P:
  """Shards the largest evenly divisible dim over 'fsdp' for big arrays."""
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def param_shardings(tree, mesh: Mesh):
  """NamedShardings for a pytree of arrays / ShapeDtypeStructs."""
  fsdp_size = mesh.shape["fsdp"]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp_size)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over every mesh axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """Assembles this host's batch shard into global arrays on the mesh."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
