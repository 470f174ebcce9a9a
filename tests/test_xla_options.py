"""Per-backend compile options: taken where XLA knows them, dropped where not."""

import jax
import jax.numpy as jnp
import numpy as np

from echo_jax import xla_options


def test_cpu_options_compile_and_keep_the_numbers():
  xla_options.train_step_options.cache_clear()
  options = xla_options.train_step_options("cpu")
  assert options == {"xla_cpu_experimental_onednn_custom_call": True}
  f = lambda q, k: jnp.einsum("bqhd,bkhd->bhqk", q, k)   # noqa: E731
  q, k = jax.random.normal(jax.random.key(0), (2, 2, 16, 4, 8))
  np.testing.assert_allclose(jax.jit(f, compiler_options=options)(q, k),
                             jax.jit(f)(q, k), rtol=1e-5, atol=1e-5)
  assert xla_options.jit_kwargs() == {"compiler_options": options}


def test_unknown_options_and_other_backends_get_none(monkeypatch):
  xla_options.train_step_options.cache_clear()
  assert xla_options.train_step_options("gpu") == {}
  monkeypatch.setitem(xla_options._BY_BACKEND, "cpu",
                      {"xla_cpu_no_such_option": True})
  xla_options.train_step_options.cache_clear()
  assert xla_options.train_step_options("cpu") == {}
  assert xla_options.jit_kwargs() == {}
  xla_options.train_step_options.cache_clear()
