"""The encoder as an ONNX graph (opset 17), waveform in, built from a bundle.

Built by hand with `onnx.helper` from the bundle's `config.json` and tensors,
op for op as `numpy_forward.log_mel` + `numpy_forward.encoder`, because
jax2onnx, the JAX-to-ONNX converter on PyPI, does not run with jax 0.12
(jax2tf + tf2onnx would need TensorFlow): jax2onnx 0.17.1 pins
orbax-checkpoint<0.11.37 (we use 0.12), and both it and 0.13.0 (the newest
whose pins fit constraints.txt), installed without their dependencies, fail
on jax 0.12 (they lower `jit` through `jax._src.core.ClosedJaxpr`, which jax
0.12 removed). The graph is plain ops (MatMul, LayerNormalization, Softmax,
Tanh, Pad, Gather, ...): no custom ops for runtimes or onward converters.

Input `waveform` float32 `[batch, samples]`, `samples` a multiple of
`hop * patch_frames` (as for the `jax.export` artifact). Outputs `hidden`
`[depth, batch, tokens, width]` and `final` `[batch, tokens, width]`.
Initializers carry the bundle's stable names, plus `positions.coarse` /
`positions.fine` (see `jax_export.position_tables`; at most MAX_TOKENS
tokens: past it the Gather fails).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from echo_jax.export import jax_export

OPSET = 17
IR_VERSION = 8  # The IR of opset 17: readable by older runtimes too.
MODEL_FILE = "encoder.onnx"
_INT_MAX = np.iinfo(np.int64).max
DOC = ("Echo encoder. waveform [batch, samples] float32 16 kHz, samples a "
       "multiple of hop * patch_frames -> hidden [depth, batch, tokens, "
       "width] (every block), final [batch, tokens, width] (final norm).")


class _Graph:
  """Accumulates nodes and initializers; `op` returns its output's name."""

  def __init__(self, tensors: dict[str, np.ndarray]):
    self.tensors = tensors
    self.nodes: list[onnx.NodeProto] = []
    self.initializers: dict[str, onnx.TensorProto] = {}

  def weight(self, name: str) -> str:
    """A bundle tensor, as an initializer under its stable name."""
    if name not in self.initializers:
      self.initializers[name] = numpy_helper.from_array(
          np.asarray(self.tensors[name], np.float32), name)
    return name

  def const(self, value, dtype=np.int64) -> str:
    name = f"const_{len(self.initializers)}"
    self.initializers[name] = numpy_helper.from_array(
        np.asarray(value, dtype), name)
    return name

  def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs):
    base = f"{op_type.lower()}_{len(self.nodes)}"
    names = [base] if outputs == 1 else [f"{base}_{i}" for i in range(outputs)]
    self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
    return names[0] if outputs == 1 else names

  def slice(self, x: str, starts, ends, axes) -> str:
    return self.op("Slice", x, self.const(starts), self.const(ends),
                   self.const(axes))

  def dense(self, x: str, name: str) -> str:
    return self.op("Add", self.op("MatMul", x, self.weight(f"{name}.kernel")),
                   self.weight(f"{name}.bias"))

  def layer_norm(self, x: str, name: str, eps: float) -> str:
    return self.op("LayerNormalization", x, self.weight(f"{name}.scale"),
                   self.weight(f"{name}.bias"), axis=-1, epsilon=eps)


def _log_mel(g: _Graph, fe: dict, wave: str) -> str:
  hop, n_fft, win = fe["hop"], fe["n_fft"], fe["win_length"]
  pad, offset = n_fft // 2, (n_fft - win) // 2
  padded = g.op("Pad", wave, g.const([0, pad, 0, pad]), mode="reflect")
  # Hop-long chunks from `offset`: frame t = chunks t, t + 1, head of t + 2
  # (frames + 2 chunks = samples + 2 hop, so the end is fixed from the back).
  chunks = g.op("Reshape", g.slice(padded, [offset],
                                   [-(2 * pad - offset - 2 * hop)], [1]),
                g.const([0, -1, hop]))
  framed = g.op("Concat", g.slice(chunks, [0], [-2], [1]),
                g.slice(chunks, [1], [-1], [1]),
                g.slice(chunks, [2, 0], [_INT_MAX, win - 2 * hop], [1, 2]),
                axis=2)
  spectrum = g.op("MatMul", framed, g.weight("frontend.window_dft"))
  bins = n_fft // 2 + 1
  real = g.slice(spectrum, [0], [bins], [2])
  imag = g.slice(spectrum, [bins], [2 * bins], [2])
  power = g.op("Add", g.op("Mul", real, real), g.op("Mul", imag, imag))
  mel = g.op("MatMul", power, g.op("Transpose",
                                   g.weight("frontend.mel_filterbank")))
  log = g.op("Log", g.op("Add", mel, g.const(fe["log_eps"], np.float32)))
  return g.op("Div", g.op("Sub", log, g.const(fe["mel_mean"], np.float32)),
              g.const(fe["mel_std"], np.float32))


