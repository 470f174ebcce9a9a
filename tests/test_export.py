"""Export of a smoke checkpoint: stable names, safetensors -> NumPy forward,
the `jax.export` artifact reloaded, the ONNX graph in onnxruntime, each
against the live JAX model; `inspect` counts; clear errors.

The checkpoint is a stage-2 smoke-config train state saved by
`checkpointing.save`, with the trainer's `init_state` tree (shapes from
`jax.eval_shape`) and random values: LayerNorm scales 1 + N(0, 0.1), other
params N(0, 0.1), the EMA target drawn apart from the encoder, optimizer
moments 0. Training even one step would spend most of this file's time budget
compiling, and random values make a swapped or misnamed tensor (two LayerNorm
scales still at 1, say) change the outputs.
"""

import functools
import json
import os
import re
import shutil
import subprocess
import sys

import grain
import jax
import numpy as np
import onnxruntime
import pytest

from echo_jax import checkpointing, inference, trainer
from echo_jax.export import bundle, checks, jax_export, names, numpy_forward
from echo_jax.model import build_model, clip_samples, param_count
from experiments import stage2_speaker
from smoke_configs import smoke
from tools import export as export_tool

NUM_CLASSES = 5
HEADS = "speaker,activity,arcface"

# The smoke encoder's export names and shapes (width 64, 2 blocks, 2 heads,
# mlp 128, 4-frame patches of 80 mels).
_BLOCK = {
    "attn.q.kernel": [64, 64], "attn.q.bias": [64],
    "attn.k.kernel": [64, 64], "attn.k.bias": [64],
    "attn.v.kernel": [64, 64], "attn.v.bias": [64],
    "attn.out.kernel": [64, 64], "attn.out.bias": [64],
    "mlp.fc1.kernel": [64, 128], "mlp.fc1.bias": [128],
    "mlp.fc2.kernel": [128, 64], "mlp.fc2.bias": [64],
    "norm1.scale": [64], "norm1.bias": [64],
    "norm2.scale": [64], "norm2.bias": [64],
}
GOLDEN = {
    "encoder.patch_embed.kernel": [320, 64], "encoder.patch_embed.bias": [64],
    **{f"encoder.blocks.{i}.{k}": v for i in (0, 1) for k, v in _BLOCK.items()},
    "encoder.norm.scale": [64], "encoder.norm.bias": [64],
    "heads.rwse.layer_logits": [2, 2],
    "heads.speaker.pooling.attention_hidden.kernel": [192, 128],
    "heads.speaker.pooling.attention_hidden.bias": [128],
    "heads.speaker.pooling.attention_logits.kernel": [128, 64],
    "heads.speaker.pooling.attention_logits.bias": [64],
    "heads.speaker.projection.kernel": [128, 32],
    "heads.speaker.projection.bias": [32],
    "heads.activity.norm.scale": [192], "heads.activity.norm.bias": [192],
    "heads.activity.hidden.kernel": [192, 16],
    "heads.activity.hidden.bias": [16],
    "heads.activity.temporal.kernel": [3, 16, 16],
    "heads.activity.temporal.bias": [16],
    "heads.activity.logit.kernel": [16, 1], "heads.activity.logit.bias": [1],
    "heads.arcface.class_weights": [NUM_CLASSES, 32],
    "frontend.window_dft": [400, 514], "frontend.mel_filterbank": [80, 257],
}


def _random_state(abstract, seed: int) -> dict:
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if not np.issubdtype(leaf.dtype, np.floating) or "opt_state" in name:
      return np.zeros(leaf.shape, leaf.dtype)
    value = 0.1 * rng.standard_normal(leaf.shape)
    return (value + ("'scale'" in name)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("export") / "stage2")
  config = smoke(stage2_speaker.get_config)
  model = build_model(config, NUM_CLASSES)
  state = _random_state(jax.eval_shape(functools.partial(
      trainer.init_state, model, config, clip_samples(config))), seed=0)
  manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"))
  data = iter(grain.MapDataset.range(4).to_iter_dataset())
  checkpointing.save(manager, 3, state, data, config.to_dict(), force=True)
  checkpointing.finish(manager)
  return workdir


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("out"))
  status = export_tool.main(["--workdir", workdir, "--out", out,
                             "--heads", HEADS, "--clips", "2"])
  with open(os.path.join(out, export_tool.SUMMARY_FILE)) as f:
    return out, status, json.load(f)


