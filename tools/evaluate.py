r"""Evaluates a trained workdir on your own data: speaker ID / EER on a
VoxCeleb-layout folder and DER on audio + RTTM (+ UEM); JSON out.

  python -m tools.evaluate --workdir runs/cpu/stage2 --voxceleb DIR \
      --rttm_dir REF --audio_dir AUDIO [--uem_dir UEM] --json out.json

Speaker ID: `DIR/<speaker>/<session>/<utterance>.<wav|flac|m4a|...>`. Each
file is read whole (any rate and channels, as corpus preparation reads it),
cut into chunks of the training clip length (the last one zero-padded and
masked), and its embedding is the length-weighted mean of the L2-normalised
chunk embeddings. Per speaker, half the utterances enrol and half are tested
(cosine k-NN top-1); the EER is over all utterance pairs
(`echo_jax/evaluators/speaker_metrics.py`). Reported for the speaker
projection where the stage has one (online params, as trained) and for every
layer of the EMA encoder, mean-pooled (as the trainer's speaker evaluator).

DER: every `*.rttm` in --rttm_dir is reference; each of its files is
diarized from `<audio_dir>/<file id>.<ext>` (the checkpoint's diarizer; PLDA
from `<workdir>/plda.npz` or fitted on its training corpus), or read from
--hyp_rttm_dir instead. With --uem_dir (`*.uem`) exactly the UEM's regions
are scored, else each file's reference + hypothesis extent. DER, missed, false
alarm and confusion at collars 0 and 0.25 s each side, per file and total
(pyannote.metrics, `echo_jax/diarization/scoring.py`).
"""

from __future__ import annotations

import argparse
import glob
import logging
import math
import os
from collections.abc import Sequence

import numpy as np

from data_pipelines import audio_io
from echo_jax import checkpointing, embed, inference
from echo_jax import diarizer as diarizer_lib
from echo_jax.diarization import rttm, scoring
from echo_jax.evaluators import speaker_metrics
from tools import cli

_log = logging.getLogger(__name__)

COLLARS = (0.0, 0.25)
BATCH = 8  # Chunks per model call.


def voxceleb_files(root: str) -> tuple[list[str], list[str]]:
  """(audio paths, their speakers) of `root/<speaker>/<session>/*`, sorted."""
  paths = sorted(p for p in glob.glob(os.path.join(root, "*", "*", "*"))
                 if audio_io.extension(p) in audio_io.AUDIO_EXTS
                 and os.path.isfile(p))
  speakers = [os.path.basename(os.path.dirname(os.path.dirname(p)))
              for p in paths]
  if len(set(speakers)) < 2:
    raise ValueError(
        f"{root}: found {len(paths)} audio files of {len(set(speakers))} "
        "speakers; speaker ID needs >= 2 speakers laid out as "
        "<speaker>/<session>/<utterance>.<ext> (VoxCeleb).")
  return paths, speakers