def _positions(g: _Graph, x: str, width: int) -> str:
  """Sin-cos rows for t < tokens of x `[batch, tokens, width]`."""
  coarse, fine = jax_export.position_tables(width)
  g.initializers["positions.coarse"] = numpy_helper.from_array(
      coarse, "positions.coarse")
  g.initializers["positions.fine"] = numpy_helper.from_array(
      fine, "positions.fine")
  tokens = g.op("Gather", g.op("Shape", x), g.const(1), axis=0)
  t = g.op("Range", g.const(0), tokens, g.const(1))
  block = g.const(jax_export.POSITION_BLOCK)
  a = g.op("Gather", "positions.coarse", g.op("Div", t, block), axis=0)
  b = g.op("Gather", "positions.fine", g.op("Mod", t, block), axis=0)
  half = width // 2
  sin_a, cos_a = g.slice(a, [0], [half], [1]), g.slice(a, [half], [width], [1])
  sin_b, cos_b = g.slice(b, [0], [half], [1]), g.slice(b, [half], [width], [1])
  return g.op("Concat",
              g.op("Add", g.op("Mul", sin_a, cos_b), g.op("Mul", cos_a, sin_b)),
              g.op("Sub", g.op("Mul", cos_a, cos_b), g.op("Mul", sin_a, sin_b)),
              axis=1)


def _attention(g: _Graph, h: str, name: str, num_heads: int,
               head_dim: int) -> str:
  def heads(part: str, perm: list[int]) -> str:
    y = g.op("Reshape", g.dense(h, f"{name}.{part}"),
             g.const([0, 0, num_heads, head_dim]))
    return g.op("Transpose", y, perm=perm)
  q = heads("q", [0, 2, 1, 3])                     # [B, H, T, D]
  k = heads("k", [0, 2, 3, 1])                     # [B, H, D, T]
  v = heads("v", [0, 2, 1, 3])
  logits = g.op("Mul", g.op("MatMul", q, k),
                g.const(1.0 / np.sqrt(head_dim), np.float32))
  y = g.op("MatMul", g.op("Softmax", logits, axis=-1), v)
  y = g.op("Reshape", g.op("Transpose", y, perm=[0, 2, 1, 3]),
           g.const([0, 0, num_heads * head_dim]))
  return g.dense(y, f"{name}.out")


def _gelu_tanh(g: _Graph, x: str) -> str:
  cube = g.op("Mul", g.op("Mul", x, x), x)
  inner = g.op("Mul", g.op("Add", x, g.op("Mul", cube, g.const(
      0.044715, np.float32))), g.const(np.sqrt(2.0 / np.pi), np.float32))
  cdf = g.op("Mul", g.op("Add", g.op("Tanh", inner), g.const(1.0, np.float32)),
             g.const(0.5, np.float32))
  return g.op("Mul", x, cdf)


def build(config: dict, tensors: dict[str, np.ndarray]) -> onnx.ModelProto:
  """The encoder graph from a bundle's config and tensors."""
  enc = config["encoder"]
  width, depth, eps = enc["width"], enc["depth"], enc["layer_norm_epsilon"]
  g = _Graph(tensors)
  mel = _log_mel(g, config["frontend"], "waveform")
  patches = g.op("Reshape", mel,
                 g.const([0, -1, enc["patch_frames"] * enc["n_mels"]]))
  x = g.dense(patches, "encoder.patch_embed")
  x = g.op("Add", x, _positions(g, x, width))
  hidden = []
  for i in range(depth):
    block = f"encoder.blocks.{i}"
    x = g.op("Add", x, _attention(
        g, g.layer_norm(x, f"{block}.norm1", eps), f"{block}.attn",
        enc["num_heads"], enc["head_dim"]))
    h = _gelu_tanh(g, g.dense(g.layer_norm(x, f"{block}.norm2", eps),
                              f"{block}.mlp.fc1"))
    x = g.op("Add", x, g.dense(h, f"{block}.mlp.fc2"))
    hidden.append(g.op("Unsqueeze", x, g.const([0])))
  g.nodes.append(helper.make_node("Concat", hidden, ["hidden"], axis=0))
  g.nodes.append(helper.make_node(
      "LayerNormalization", [x, g.weight("encoder.norm.scale"),
                             g.weight("encoder.norm.bias")], ["final"],
      axis=-1, epsilon=eps))
  f32 = onnx.TensorProto.FLOAT
  graph = helper.make_graph(
      g.nodes, "echo_encoder",
      [helper.make_tensor_value_info("waveform", f32, ["batch", "samples"])],
      [helper.make_tensor_value_info("hidden", f32,
                                     [depth, "batch", "tokens", width]),
       helper.make_tensor_value_info("final", f32,
                                     ["batch", "tokens", width])],
      initializer=list(g.initializers.values()))
  model = helper.make_model(
      graph, opset_imports=[helper.make_opsetid("", OPSET)],
      ir_version=IR_VERSION, producer_name="echo_jax",
      doc_string=DOC)
  onnx.checker.check_model(model, full_check=True)
  return model


def session(path: str):
  """An onnxruntime (CPU) session of a saved graph."""
  import onnxruntime  # Only the checks need the runtime.
  return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])


def run(session, waveform: np.ndarray) -> dict[str, np.ndarray]:
  """{'hidden', 'final'} of `waveform` `[batch, samples]`."""
  hidden, final = session.run(["hidden", "final"],
                              {"waveform": np.asarray(waveform, np.float32)})
  return {"hidden": hidden, "final": final}
