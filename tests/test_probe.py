"""The probe API on a smoke-trained stage-2 model (one step: behaviour, not
quality), and the example notebook executed end to end on it."""

import dataclasses
import json
import os
import pathlib
import sys

import flax.linen as nn
import jax
import matplotlib
import numpy as np
import pytest
import soundfile
import threadpoolctl

from data_pipelines import audio_io
from data_pipelines import default_corpus
from data_pipelines import phonemes as phonemes_lib
from data_pipelines.framing import SAMPLE_RATE
from echo_jax import heads as heads_registry
from echo_jax import probe, sharding, trainer
from echo_jax.model import build_model
from experiments import stage1_jepa, stage2_speaker
from smoke_configs import smoke

matplotlib.use("Agg")
ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "tools" / "probe_example.ipynb"


@pytest.fixture(scope="module", autouse=True)
def one_openmp_thread():
  # OpenMP threads spin while they wait: on a shared 2-core machine that
  # makes scikit-learn's t-SNE and solvers many times slower.
  with threadpoolctl.threadpool_limits(limits=1):
    yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A stage-2 checkpoint after one step from scratch (no stage 1 needed)."""
  path = str(tmp_path_factory.mktemp("probe") / "stage2")
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, devices=jax.devices()[:1])
  trainer.train(smoke(stage2_speaker.get_config, total_steps=1,
                      **{"checkpoint.every": 1, "init_from.workdir": ""}),
                path, mesh=mesh)
  return path


@pytest.fixture(scope="module")
def stage2(workdir):
  return probe.Probe.load(workdir)


@pytest.fixture(scope="module")
def manifest():
  return default_corpus.ensure_default_corpus(size="tiny")


def _noise(n, seed=0):
  return (0.1 * np.random.default_rng(seed).standard_normal(n)).astype(
      np.float32)


def _tone(freq, n, seed):
  rng = np.random.default_rng(seed)
  t = np.arange(n) / SAMPLE_RATE
  wave = 0.5 * np.sin(2 * np.pi * freq * (1 + 0.02 * rng.standard_normal()) * t)
  return (wave + 0.01 * rng.standard_normal(n)).astype(np.float32)


def test_embed_shapes_and_inputs(stage2, tmp_path):
  s, p = stage2.chunk_samples, stage2.token_samples
  per_chunk = s // p
  path = str(tmp_path / "stereo_8k.wav")
  soundfile.write(path, np.stack([_noise(8000), _noise(8000, 1)], 1), 8000)
  inputs = [_noise(s + s // 2), path, np.stack([_noise(4000), _noise(4000)])]
  emb = stage2.embed(inputs, sample_rate=8000)
  lengths = [3 * s, SAMPLE_RATE, 8000]  # 8 kHz waveforms resampled.
  depth, width = stage2.model.encoder.depth, stage2.model.encoder.width
  assert emb.tokens.shape == (3, depth, 3 * per_chunk, width)
  assert emb.rwse.shape == (3, 3 * per_chunk, width)
  np.testing.assert_array_equal(emb.lengths, lengths)
  np.testing.assert_array_equal(emb.mask.sum(1), np.array(lengths) // p)
  assert emb.heads["speaker"].shape == (3, stage2.model.speaker_dim)
  assert emb.heads["activity"].shape == (3, 3 * per_chunk, 1)
  assert "arcface" not in emb.heads
  assert emb.names() == list(range(depth)) + ["rwse", "projection", "activity"]
  assert emb.pooled("projection").shape == (3, stage2.model.speaker_dim)
  assert emb.pooled(-1).shape == (3, width)
  items, tokens = emb.token_rows()
  assert emb.frames(0).shape == (emb.mask.sum(), width)
  np.testing.assert_array_equal(emb.frames("projection"),
                                emb.heads["speaker"][items])
  assert not emb.tokens[~emb.mask[:, None].repeat(depth, 1)].any()


def test_long_file_equals_manual_chunks(stage2, tmp_path):
  s = stage2.chunk_samples
  wave = _noise(2 * s + s // 2)
  path = str(tmp_path / "long.wav")
  soundfile.write(path, wave, SAMPLE_RATE, subtype="FLOAT")  # Exact samples.
  whole = stage2.embed([path])
  parts = stage2.embed([wave[:s], wave[s:2 * s], wave[2 * s:]])
  per_chunk = s // stage2.token_samples
  valid = int(whole.mask.sum())
  assert valid == 2 * per_chunk + per_chunk // 2
  manual = np.concatenate([parts.tokens[i, :, :per_chunk] for i in range(3)],
                          axis=1)
  manual_rwse = np.concatenate([parts.rwse[i, :per_chunk] for i in range(3)])
  np.testing.assert_allclose(whole.tokens[0, :, :valid], manual[:, :valid],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(whole.rwse[0, :valid], manual_rwse[:valid],
                             rtol=1e-5, atol=1e-5)


def test_padding_is_masked(stage2):
  s = stage2.chunk_samples
  short, long = _noise(s // 3, 1), _noise(2 * s, 2)
  alone = stage2.embed([short])
  batched = stage2.embed([short, long])
  t = alone.num_tokens
  np.testing.assert_allclose(batched.tokens[0, :, :t], alone.tokens[0],
                             rtol=1e-5, atol=1e-6)
  assert not batched.tokens[0, :, t:].any()
  for layer in ["projection", "rwse", 1]:
    np.testing.assert_allclose(batched.pooled(layer)[0],
                               alone.pooled(layer)[0], rtol=1e-4, atol=1e-5)


def test_speaker_knn_separable(stage2, tmp_path):
  # Two "speakers": tones two octaves apart, some given as files.
  items = []
  for i in range(4):
    for speaker, freq in (("low", 250.0), ("high", 2000.0)):
      wave = _tone(freq, SAMPLE_RATE, seed=10 * i + len(speaker))
      if i % 2:
        wave_path = str(tmp_path / f"{speaker}{i}.wav")
        soundfile.write(wave_path, wave, SAMPLE_RATE)
        wave = wave_path
      items.append((wave, speaker))
  report = stage2.speaker_knn(items, layer=0)
  assert report["top1"] == 1.0
  assert 0.0 <= report["eer"] <= 0.5
  # A hand-made separable embedding set through the same scoring.
  emb = stage2.embed([_noise(1000)] * 6)
  hand_made = np.repeat(np.eye(3, stage2.model.speaker_dim), 2, 0)
  emb = dataclasses.replace(emb, heads={"speaker": hand_made})
  scores = probe.speaker_scores(emb, list("aabbcc"), "projection")
  assert scores == {"top1": 1.0, "eer": 0.0}


def test_linear_probe_above_chance():
  rng = np.random.default_rng(0)
  speakers = np.repeat(np.arange(6), 40)
  labels = rng.integers(0, 3, len(speakers))
  centres = 3.0 * rng.standard_normal((3, 8))
  features = centres[labels] + rng.standard_normal((len(labels), 8))
  labels[:10] = phonemes_lib.SILENCE  # Left out.
  result = probe.linear_probe(features, labels, groups=speakers)
  assert result["accuracy"] > 0.9 > result["chance"] + 0.3
  assert result["num_train"] + result["num_test"] == len(labels) - 10
  test = speakers >= 4
  given = probe.linear_probe(features, labels, test=test)
  assert given["num_test"] == (test & (labels >= 0)).sum()
  noise = probe.linear_probe(rng.standard_normal((240, 8)), labels,
                             groups=speakers)
  assert noise["accuracy"] < 0.6
  with pytest.raises(ValueError, match="classes"):
    probe.linear_probe(features, np.zeros(len(labels), int))


def test_token_phonemes_follow_the_alignment(manifest, stage2):
  utts = [u for u in probe.corpus_utterances(manifest, per_speaker=1)
          if u.alignment][:2]
  p = stage2.token_samples
  num_tokens = max(u.num_samples for u in utts) // p + 2
  labels, inventory = probe.token_phonemes(manifest, utts, num_tokens, p)
  root = os.path.dirname(manifest)
  for u, row in zip(utts, labels):
    rows = phonemes_lib.read_alignment(os.path.join(root, u.alignment))
    for t in range(num_tokens):
      centre = (t * p + p // 2) / SAMPLE_RATE
      symbols = [sym for start, end, sym in rows if start <= centre < end]
      want = phonemes_lib.UNKNOWN
      if symbols and t * p + p // 2 < u.num_samples:
        want = inventory.id_of(symbols[-1])
      assert row[t] == want, (u.utt_id, t)
  assert (labels >= 0).mean() > 0.5


def test_latent_map_and_plot():
  rng = np.random.default_rng(0)
  labels = np.repeat(["a", "b", "c"], 10)
  x = rng.standard_normal((30, 5)) + 5 * (labels[:, None] == "a")
  for method in ("pca", "tsne"):
    points = probe.latent_map(x, method=method)
    assert points.shape == (30, 2) and np.isfinite(points).all()
  ax = probe.plot_latent_map(points, labels, title="map")
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b", "c"]
  with pytest.raises(ValueError, match="umap"):
    probe.latent_map(x, method="umap")


def test_bad_inputs(stage2, tmp_path):
  with pytest.raises(ValueError, match="empty"):
    stage2.embed([])
  with pytest.raises(TypeError, match="list"):
    stage2.embed(_noise(100))
  bad = _noise(SAMPLE_RATE)
  bad[10] = np.nan
  with pytest.raises(audio_io.BadAudio, match="input 1: non_finite"):
    stage2.embed([_noise(100), bad])
  path = str(tmp_path / "nan.wav")
  soundfile.write(path, bad, SAMPLE_RATE, subtype="FLOAT")
  with pytest.raises(audio_io.BadAudio, match="nan.wav: non_finite"):
    stage2.embed([path])
  emb = stage2.embed([_noise(SAMPLE_RATE)])
  with pytest.raises(ValueError, match="Unknown layer 'content'"):
    emb.pooled("content")
  with pytest.raises(ValueError, match="out of range"):
    emb.frames(7)
  with pytest.raises(ValueError, match="pairs"):
    stage2.speaker_knn([])


def test_stage1_and_new_heads_plug_in(stage2, monkeypatch):
  # Models of other stages reuse the checkpoint's encoder (a fresh init costs
  # seconds on the CPU). Stage 1: blocks only.
  n = stage2.num_samples
  model = build_model(smoke(stage1_jepa.get_config))
  params = {**stage2.params, "heads": {}}
  emb = probe.Probe(model, params, n).embed([_noise(n)])
  assert emb.rwse is None and emb.heads == {} and emb.names() == [0, 1]
  with pytest.raises(ValueError, match="Unknown layer 'projection'"):
    emb.pooled("projection")
  # A later stage's frame head appears without touching the probe.
  monkeypatch.setitem(heads_registry.HEADS, "content", heads_registry.HeadSpec(
      build=lambda m, info: nn.Dense(8),
      init_inputs=lambda s: (np.zeros((1, s.tokens, s.width)),)))
  config = smoke(stage2_speaker.get_config)
  with config.unlocked():
    config.model.heads = ("rwse", "speaker", "content")
  model = build_model(config)
  content = model.heads["content"].init(
      jax.random.PRNGKey(0), np.zeros((1, 4, model.encoder.width)))["params"]
  heads = {k: stage2.params["heads"][k] for k in ("rwse", "speaker")}
  params = {**stage2.params, "heads": {**heads, "content": content}}
  emb = probe.Probe(model, params, n).embed([_noise(n), _noise(n // 2)])
  assert emb.heads["content"].shape == (2, emb.num_tokens, 8)
  assert emb.frames("content").shape == (emb.mask.sum(), 8)
  assert emb.pooled("content").shape == (2, 8)


def _kernel_dir(tmp_path: pathlib.Path) -> str:
  """A kernelspec that runs this interpreter (the venv's), whatever `python`
  is first on PATH."""
  spec = tmp_path / "jupyter" / "kernels" / "echo-probe"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f",
               "{connection_file}"],
      "display_name": "echo-probe", "language": "python"}))
  return str(tmp_path / "jupyter")


def test_notebook_runs(workdir, manifest, tmp_path, monkeypatch):
  import nbclient
  import nbformat
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert all(not c.get("outputs") and not c.get("execution_count")
             for c in nb.cells if c.cell_type == "code"), (
                 "Commit the notebook with its outputs stripped.")
  params = next(c for c in nb.cells
                if "parameters" in c.metadata.get("tags", []))
  params.source += (f"\nWORKDIR = {workdir!r}\nMANIFEST = {manifest!r}\n"
                    "PER_SPEAKER = 4\nPROBE_TOKENS = 300\n"
                    "MAP_METHOD = 'pca'\nMAP_POINTS = 200\n")
  monkeypatch.setenv("JUPYTER_PATH", _kernel_dir(tmp_path))
  monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
  monkeypatch.setenv("OMP_NUM_THREADS", "1")  # See one_openmp_thread.
  client = nbclient.NotebookClient(
      nb, kernel_name="echo-probe", timeout=300,
      resources={"metadata": {"path": str(ROOT)}})
  client.execute()  # Raises CellExecutionError on any cell error.
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs)
  assert "projection" in text and "accuracy" in text
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]
  assert len(images) == 2  # Speaker bars and the maps.
