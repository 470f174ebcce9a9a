"""XLA compile options the train step may use, per backend.

Which set pays is a property of the machine and the compute dtype, so none
is assumed: `models/auto_dtype.py` times an encoder block under each set
that XLA accepts here and the train step is compiled with the fastest.
On CPU the candidates are XLA's own dots and oneDNN's custom call
(`xla_cpu_experimental_onednn_custom_call`). Measured: on a 2-core AVX-512
host without AMX, oneDNN ran the attention matmuls 2.2x faster (whole fp32
step ~15%); on a 2-core AMX host (Sapphire Rapids) it took bfloat16
matmuls off XLA's AMX path and made the bfloat16 step 1.6x slower.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

DEFAULT = "default"
_BY_BACKEND = {"cpu": {"onednn": {"xla_cpu_experimental_onednn_custom_call":
                                  True}}}


def _compiles(options: dict, backend: str) -> bool:
  try:
    probe = jax.jit(lambda a: jnp.einsum("bqd,bkd->bqk", a, a),
                    compiler_options=options)
    a = jax.device_put(jnp.ones((1, 8, 8)), jax.devices(backend)[0])
    probe.lower(a).compile()
    return True
  except Exception as e:  # pylint: disable=broad-except
    logging.info("XLA options %s not taken on %s (%s).", options, backend,
                 str(e).splitlines()[0][:120])
    return False


@functools.cache
def candidates(backend: str | None = None) -> dict[str, dict]:
  """{name: compile options} to choose from on `backend` (default: the
  default backend): `DEFAULT` ({}) and each set this XLA accepts (an older
  or newer jaxlib that does not know an option simply loses that set)."""
  backend = backend or jax.default_backend()
  found = {DEFAULT: {}}
  for name, options in _BY_BACKEND.get(backend, {}).items():
    if _compiles(options, backend):
      found[name] = dict(options)
  return found


def jit_kwargs(name: str) -> dict:
  """`{"compiler_options": ...}` for jax.jit with candidate `name`, or {}
  (a jax without the argument never sees it)."""
  options = candidates()[name]
  return {"compiler_options": options} if options else {}