def test_tool_checks_pass_on_random_audio_and_corpus_clips(exported):
  out, status, summary = exported
  assert status == 0, summary["failures"]
  assert set(summary["files"]) == {"model.safetensors", "config.json",
                                   "encoder.jax_exported", "encoder.onnx"}
  assert all(os.path.getsize(os.path.join(out, f)) == size
             for f, size in summary["files"].items())
  assert summary["heads"] == ["rwse", "speaker", "arcface", "activity"]
  # Stated tolerances, as absolute errors (outputs here are O(1)).
  for check, tolerance in (("numpy", 1e-4), ("jax_export", 1e-5),
                           ("onnx", 1e-4)):
    errors = summary["checks"][check]["max_abs_error"]
    assert set(errors) == {"random", "corpus"}
    for kind in errors.values():
      assert max(kind.values()) <= tolerance, (check, kind)
  assert set(summary["checks"]["numpy"]["max_abs_error"]["corpus"]) == {
      "hidden", "final", "rwse", "speaker", "activity", "arcface"}
  assert re.search(r"\[2, \d+\]$", summary["checked_on"]["corpus"])


@pytest.fixture(scope="module")
def live(workdir):
  """`waveform -> {output: array}` of the live JAX model (online weights)."""
  fn = checks.reference_fn(inference.load(workdir),
                           ["rwse", "speaker", "activity", "arcface"])
  return lambda wave: {k: np.asarray(v) for k, v in fn(wave).items()}


def test_numpy_forward_from_files_alone_matches_jax(live, exported, tmp_path):
  # The reference runs from a copy of numpy_forward.py in a fresh process
  # that never imports JAX or the rest of echo_jax.
  shutil.copy(numpy_forward.__file__, tmp_path / "standalone.py")
  wave = checks.random_audio(640, 37, seed=5).waveform
  np.save(tmp_path / "wave.npy", wave)
  script = (
      "import sys, numpy as np, standalone\n"
      f"config, tensors = standalone.load({exported[0]!r})\n"
      "out = standalone.forward(config, tensors, np.load('wave.npy'))\n"
      "np.savez('out.npz', **out)\n"
      "assert not [m for m in sys.modules if m.split('.')[0] in "
      "('jax', 'flax', 'echo_jax', 'torch')], 'imported a framework'\n")
  subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True)
  got = dict(np.load(tmp_path / "out.npz"))
  want = live(wave)
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], atol=1e-4, rtol=0)


def test_jax_export_reloads_with_free_batch_and_length(live, exported):
  artifact = jax_export.load(os.path.join(exported[0], "encoder.jax_exported"))
  assert set(artifact.platforms) == {"cpu", "cuda", "tpu"}
  assert str(artifact.in_avals[0].shape) == "(batch, 640*tokens)"
  wave = np.random.default_rng(1).normal(0, 0.1, (3, 640 * 21)).astype(
      np.float32)
  want = live(wave)
  got = artifact.call(wave)
  assert got["hidden"].shape == (2, 3, 21, 64)
  for key in ("hidden", "final"):
    np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=0)