def chunks(samples: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """[N] -> (chunks [C, size] zero-padded, valid samples [C]); C >= 1."""
  count = max(1, math.ceil(len(samples) / size))
  padded = np.zeros(count * size, np.float32)
  padded[:len(samples)] = samples
  lengths = np.clip(len(samples) - size * np.arange(count), 1, size)
  return padded.reshape(count, size), lengths.astype(np.int32)


def pool_chunks(emb: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """[..., C, D] chunk embeddings -> [..., D]: length-weighted mean of the
  L2-normalised rows."""
  unit = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
  weights = lengths / lengths.sum()
  return np.einsum("...cd,c->...d", unit, weights)


def embed_files(workdir: str, paths: Sequence[str]) -> dict[str, np.ndarray]:
  """{"layers": [L, U, W] EMA encoder, "projection": [U, D] if the stage
  has a speaker head} for each file (latest checkpoint)."""
  ema = inference.load(workdir, weights="ema")
  layers_fn = embed.jit_with_model(embed.pooled_layers, ema.model)
  online = None
  if "speaker" in ema.model.heads:
    online = inference.load(workdir)
    projection_fn = embed.jit_with_model(embed.speaker_embeddings,
                                         online.model)
  layers, projection = [], []
  for i, path in enumerate(paths):
    waves, lengths = chunks(audio_io.read_audio(path).samples,
                            ema.num_samples)
    per_layer = embed.batched(
        lambda w, n: layers_fn(ema.params["encoder"], w, n), waves, lengths,
        batch_size=BATCH, axis=1)
    layers.append(pool_chunks(per_layer, lengths))
    if online is not None:
      projection.append(pool_chunks(embed.batched(
          lambda w, n: projection_fn(online.params, w, n), waves, lengths,
          batch_size=BATCH), lengths))
    if (i + 1) % 100 == 0:
      _log.info("Embedded %d of %d files.", i + 1, len(paths))
  out = {"layers": np.stack(layers, axis=1)}
  if projection:
    out["projection"] = np.stack(projection)
  return out


def evaluate_speakers(workdir: str, root: str, seed: int = 0) -> dict:
  """Speaker ID / EER of the stage's embeddings on a VoxCeleb-layout folder."""
  paths, speakers = voxceleb_files(root)
  _log.info("%s: %d files of %d speakers.", root, len(paths),
            len(set(speakers)))
  emb = embed_files(workdir, paths)
  labels = np.array(speakers)
  layers = [speaker_metrics.speaker_report(e, labels, seed=seed)
            for e in emb["layers"]]
  best = int(np.argmax([r["top1"] for r in layers]))
  results = dict(num_files=len(paths), num_speakers=len(set(speakers)),
                 layers=layers, best_layer=best)
  if "projection" in emb:
    results["projection"] = speaker_metrics.speaker_report(
        emb["projection"], labels, seed=seed)
  return results


def read_folder(folder: str, pattern: str, reader) -> dict:
  """Every `pattern` file of `folder` read by `reader`, merged by file id."""
  files = sorted(glob.glob(os.path.join(folder, pattern)))
  if not files:
    raise FileNotFoundError(f"No {pattern} file in {folder}.")
  merged: dict = {}
  for path in files:
    for file_id, items in reader(path).items():
      merged.setdefault(file_id, []).extend(items)
  return merged


def audio_for(audio_dir: str, file_ids: Sequence[str]) -> dict[str, str]:
  """{file id: its audio file in `audio_dir`}; every id must have one."""
  by_id = {diarizer_lib.file_id_of(name): os.path.join(audio_dir, name)
           for name in sorted(os.listdir(audio_dir))
           if audio_io.extension(name) in audio_io.AUDIO_EXTS}
  missing = sorted(set(file_ids) - set(by_id))
  if missing:
    raise FileNotFoundError(
        f"No audio in {audio_dir} for reference files {missing[:5]} (of "
        f"{len(missing)}); expected <file id>.<ext> with ext one of "
        f"{sorted(audio_io.AUDIO_EXTS)}.")
  return {f: by_id[f] for f in file_ids}


def evaluate_der(reference: dict, hypothesis: dict,
                 uem: dict | None = None) -> dict:
  """`scoring.score` at collars 0 and 0.25 s, with per-file results."""
  results = scoring.score(reference, hypothesis, uem, collars=COLLARS)
  results["num_files"] = len(results["per_file"])
  return results


def diarize_files(workdir: str, audio: dict[str, str],
                  plda_manifest: str | None = None) -> dict:
  """{file id: hypothesis segments} by the stage's diarizer."""
  diarizer = diarizer_lib.EchoDiarizer.from_workdir(workdir)
  diarizer.load_or_fit_plda(plda_manifest)
  return {file_id: diarizer.diarize_file(path, file_id)
          for file_id, path in audio.items()}


def format_results(results: dict) -> str:
  lines = []
  speaker = results.get("speaker")
  if speaker:
    lines.append(f"Speaker ID on {speaker['num_files']} files of "
                 f"{speaker['num_speakers']} speakers (k-NN top-1, EER):")
    if "projection" in speaker:
      p = speaker["projection"]
      lines.append(f"  speaker projection    {100 * p['top1']:5.1f}%  "
                   f"{100 * p['eer']:5.1f}%")
    for layer, r in enumerate(speaker["layers"]):
      mark = "  (best)" if layer == speaker["best_layer"] else ""
      lines.append(f"  EMA encoder layer {layer:<3d} {100 * r['top1']:5.1f}%"
                   f"  {100 * r['eer']:5.1f}%{mark}")
  der = results.get("diarization")
  if der:
    lines.append(f"DER on {der['num_files']} files (collar +-s: DER missed "
                 "false-alarm confusion):")
    for file_id, r in sorted(der["per_file"].items()):
      lines.append(f"  {file_id}: " + "; ".join(
          f"{c:g}: {100 * r[scoring.collar_key(c)]['der']:.1f}%"
          for c in COLLARS))
    for c in COLLARS:
      t = der[scoring.collar_key(c)]
      lines.append(f"  total, collar {c:g}: {100 * t['der']:.2f}% "
                   f"{100 * t['missed_rate']:.2f}% "
                   f"{100 * t['false_alarm_rate']:.2f}% "
                   f"{100 * t['confusion_rate']:.2f}%")
  return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", help="a trained stage's workdir, its "
                      "latest checkpoint (needed unless every hypothesis "
                      "comes from --hyp_rttm_dir)")
  parser.add_argument("--voxceleb", help="<speaker>/<session>/<utt> folder")
  parser.add_argument("--rttm_dir", help="reference *.rttm files")
  parser.add_argument("--audio_dir", help="<file id>.<ext> audio to diarize")
  parser.add_argument("--uem_dir", help="*.uem files: the scored regions")
  parser.add_argument("--hyp_rttm_dir", help="score these *.rttm hypotheses "
                      "instead of diarizing --audio_dir")
  parser.add_argument("--hyp_out", help="write the model's hypothesis RTTMs "
                      "here (<file id>.rttm)")
  parser.add_argument("--plda_manifest", default=None, help="manifest whose "
                      "train speakers fit the PLDA (default: the checkpoint's"
                      " corpus)")
  parser.add_argument("--seed", type=int, default=0,
                      help="enrolment/test split of speaker ID")
  parser.add_argument("--json", help="write the results here")
  args = parser.parse_args(argv)
  if not (args.voxceleb or args.rttm_dir):
    parser.error("nothing to evaluate: pass --voxceleb and/or --rttm_dir.")
  if args.rttm_dir and not (args.audio_dir or args.hyp_rttm_dir):
    parser.error("--rttm_dir needs --audio_dir (or --hyp_rttm_dir).")
  needs_model = args.voxceleb or (args.rttm_dir and not args.hyp_rttm_dir)
  if needs_model and not args.workdir:
    parser.error("--workdir is needed to embed or diarize audio.")
  return args


def main(argv: Sequence[str] | None = None) -> dict:
  cli.setup_logging(__name__, "echo_jax")
  args = parse_args(argv)
  results: dict = {"workdir": args.workdir}
  if args.workdir:
    steps = checkpointing.committed_steps(
        os.path.join(args.workdir, "checkpoints"))
    results["step"] = steps[-1] if steps else None
  if args.voxceleb:
    results["speaker"] = evaluate_speakers(args.workdir, args.voxceleb,
                                           args.seed)
  if args.rttm_dir:
    reference = read_folder(args.rttm_dir, "*.rttm", rttm.read_rttm)
    uem = (read_folder(args.uem_dir, "*.uem", rttm.read_uem)
           if args.uem_dir else None)
    if args.hyp_rttm_dir:
      hypothesis = read_folder(args.hyp_rttm_dir, "*.rttm", rttm.read_rttm)
    else:
      hypothesis = diarize_files(
          args.workdir, audio_for(args.audio_dir, sorted(reference)),
          args.plda_manifest)
      if args.hyp_out:
        os.makedirs(args.hyp_out, exist_ok=True)
        for file_id, segments in hypothesis.items():
          rttm.write_rttm(os.path.join(args.hyp_out, f"{file_id}.rttm"),
                          segments)
    results["diarization"] = evaluate_der(reference, hypothesis, uem)
  return cli.print_and_save(results, format_results(results), args.json)


if __name__ == "__main__":
  main()
