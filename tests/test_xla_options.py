"""Per-backend compile options: taken where XLA knows them, dropped where not."""

import jax
import jax.numpy as jnp
import numpy as np

from echo_jax import xla_options


def test_cpu_options_compile_and_keep_the_numbers():
  xla_options.candidates.cache_clear()
  found = xla_options.candidates("cpu")
  assert found == {"default": {}, "onednn": {
      "xla_cpu_experimental_onednn_custom_call": True}}
  f = lambda q, k: jnp.einsum("bqhd,bkhd->bhqk", q, k)   # noqa: E731
  q, k = jax.random.normal(jax.random.key(0), (2, 2, 16, 4, 8))
  np.testing.assert_allclose(jax.jit(f, **xla_options.jit_kwargs("onednn"))(
      q, k), jax.jit(f)(q, k), rtol=1e-5, atol=1e-5)
  assert xla_options.jit_kwargs("onednn") == {"compiler_options":
                                              found["onednn"]}
  assert xla_options.jit_kwargs("default") == {}


def test_unknown_options_and_other_backends_get_only_the_default(monkeypatch):
  xla_options.candidates.cache_clear()
  assert xla_options.candidates("gpu") == {"default": {}}
  monkeypatch.setitem(xla_options._BY_BACKEND, "cpu",
                      {"bogus": {"xla_cpu_no_such_option": True}})
  xla_options.candidates.cache_clear()
  assert xla_options.candidates("cpu") == {"default": {}}
  xla_options.candidates.cache_clear()