def test_onnx_runs_in_onnxruntime_with_free_batch_and_length(live, exported):
  session = onnxruntime.InferenceSession(
      os.path.join(exported[0], "encoder.onnx"),
      providers=["CPUExecutionProvider"])
  dims = [d for d in session.get_inputs()[0].shape]
  assert dims == ["batch", "samples"]
  wave = np.random.default_rng(2).normal(0, 0.1, (2, 640 * 13)).astype(
      np.float32)
  hidden, final = session.run(["hidden", "final"], {"waveform": wave})
  want = live(wave)
  np.testing.assert_allclose(hidden, want["hidden"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(final, want["final"], atol=1e-4, rtol=0)


def test_names_are_stable_and_documented(exported):
  config, tensors = numpy_forward.load(exported[0])
  assert {k: list(v.shape) for k, v in tensors.items()} == GOLDEN
  assert config["tensors"] == GOLDEN
  assert all(v.dtype == np.float32 for v in tensors.values())
  assert "[in, out]" in config["layout"]
  assert config["encoder"]["patch_frames"] == 4
  assert config["heads"]["arcface"]["classes"] == NUM_CLASSES


def test_names_round_trip_to_the_flax_tree(workdir):
  loaded = inference.load(workdir)
  trees = {"encoder": loaded.params["encoder"],
           "heads": loaded.params["heads"]}
  back = names.unflatten(names.flatten(trees))
  jax.tree.map(np.testing.assert_array_equal, back,
               jax.tree.map(np.asarray, trees))
  # q, k, v are the fused kernel's three column blocks.
  flat = names.flatten(trees)
  qkv = np.asarray(trees["encoder"]["blocks_1"]["attn"]["qkv"]["kernel"])
  np.testing.assert_array_equal(flat["encoder.blocks.1.attn.k.kernel"],
                                qkv[:, 64:128])


def test_ema_export_holds_the_target_encoder(workdir):
  state, _, _ = checkpointing.load_state(workdir)
  ema = bundle.bundle_tensors(inference.load(workdir, weights="ema"), [])
  online = bundle.bundle_tensors(inference.load(workdir), [])
  target = np.asarray(state["target"]["patch_embed"]["kernel"])
  np.testing.assert_array_equal(ema["encoder.patch_embed.kernel"], target)
  assert not np.allclose(online["encoder.patch_embed.kernel"], target)


def test_inspect_prints_counts_from_metadata(workdir, capsys):
  assert export_tool.main(["inspect", "--workdir", workdir]) == 0
  text = capsys.readouterr().out
  state, _, _ = checkpointing.load_state(workdir)
  expected = {
      "params/encoder": param_count(state["params"]["encoder"]),
      "params/predictor": param_count(state["params"]["predictor"]),
      "params/heads/speaker": param_count(state["params"]["heads"]["speaker"]),
      "params": param_count(state["params"]),
      "target": param_count(state["target"]),
      "opt_state": param_count(state["opt_state"]),
  }
  counts = {line.split()[0]: int(line.split()[1].replace(",", ""))
            for line in text.splitlines()
            if line.startswith("  ") and len(line.split()) == 2
            and line.split()[1].replace(",", "").isdigit()}
  for name, count in expected.items():
    assert counts[name] == count, name
  assert "step 3 (saved steps [3])" in text
  assert "kernel  [320, 64] float32  20,480" in text


@pytest.mark.parametrize("argv, error, match", [
    (["--workdir", "{missing}", "--out", "{out}"], FileNotFoundError,
     "No checkpoint"),
    (["--workdir", "{workdir}", "--out", "{out}", "--step", "7"],
     FileNotFoundError, r"No step 7 .*saved steps: \[3\]"),
    (["--workdir", "{workdir}", "--out", "{out}", "--heads", "speakr"],
     ValueError, "Unknown heads \\['speakr'\\]"),
    (["inspect", "--workdir", "{missing}"], FileNotFoundError,
     "No checkpoints in"),
    (["inspect", "--workdir", "{workdir}", "--step", "7"], FileNotFoundError,
     "No step 7"),
])
def test_clear_errors(workdir, tmp_path, argv, error, match):
  values = {"workdir": workdir, "out": str(tmp_path / "out"),
            "missing": str(tmp_path / "nowhere")}
  with pytest.raises(error, match=match):
    export_tool.main([a.format(**values) for a in argv])


def test_heads_the_checkpoint_lacks_are_named():
  with pytest.raises(ValueError, match=r"no \['activity'\] head"):
    bundle.heads_to_export(["activity"], ["rwse", "speaker"])
  # A head brings the heads it reads.
  assert bundle.heads_to_export(["arcface"], ["rwse", "speaker", "arcface",
                                              "activity"]) == [
                                                  "rwse", "speaker", "arcface"]
