r"""The reference the performance work is judged against: a plain PyTorch eager
stage-1 JEPA step at the shapes `tools/bench_step.py` is run at.

  <python with torch> -m tools.bench_torch_step --batch_size=8 --steps=10

PyTorch is not a dependency of the project: run this with any interpreter
that has torch (and numpy). It builds the same computation as Echo-JAX's
stage 1 on log-mel input (the JAX step also computes the log-mel): a ViT
encoder (patch embedding + sin-cos positions, pre-LN blocks, final LayerNorm)
on the kept tokens, the EMA target encoder on all tokens (mean of the last
`--target_layers` layer-normed blocks), a narrow predictor (context tokens
projected in, a learned mask token at each target position), smooth-L1,
AdamW, and the EMA update. Masks: `--mask_fraction` of the tokens in spans of
`--span_tokens`, as `echo_jax/masking.py` draws them (the same counts for
every example). It prints s/step, examples/s and the matmul FLOPs that
torch's FlopCounterMode counts for one step, to compare with
`tools/bench_step.py`'s XLA count.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
  """Pre-LN transformer block (fused qkv, SDPA, GELU MLP)."""

  def __init__(self, width: int, heads: int, mlp: int):
    super().__init__()
    self.heads = heads
    self.norm1, self.norm2 = (nn.LayerNorm(width, eps=1e-6) for _ in range(2))
    self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
    self.fc1, self.fc2 = nn.Linear(width, mlp), nn.Linear(mlp, width)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, t, w = x.shape
    q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads,
                                           w // self.heads).permute(2, 0, 3,
                                                                    1, 4)
    y = F.scaled_dot_product_attention(q, k, v)
    x = x + self.out(y.transpose(1, 2).reshape(b, t, w))
    return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def sincos(tokens: int, width: int) -> torch.Tensor:
  pos = torch.arange(tokens, dtype=torch.float32)[:, None]
  freq = torch.exp(-math.log(10000.0) * torch.arange(0, width, 2) / width)
  return torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], dim=1)


def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
  return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


class Encoder(nn.Module):

  def __init__(self, width, depth, heads, mlp, patch_frames, n_mels, tokens):
    super().__init__()
    self.patch_frames = patch_frames
    self.embed = nn.Linear(patch_frames * n_mels, width)
    self.register_buffer("pos", sincos(tokens, width))
    self.blocks = nn.ModuleList(Block(width, heads, mlp) for _ in range(depth))
    self.norm = nn.LayerNorm(width, eps=1e-6)

  def forward(self, mel, keep=None):
    b, f, m = mel.shape
    t = f // self.patch_frames
    x = self.embed(mel[:, :t * self.patch_frames].reshape(b, t, -1))
    x = x + self.pos[:t]
    if keep is not None:
      x = gather(x, keep)
    hidden = []
    for block in self.blocks:
      x = block(x)
      hidden.append(x)
    return hidden, self.norm(x)


class Predictor(nn.Module):

  def __init__(self, enc_width, width, depth, heads, mlp, tokens):
    super().__init__()
    self.proj_in = nn.Linear(enc_width, width)
    self.mask_token = nn.Parameter(torch.zeros(width))
    self.register_buffer("pos", sincos(tokens, width))
    self.blocks = nn.ModuleList(Block(width, heads, mlp) for _ in range(depth))
    self.norm = nn.LayerNorm(width, eps=1e-6)
    self.proj_out = nn.Linear(width, enc_width)

  def forward(self, context, context_idx, target_idx):
    ctx = self.proj_in(context) + self.pos[context_idx]
    tgt = self.mask_token + self.pos[target_idx]
    x = torch.cat([ctx, tgt], dim=1)
    for block in self.blocks:
      x = block(x)
    return self.proj_out(self.norm(x[:, ctx.shape[1]:]))


def span_masks(rng, batch, tokens, fraction, span):
  """(context [B, keep], target [B, masked]) sorted token indices: spans of
  `span` tokens at random starts until round(fraction * tokens) are masked."""
  num_masked = round(fraction * tokens)
  ctx, tgt = [], []
  for _ in range(batch):
    masked = np.zeros(tokens, bool)
    while masked.sum() < num_masked:
      start = rng.integers(tokens)
      masked[start:start + span] = True
    on = np.flatnonzero(masked)[:num_masked]
    masked[:] = False
    masked[on] = True
    tgt.append(np.flatnonzero(masked))
    ctx.append(np.flatnonzero(~masked))
  return torch.from_numpy(np.stack(ctx)), torch.from_numpy(np.stack(tgt))


def layer_targets(hidden, num_layers):
  top = [F.layer_norm(h, h.shape[-1:]) for h in hidden[-num_layers:]]
  return torch.stack(top).mean(0)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--clip_seconds", type=float, default=4.0)
  p.add_argument("--patch_frames", type=int, default=4)
  p.add_argument("--mask_fraction", type=float, default=0.6)
  p.add_argument("--span_tokens", type=int, default=5)
  p.add_argument("--target_layers", type=int, default=4)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--dtype", choices=("float32", "bfloat16"),
                 default="float32", help="bfloat16: PyTorch's own mixed "
                 "precision (CPU autocast around the forward passes).")
  args = p.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  frames = int(args.clip_seconds * 100)           # 10 ms hop.
  tokens = frames // args.patch_frames
  online = Encoder(512, 8, 8, 2048, args.patch_frames, 80, tokens)
  predictor = Predictor(512, 256, 4, 4, 1024, tokens)
  target = Encoder(512, 8, 8, 2048, args.patch_frames, 80, tokens)
  target.load_state_dict(online.state_dict())
  target.requires_grad_(False)
  params = list(online.parameters()) + list(predictor.parameters())
  opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95),
                          weight_decay=0.05, foreach=True)
  rng = np.random.default_rng(0)
  mel = torch.randn(args.batch_size, frames, 80)

  autocast = torch.autocast("cpu", dtype=torch.bfloat16,
                            enabled=args.dtype == "bfloat16")

  def step():
    ctx_idx, tgt_idx = span_masks(rng, args.batch_size, tokens,
                                  args.mask_fraction, args.span_tokens)
    with torch.no_grad(), autocast:
      hidden, _ = target(mel)
      targets = gather(layer_targets(hidden, args.target_layers), tgt_idx)
    with autocast:
      _, context = online(mel, keep=ctx_idx)
      prediction = predictor(context, ctx_idx, tgt_idx)
    loss = F.smooth_l1_loss(prediction.float(), targets.float())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(list(target.parameters()),
                           list(online.parameters()), 1.0 - 0.996)
    return loss

  from torch.utils.flop_counter import FlopCounterMode
  counter = FlopCounterMode(display=False)
  with counter:
    step()
  for _ in range(args.warmup):
    step()
  times = []
  for _ in range(args.steps):
    tick = time.perf_counter()
    float(step())
    times.append(time.perf_counter() - tick)
  s = float(np.median(times))
  print(f"torch {torch.__version__}, {args.dtype}, {args.threads} threads, "
        f"batch "
        f"{args.batch_size}, {tokens} tokens: {s:.3f} s/step (median of "
        f"{args.steps}), {args.batch_size / s:.1f} examples/s, "
        f"{counter.get_total_flops() / 1e9:.1f} GFLOP/step counted",
        flush=True)


if __name__ == "__main__":
  main()
