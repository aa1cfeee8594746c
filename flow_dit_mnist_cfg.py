"""
Class-conditional flow matching with a Diffusion Transformer (DiT) on MNIST, classifier-free
guidance (CFG), and a measurement of how often "generate a 7" really gives a 7.

What it teaches: a flow-matching model learns the velocity that carries a digit x0 along the
straight line x_t = (1 - t) x0 + t x1 to Gaussian noise x1; sampling runs that ODE backwards
from noise (t = 1) to data (t = 0). The network is a small DiT: 4x4 patches -> transformer
blocks whose LayerNorms are modulated by one condition vector c = embed(t) + embed(class)
(adaLN-Zero) -> pixels. During training the label is replaced by a learned "null" class 10% of
the time, so the same network also learns the unconditional velocity, and at sampling time
v = v_uncond + w * (v_cond - v_uncond) pushes samples towards the requested digit. --eval then
measures it: a small CNN classifier says which digit each sample shows, for several w, next to
a diversity figure, which turns the quality/diversity trade-off of guidance into a table.

Papers:
  Flow matching      Lipman et al. 2022          https://arxiv.org/abs/2210.02747
  Rectified flow     Liu, Gong & Liu 2022        https://arxiv.org/abs/2209.03003
  Logit-normal t     Esser et al. 2024 (SD3)     https://arxiv.org/abs/2403.03206
  DiT, adaLN-Zero    Peebles & Xie 2022          https://arxiv.org/abs/2212.09748
  CFG                Ho & Salimans 2022          https://arxiv.org/abs/2207.12598
  CFG interval       Kynkaanniemi et al. 2024    https://arxiv.org/abs/2404.07724
  Heun ODE sampler   Karras et al. 2022 (EDM)    https://arxiv.org/abs/2206.00364

Commands:
  python flow_dit_mnist_cfg.py --preset laptop          # laptop CPU: real digits in minutes
  python flow_dit_mnist_cfg.py --preset laptop --eval   # its class-fidelity table
  python flow_dit_mnist_cfg.py                      # MNIST on one GPU (30 epochs), then figures
  torchrun --standalone --nproc_per_node=4 flow_dit_mnist_cfg.py   # the same on 4 GPUs
  python flow_dit_mnist_cfg.py --resume             # continue from out/flow_dit_mnist/ckpt.pt
  python flow_dit_mnist_cfg.py --sample-only        # figures again from that checkpoint
  python flow_dit_mnist_cfg.py --eval               # class-fidelity table from that checkpoint
  python flow_dit_mnist_cfg.py --bench --compile    # speed table: fast vs plain path
  python flow_dit_mnist_cfg.py --train-size 4000    # 400 digits per class, as measured below
The laptop preset (PRESETS, beside the parser; `--help` lists its values) is counted in optimizer
steps, so it costs the same on 4,000 digits as on all 60,000; any flag given on the command line
overrides it. It writes to out/flow_dit_mnist_laptop, the GPU run to out/flow_dit_mnist; a fresh
run refuses a folder that already holds a checkpoint.

Outputs (in --out-dir): ckpt.pt, loss.png, samples_epochNNN.png previews, quality_curve.png (with
--eval-every: the accuracy of 100 fixed-noise samples against step and seconds), and the
experiments class_grid.png, guidance_sweep.png, uncond_cond_cfg.png, class_embeddings.png;
--eval adds classifier.pt, eval.csv and eval.png.

Measured (README.md has the tables), on the 5k-digit MNIST subset (4,000 training digits), a
2-core AMD EPYC CPU and torch 2.14.1: `python flow_dit_mnist_cfg.py --preset laptop` trains its
1.85M-parameter DiT for 1,800 steps at about 130 ms per step (4 min 54 s in all), and its learning
curve (100 samples at w = 4) reads 15% at step 300, 71% at 900, 90% at 1,500 and 95% at 1,800.
`python flow_dit_mnist_cfg.py --preset laptop --eval` (30 samples per digit and row, 20 Euler
steps, 67 s) then reads, at the default w = 4 guided only for t <= 0.7, 97.0% class accuracy (95%
interval 94.4-98.4%) with a within-class diversity of 15.6, 0.86 of the real test digits' 18.2
(which the classifier reads at 98.3%); guided over the whole path, w = 4 gives 100% but a
diversity of 13.6. GPU: not measured.

EMA: --ema-decay d averages the weights over about the last 1 / (1 - d) steps, after a warm-up in
which the EMA is the plain mean of all weights so far: the GPU default 0.9995 is the mean of the
first 2,000 steps, then a 2,000-step average in a 14,040-step run; the laptop preset's 0.996 a
250-step average in its 1,800 steps.

Left out on purpose: latent space / VAE (28x28 pixels are cheap), FID's Inception network (FD is
computed in the eval classifier's features instead), learned sigma, timestep shifting, adaptive
ODE solvers, minibatch optimal-transport couplings. Each would hide the lesson under machinery.
"""

import argparse
import contextlib
import copy
import csv
import math
import os
import signal
import statistics
import sys
import tempfile
import textwrap
import time
from functools import partial
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

SCRIPT = "flow_dit_mnist_cfg"
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the learned "no label" row of the class embedding table
IMAGE_SIZE, IN_CHANNELS = 28, 1  # MNIST and the synthetic digits are both 1 x 28 x 28
DIGITS = list("0123456789")  # class names in figures and the --eval table
# The flags that fix the network: checkpoints store them (nanoGPT's model_args) for --resume etc.
MODEL_ARGS = "dataset width depth heads patch_size mlp_ratio cond_dim conv_channels".split()
CHECKPOINT_PARTS = ("model", "ema", "optimizer", "scheduler", "scaler")  # with state_dict()s

# -----------------------------------------------------------------------------
# Flow matching: the probability path and the loss with label dropout
# Time convention, used everywhere below: t = 0 is data, t = 1 is pure noise.
#   x_t = (1 - t) x0 + t x1,   x0 ~ data,  x1 ~ N(0, I)
#   dx_t/dt = x1 - x0 = v      (the velocity the model learns; constant along each straight line)
# Sampling integrates dx/dt = v(x, t) backwards, from t = 1 to t = 0.


def sample_t(batch_size, device, t_sampling="uniform"):
    """Training times t in (0, 1), shape (B,)."""
    if t_sampling == "uniform":
        return torch.rand(batch_size, device=device)
    # logit-normal (Esser et al. 2024, Sec. 3.1): t = sigmoid(n), n ~ N(0, 1); puts more weight
    # on the middle of the path, where predicting the velocity is hardest.
    return torch.sigmoid(torch.randn(batch_size, device=device))


def interpolate(x0, x1, t):
    """x_t = (1 - t) x0 + t x1, t of shape (B,) broadcast over (B, C, H, W)."""
    t = t.view(-1, 1, 1, 1)
    return (1 - t) * x0 + t * x1


def flow_loss(model, x0, y, p_uncond, t_sampling="uniform"):
    """Conditional flow matching: E || v_theta(x_t, t, y) - (x1 - x0) ||^2 with label dropout."""
    B = x0.shape[0]
    # Label dropout: with probability p_uncond the label becomes the null class, so the same
    # network also learns the unconditional velocity that CFG needs at sampling time.
    y = torch.where(torch.rand(B, device=y.device) < p_uncond, NULL_CLASS, y)
    t = sample_t(B, x0.device, t_sampling)  # (B,)
    x1 = torch.randn_like(x0)  # (B, C, H, W) the noise end of each straight path
    x_t = interpolate(x0, x1, t)  # (B, C, H, W)
    v_pred = model(x_t, t, y)  # (B, C, H, W)
    return F.mse_loss(v_pred.float(), x1 - x0)  # target: the velocity dx_t/dt = x1 - x0


# -----------------------------------------------------------------------------
# Sampling: classifier-free guidance and the ODE solvers


@torch.no_grad()
def guided_velocity(model, x, t, y, w):
    """Classifier-free guidance (Ho & Salimans 2022): v = v_uncond + w * (v_cond - v_uncond).
    w = 1 is the plain conditional velocity, w = 0 the unconditional one, w > 1 pushes samples
    further towards the class. Both velocities come from ONE batched forward pass over [x; x]
    with labels [y; null] (only the conditional half at w = 1, only the unconditional one at
    w = 0); combined in float32."""
    null = torch.full_like(y, NULL_CLASS)
    if w in (0, 1):  # one velocity alone: the conditional (1) or unconditional (0)
        return model(x, t, y if w == 1 else null).float()
    v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2B, C, H, W)
    v_cond, v_uncond = v.float().chunk(2)  # 2 x (B, C, H, W)
    return v_uncond + w * (v_cond - v_uncond)


@torch.no_grad()
def sample_ode(velocity_fn, x1, steps, solver="euler"):
    """Integrate dx/dt = velocity_fn(x, t) from t = 1 (noise x1) to t = 0 (data) in `steps` equal
    steps of dt = -1/steps; velocity_fn maps x (B, ...) and a time t (a float) to a velocity.
      Euler: x <- x + dt v(x, t)                                     (1 call per step)
      Heun:  x' = x + dt v(x, t);  x <- x + dt (v(x, t) + v(x', t + dt)) / 2   (2 calls)"""
    x = x1.float()
    ts = torch.linspace(1.0, 0.0, steps + 1).tolist()  # floats: no device sync per step
    for t, t_next in zip(ts[:-1], ts[1:]):
        dt = t_next - t  # negative: we walk from noise back to data
        v = velocity_fn(x, t)
        if solver == "heun":
            v = 0.5 * (v + velocity_fn(x + dt * v, t_next))
        x = x + dt * v
    return x


@torch.no_grad()
def generate(model, y, w, noise, steps, solver="euler", interval=(0.0, 1.0)):
    """Images in [-1, 1] of the classes y (B,) at guidance scale w, from noise (B, C, H, W).
    Guidance interval (Kynkaanniemi et al. 2024): guide only while t lies in `interval` and use
    the conditional velocity (w = 1) elsewhere; (0, 1) guides the whole path."""

    def velocity(x, t):
        w_t = w if interval[0] <= t <= interval[1] else 1.0
        return guided_velocity(model, x, torch.full((len(x),), t, device=x.device), y, w_t)

    return sample_ode(velocity, noise, steps, solver).clamp(-1, 1)


# -----------------------------------------------------------------------------
# Model


def modulate(x, shift, scale):
    """adaLN: normalised tokens are shifted and scaled per sample by the condition."""
    return x * (1 + scale) + shift


def sincos_pos_embed_2d(dim, grid_size):
    """Fixed 2-D sin-cos position embedding (MAE / DiT): half of the channels encode the row,
    half the column, each with sin and cos at geometrically spaced frequencies."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (D/4,)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each

    def embed_1d(pos):
        angles = pos.reshape(-1, 1) * omega  # (G*G, D/4)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (G*G, D/2)

    return torch.cat([embed_1d(rows), embed_1d(cols)], dim=1).float()  # (G*G, D)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (B, cond_dim). The sinusoidal embedding was designed for integer steps
    0..1000 (Vaswani et al. / Ho et al.), so t is scaled by t_scale first: feeding raw t in [0, 1]
    would leave all but the lowest frequencies almost constant."""

    def __init__(self, cond_dim, freq_dim=256, t_scale=1000.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.t_scale = t_scale
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim)
        )

    @staticmethod
    def sinusoidal(t, dim, max_period=10000.0):
        """Computed in float32 even under autocast: bf16 cannot resolve 1000*t to one step."""
        half = dim // 2
        exponent = -math.log(max_period) * torch.arange(half, device=t.device) / half
        freqs = torch.exp(exponent.float())  # (D/2,)
        angles = t.float()[:, None] * freqs[None]  # (B, D/2)
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, D)

    def forward(self, t):
        return self.mlp(self.sinusoidal(t * self.t_scale, self.freq_dim))  # (B, cond_dim)


class LabelEmbedder(nn.Module):
    """Class label -> (B, cond_dim). Row NULL_CLASS is the learned "no label" embedding that
    carries the unconditional model. Labels are dropped in the loss, not here."""

    def __init__(self, cond_dim):
        super().__init__()
        self.table = nn.Embedding(NUM_CLASSES + 1, cond_dim)

    def forward(self, y):
        return self.table(y)  # (B, cond_dim)


class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.heads, D // self.heads)  # (B, L, 3, H, D/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, D/H)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, D/H), fused kernel where possible
        x = x.transpose(1, 2).reshape(B, L, D)  # (B, L, D)
        return self.proj(x)


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose LayerNorms are modulated by the condition (adaLN-Zero,
    Peebles & Xie Sec. 3.2): one Linear maps c to shift, scale and gate for attention and MLP."""

    def __init__(self, width, heads, mlp_ratio, cond_dim):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width)
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * width))

    def forward(self, x, c):
        mod = self.adaLN_modulation(c).unsqueeze(1)  # (B, 1, 6D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)  # 6 x (B, 1, D)
        x = x + gate_a * self.attn(modulate(self.norm1(x), shift_a, scale_a))  # (B, L, D)
        x = x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))  # (B, L, D)
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale; no gate) then a Linear from each token to its p*p*C pixels."""

    def __init__(self, width, patch_size, out_channels, cond_dim):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * width))
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)  # 2 x (B, 1, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, L, p*p*C)


class DiT(nn.Module):
    """Velocity model v(x_t, t, y): image (B, C, H, W), t (B,), label (B,) -> (B, C, H, W)."""

    def __init__(
        self,
        image_size=IMAGE_SIZE,
        patch_size=4,
        in_channels=IN_CHANNELS,
        width=256,
        depth=6,
        heads=8,
        mlp_ratio=4.0,
        cond_dim=1024,
        conv_channels=0,
        label_init_std=0.02,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        # Optional pixel-level 3x3 convs around the transformer (U-ViT ends with one): the stem
        # lets each token see a pixel beyond its patch, the head mixes neighbouring patches'
        # outputs, so that no pixel depends on one token alone and the p x p grid does not show.
        C = conv_channels or in_channels  # channels per pixel around the transformer
        self.pixel_channels = C
        self.stem, self.head = nn.Identity(), nn.Identity()
        if conv_channels:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, C, 3, padding=1), nn.SiLU())
            self.head = nn.Sequential(nn.SiLU(), nn.Conv2d(C, in_channels, 3, padding=1))
        # Patchify: a strided conv is a Linear applied to every non-overlapping p x p patch.
        self.x_embedder = nn.Conv2d(C, width, patch_size, stride=patch_size)
        # Fixed, not learned; non-persistent, so checkpoints hold only trained weights.
        pos = sincos_pos_embed_2d(width, self.grid_size).unsqueeze(0)  # (1, L, D)
        self.register_buffer("pos_embed", pos, persistent=False)
        self.t_embedder = TimestepEmbedder(cond_dim)
        self.y_embedder = LabelEmbedder(cond_dim)
        self.blocks = nn.ModuleList(
            [DiTBlock(width, heads, mlp_ratio, cond_dim) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(width, patch_size, C, cond_dim)
        self.initialize_weights(label_init_std)

    def initialize_weights(self, label_init_std=0.02):
        # Every Linear: Xavier-uniform weights, zero bias (ViT / DiT).
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # Patch embedding: initialised like the Linear over flattened patches it is.
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        # Embeddings of t and y: small normal weights, as in DiT.
        nn.init.normal_(self.y_embedder.table.weight, std=label_init_std)
        for linear in self.t_embedder.mlp[::2]:
            nn.init.normal_(linear.weight, std=0.02)
        # adaLN-Zero: shift = scale = gate = 0, so each block starts as the identity map; the
        # final layer's modulation and output are zero too, so the untrained model predicts v = 0.
        zero = [block.adaLN_modulation[-1] for block in self.blocks]
        zero += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if isinstance(self.head, nn.Sequential):  # the head conv: zero bias, so still v = 0
            nn.init.zeros_(self.head[-1].bias)

    def unpatchify(self, x):
        B, p, g, C = x.shape[0], self.patch_size, self.grid_size, self.pixel_channels
        x = x.reshape(B, g, g, p, p, C)  # (B, G, G, p, p, C)
        x = torch.einsum("bhwpqc->bchpwq", x)  # (B, C, G, p, G, p)
        return x.reshape(B, C, g * p, g * p)  # (B, C, H, W)

    def forward(self, x, t, y):
        x = self.x_embedder(self.stem(x))  # (B, D, G, G)
        x = x.flatten(2).transpose(1, 2) + self.pos_embed  # (B, L, D), L = G*G tokens
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, cond_dim), one vector per sample
        for block in self.blocks:
            x = block(x, c)  # (B, L, D)
        x = self.final_layer(x, c)  # (B, L, p*p*C)
        return self.head(self.unpatchify(x))  # (B, C, H, W)


def build_model(args):
    return DiT(IMAGE_SIZE, args.patch_size, IN_CHANNELS, args.width, args.depth, args.heads,
               args.mlp_ratio, args.cond_dim, args.conv_channels, args.label_init_std)  # fmt: skip


# -----------------------------------------------------------------------------
# Data
# The whole training set is held in memory as one uint8 tensor (MNIST: 47 MB); batches are drawn
# by indexing it, with no DataLoader worker processes to feed.

# Synthetic digits are seven-segment glyphs: 6 corner nodes of a 1 x 2 box (x right, y down),
# segments a..g between pairs of nodes, and for each digit 0..9 the segments that are lit.
GLYPH_NODES = [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]  # TL, TR, ML, MR, BL, BR
GLYPH_SEGMENTS = [(0, 1), (1, 3), (3, 5), (4, 5), (2, 4), (0, 2), (2, 3)]  # a, b, c, d, e, f, g
DIGIT_SEGMENTS = "abcdef bc abdeg abcdg bcfg acdfg acdefg abc abcdefg abcdfg".split()


def make_synthetic(n, seed, chunk=1024):
    """n procedural digits, uint8 (n, 1, 28, 28), and labels (n,), like MNIST: a seven-segment
    glyph per class with random position, size, slant, corner wobble, stroke width and
    brightness, plus faint pixel noise. Learnable in minutes, and 1/7, 8/0/9, 5/6 differ by a
    single stroke, so unguided samples visibly drift between classes."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(n, *shape, generator=g)

    unit = torch.tensor(GLYPH_NODES, dtype=torch.float32)  # (6, 2)
    half_w, half_h = uniform(3.5, 5.5, 1), uniform(7.0, 9.5, 1)  # (n, 1) glyph half-size, px
    cx, cy = uniform(12.0, 16.0, 1), uniform(12.5, 15.5, 1)  # (n, 1) glyph centre
    slant = uniform(-0.1, 0.35, 1)  # (n, 1) italic shear
    nx = cx + (unit[:, 0] - 0.5) * 2 * half_w + slant * (1 - unit[:, 1]) * half_h  # (n, 6)
    ny = cy + (unit[:, 1] - 1) * half_h  # (n, 6)
    nodes = torch.stack([nx, ny], dim=-1) + uniform(-0.8, 0.8, 6, 2)  # (n, 6, 2) with wobble
    segments = torch.tensor(GLYPH_SEGMENTS)  # (7, 2) node indices
    lit = torch.tensor([[s in DIGIT_SEGMENTS[d] for s in "abcdefg"] for d in range(NUM_CLASSES)])
    stroke = uniform(0.6, 1.4, 1)  # (n, 1) half stroke width, px
    ink = uniform(0.75, 1.0, 1)  # (n, 1) brightness
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    pixels = torch.stack([xx, yy], dim=-1).reshape(1, 1, -1, 2)  # (1, 1, 784, 2)
    images = []
    for i in range(0, n, chunk):  # chunks bound the (chunk, 7, 784, 2) distance tensors
        a = nodes[i : i + chunk, segments[:, 0]]  # (m, 7, 2) segment starts
        b = nodes[i : i + chunk, segments[:, 1]]  # (m, 7, 2) segment ends
        ap, ab = pixels - a[:, :, None], (b - a)[:, :, None]  # (m, 7, 784, 2), (m, 7, 1, 2)
        s = ((ap * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-6)).clamp(0, 1)  # (m, 7, 784)
        dist = (ap - s[..., None] * ab).norm(dim=-1)  # (m, 7, 784) pixel-to-segment distance
        on = lit[labels[i : i + chunk]][:, :, None]  # (m, 7, 1)
        dist = torch.where(on, dist, torch.inf).amin(dim=1)  # (m, 784) to the nearest lit stroke
        img = (stroke[i : i + chunk] + 0.5 - dist).clamp(0, 1) * ink[i : i + chunk]  # antialiased
        img = img + 0.03 * torch.randn(img.shape, generator=g)
        images.append((img.clamp(0, 1) * 255).round().to(torch.uint8).view(-1, 1, 28, 28))
    return torch.cat(images), labels


def load_dataset(name, data_dir, synthetic_size, seed, train=True):
    """The whole training (or test) set as (uint8 images (N, 1, 28, 28), int64 labels (N,)). The
    synthetic test set is a fifth as large, drawn with another seed."""
    if name == "synthetic":
        n = synthetic_size if train else max(100, synthetic_size // 5)
        return make_synthetic(n, seed if train else seed + 1)
    import torchvision

    try:
        ds = torchvision.datasets.MNIST(data_dir, train=train, download=True)
    except (OSError, RuntimeError) as e:  # no network (URLError is an OSError), corrupt archive
        hint = "put the data there and pass --data-dir, or run offline with --dataset synthetic"
        fail(f"could not load mnist into {data_dir!r} ({type(e).__name__}); {hint}", code=1)
    return ds.data[:, None].contiguous(), torch.as_tensor(ds.targets)  # (60000, 1, 28, 28)


def to_model_range(images):
    """uint8 [0, 255] -> float [-1, 1], the range the flow starts from (x0) and returns to."""
    return images.float() / 127.5 - 1


def epoch_batches(num_items, batch_size, epoch, seed, rank=0, world_size=1, device="cpu"):
    """Index batches for one epoch: a permutation that depends only on seed and epoch (the same on
    every rank), cut into one equal shard per rank (the last N % world_size items are skipped, so
    every rank takes the same number of steps). Every batch holds batch_size items: the last,
    shorter one is left out (a new shape would make torch.compile compile again)."""
    g = torch.Generator().manual_seed(1_000_000 * seed + epoch)
    perm = torch.randperm(num_items, generator=g)
    perm = perm[: num_items - num_items % world_size][rank::world_size]
    full = len(perm) - len(perm) % batch_size
    return perm[:full].to(device).split(batch_size)


def balanced_subset(labels, size, seed):
    """Sorted indices of size / 10 randomly chosen items of each class, the same for one seed:
    --train-size 4000 on the full dataset trains on as many images as a 4,000-image set."""
    g, keep, per_class = torch.Generator().manual_seed(seed), [], size // NUM_CLASSES
    for c in range(NUM_CLASSES):
        of_class = (labels == c).nonzero()[:, 0]
        if len(of_class) < per_class:
            fail(f"--train-size {size} needs {per_class} images of each class, but the data holds "
                 f"only {len(of_class)} of class {c}")  # fmt: skip
        keep.append(of_class[torch.randperm(len(of_class), generator=g)[:per_class]])
    return torch.cat(keep).sort().values


# -----------------------------------------------------------------------------
# Experiments
# Each takes the model and `sample`: generate() with the run's steps, solver, guidance interval
# and autocast bound (setup()), so it runs from any checkpoint. Every figure reuses fixed noise so
# that only the quantity being studied changes.


def sample_rows(model, sample, y, scales, seed, batch=500, bar=None):
    """Samples (len(scales) * B, C, H, W) of the classes y (B,) at each guidance scale w in turn,
    every w from the same noise; at most `batch` images per pass, counted on a tqdm `bar`."""
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same numbers on any device
    noise = torch.randn(len(y), IN_CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(y.device)
    images = []
    for w in scales:
        for y_part, z in zip(y.split(batch), noise.split(batch)):
            images.append(sample(model, y_part, w, z))
            if bar is not None:
                bar.update(len(y_part))
    return torch.cat(images)


def plot_class_grid(model, sample, path, w, seed, per_class=8):
    """10 rows (digits 0..9) x per_class guided samples."""
    y = torch.arange(NUM_CLASSES, device=next(model.parameters()).device)
    images = sample_rows(model, sample, y.repeat_interleave(per_class), [w], seed)
    save_image_grid(images, path, f"One row per digit (CFG w={w:g})", DIGITS)


def plot_class_embeddings(model, path):
    """The learned class table, null row included: the raw matrix, the correlation between rows,
    and a 2-D PCA of the rows (the null row in red)."""
    emb = model.y_embedder.table.weight.detach().float().cpu().numpy()  # (11, cond_dim)
    names, ticks = [*DIGITS, "null"], range(NUM_CLASSES + 1)
    centred = emb - emb.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    pcs = centred @ vt[:2].T  # (11, 2) coordinates along the first two principal axes
    fig = figure(figsize=(17, 4.5), layout="constrained")
    ax0, ax1, ax2 = fig.subplots(1, 3)
    fig.colorbar(ax0.imshow(emb, aspect="auto", cmap="coolwarm", interpolation="nearest"), ax=ax0)
    ax0.set(title="Class embedding matrix (rows: labels)", xlabel="dimension")
    ax0.set_yticks(ticks, names)
    fig.colorbar(ax1.imshow(np.corrcoef(emb), cmap="coolwarm", vmin=-1, vmax=1), ax=ax1)
    ax1.set_title("Correlation between class embeddings")
    ax1.set_xticks(ticks, names)
    ax1.set_yticks(ticks, names)
    ax2.scatter(pcs[:, 0], pcs[:, 1], c=["C0"] * NUM_CLASSES + ["C3"])
    for (px, py), name in zip(pcs, names, strict=True):
        ax2.annotate(name, (px, py), textcoords="offset points", xytext=(4, 4))
    explained = (s[:2] ** 2).sum() / (s**2).sum()
    ax2.set(title=f"PCA of class embeddings ({explained:.0%} of variance)", xlabel="PC 1",
            ylabel="PC 2")  # fmt: skip
    fig.savefig(path, dpi=150, bbox_inches="tight")


def run_experiments(ema, sample, losses, args):
    """All figures of the lesson from a trained (EMA) model, no training needed."""
    out, w, n, seed = args.out_dir, args.guidance_scale, args.grid_per_class, args.seed
    plot_class_grid(ema, sample, f"{out}/class_grid.png", w, seed, n)
    # guidance_sweep.png: the same n noise images steered to --digit, one row per w
    scales = args.guidance_scales
    digits = torch.arange(NUM_CLASSES, device=next(ema.parameters()).device)
    images = sample_rows(ema, sample, digits[args.digit].repeat(n), scales, seed)
    title = f"Digit {args.digit} at growing guidance scale w (same noise in every row)"
    save_image_grid(images, f"{out}/guidance_sweep.png", title, [f"w={s:g}" for s in scales])
    # uncond_cond_cfg.png: a column per digit, each from its own noise; rows: unconditional (w=0,
    # the label is ignored), conditional (w=1) and guided (w)
    rows = {"uncond w=0": 0.0, "cond w=1": 1.0, f"CFG w={w:g}": w}
    images = sample_rows(ema, sample, digits, rows.values(), seed)
    title = "Unconditional vs conditional vs CFG, same noise"
    save_image_grid(images, f"{out}/uncond_cond_cfg.png", title, list(rows), DIGITS)
    plot_class_embeddings(ema, f"{out}/class_embeddings.png")
    if losses:
        save_loss_curve(losses, f"{out}/loss.png", f"{SCRIPT}: flow matching loss (MSE)")
    print(f"figures written to {out}")


# -----------------------------------------------------------------------------
# Evaluation: measured class fidelity
# A small CNN trained on the real training set judges which digit every sample shows. Accuracy
# and confidence measure "did we get a 7"; the mean pairwise distance between the samples of one
# class measures how varied the 7s are. The `real` row scores held-out test digits: a judge that
# cannot recognise them could not grade generated ones.


class Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return x + self.fn(x)


def build_classifier(in_channels):
    """A small ResNet-style CNN (0.2M parameters): conv-BN-ReLU stages with residual blocks."""

    def conv_bn(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU())  # fmt: skip

    return nn.Sequential(
        conv_bn(in_channels, 32), Residual(conv_bn(32, 32)), nn.MaxPool2d(2),  # (B, 32, H/2, W/2)
        conv_bn(32, 64), Residual(conv_bn(64, 64)), nn.MaxPool2d(2),  # (B, 64, H/4, W/4)
        conv_bn(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (B, 128)
        nn.Dropout(0.2), nn.Linear(128, NUM_CLASSES),  # (B, 10) logits
    )  # fmt: skip


def train_classifier(images, labels, steps, seed, device, batch_size=128, lr=2e-3):
    """AdamW, one-cycle lr, `steps` batches of uint8 images (N, C, H, W) shifted at random by up
    to 2 pixels: a fixed number of steps, so it costs the same on 4,000 digits or on 60,000."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the initial weights and dropout masks
    classifier = build_classifier(images.shape[1]).to(device)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    epochs = math.ceil(steps * batch_size / len(images))  # whole passes in a fresh order each
    order = torch.cat([torch.randperm(len(images), generator=g) for _ in range(epochs)])
    H, W = images.shape[-2:]
    for idx in order[: steps * batch_size].view(steps, batch_size):
        padded = F.pad(to_model_range(images[idx]), (2, 2, 2, 2), value=-1.0)
        dy, dx = torch.randint(0, 5, (2, len(idx)), generator=g).tolist()
        x = torch.stack([p[:, i : i + H, j : j + W] for p, i, j in zip(padded, dy, dx)])
        loss = F.cross_entropy(classifier(x.to(device)), labels[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return classifier.eval()


def get_classifier(path, trained_from, images, labels, steps, seed, device):
    """The classifier cached at `path` if trained from exactly `trained_from`, else a new one."""
    with contextlib.suppress(Exception):  # missing, unreadable or stale: train a new one
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["trained_from"] == trained_from:
            classifier = build_classifier(images.shape[1]).to(device)
            classifier.load_state_dict(state["model"])
            return classifier.eval()
    t0 = time.perf_counter()
    classifier = train_classifier(images, labels, steps, seed, device)
    save_checkpoint({"trained_from": trained_from, "model": classifier.state_dict()}, path)
    print(f"classifier: trained {steps} steps in {time.perf_counter() - t0:.0f} s, saved to {path}")
    return classifier


def mean_pairwise_distance(images):
    """Mean L2 distance over all pairs of distinct images (N, C, H, W), in [-1, 1] pixel units."""
    flat = images.flatten(1).double()  # (N, C*H*W)
    return (torch.cdist(flat, flat).sum() / (len(flat) * (len(flat) - 1))).item()


def frechet_distance(a, b):
    """Frechet distance between Gaussians fitted to features a (N, D) and b (M, D), as FID computes
    it (Heusel et al. 2017): |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), the last
    trace summed from the eigenvalues of that symmetric matrix. 0 for two sets with the same mean
    and covariance; a mean shift by c adds |c|^2."""
    (mu_a, s_a), (mu_b, s_b) = [(f.double().mean(0), torch.cov(f.double().T)) for f in (a, b)]
    values, vectors = torch.linalg.eigh(s_a)
    root_a = vectors @ values.clamp(min=0).sqrt().diag() @ vectors.T  # S_a^1/2
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * cross).item()


def wilson_interval(hits, n, z=1.96):
    """95% Wilson score interval of a proportion hits / n: unlike p +- 1.96 sqrt(p (1 - p) / n)
    it stays inside [0, 1] and does not shrink to a point at 0 or 1."""
    p, z2 = hits / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return centre - half, centre + half


@torch.no_grad()
def classify(classifier, images, device):
    """(logits (N, 10), penultimate features (N, 128)) of images (N, C, H, W), on the CPU."""
    features = torch.cat([classifier[:-1](x.to(device)).float().cpu() for x in images.split(500)])
    return classifier[-1](features.to(device)).float().cpu(), features


def fidelity(classifier, images, labels, device, reference=None):
    """accuracy: fraction classified as the requested class, with its 95% (Wilson) interval ci;
    confidence: mean probability of the requested class; diversity: mean pairwise distance within
    a class, averaged over classes; per_class: the accuracy of each class; fd: the Frechet
    distance between the images' and the `reference` features (if given). images (N, C, H, W) in
    [-1, 1], on the CPU."""
    logits, features = classify(classifier, images, device)
    probs = logits.softmax(-1)  # (N, 10)
    hit = (probs.argmax(1) == labels).float()  # (N,)
    classes = [c for c in range(NUM_CLASSES) if (labels == c).sum() >= 2]
    return {
        "accuracy": hit.mean().item(),
        "ci": wilson_interval(hit.sum().item(), len(hit)),
        "confidence": probs[torch.arange(len(labels)), labels].mean().item(),
        "diversity": statistics.mean(mean_pairwise_distance(images[labels == c]) for c in classes),
        "fd": math.nan if reference is None else frechet_distance(features, reference),
        "per_class": [hit[labels == c].mean().item() for c in range(NUM_CLASSES)],
    }


def split_in_halves(labels):
    """Indices of two halves of a labelled set, each class's items dealt alternately into them
    (whatever order the set is stored in): the real row's images and the FD reference."""
    return [
        torch.cat([(labels == c).nonzero()[i::2, 0] for c in range(NUM_CLASSES)]) for i in (0, 1)
    ]


def evaluate(model, sample, classifier, test_set, scales, interval, per_class, seed):
    """The --eval table, one row at a time as each is done: a `real` row for up to per_class test
    digits of each class, one row per guidance scale w on the whole path, and one per w > 1
    guided only in `interval`. Every row starts from the same noise, so the rows differ only by
    the guidance. FD compares each row with the other half of the test digits, so the `real`
    row's FD (real against real) is the floor that finite sample sizes leave."""
    device = next(model.parameters()).device
    images, labels = test_set
    halves = split_in_halves(labels)
    reference = classify(classifier, to_model_range(images[halves[1]]), device)[1]  # (M, 128)
    real = torch.cat([halves[0][labels[halves[0]] == c][:per_class] for c in range(NUM_CLASSES)])
    x_real, y_real = to_model_range(images[real]), labels[real]
    yield {"w": "real", "interval": None, "label": "real",
           **fidelity(classifier, x_real, y_real, device, reference)}  # fmt: skip
    y = torch.arange(NUM_CLASSES).repeat_interleave(per_class)  # (10 * per_class,)
    for w, where in [(w, None) for w in scales] + [(w, interval) for w in scales if w > 1]:
        guided = partial(sample, interval=where or (0, 1))
        label = f"{w:g}" + (" in [{:g}, {:g}]".format(*where) if where else "")
        with tqdm(total=len(y), desc=f"w = {label}", unit="img", leave=False) as bar:
            samples = sample_rows(model, guided, y.to(device), [w], seed, 100, bar).cpu()
        yield {"w": w, "interval": where, "label": label,
               **fidelity(classifier, samples, y, device, reference)}  # fmt: skip


def format_row(row, class_names):
    """One line of the --eval table (the header for row None): label, accuracy, its interval,
    confidence, diversity, FD, then each class's accuracy."""
    if row is None:
        columns = ["accuracy", "95% CI", "confidence", "diversity", "FD", *class_names]
        return f"{'w':>15}" + "".join(f"{h[:10]:>11}" for h in columns)
    values = [row["confidence"], row["diversity"], row["fd"], *row["per_class"]]
    cells = [f"{row['accuracy']:.3f}", "{:.2f}-{:.2f}".format(*row["ci"])]
    cells += [f"{v:.3f}" for v in values]
    return f"{row['label']:>15}" + "".join(f"{c:>11}" for c in cells)


def save_eval(rows, class_names, interval, out_dir):
    """eval.csv (the table, with each class's accuracy) and eval.png: accuracy, diversity and FD
    against w, and which classes guidance helps most."""
    header = ["w", "accuracy", "ci_low", "ci_high", "confidence", "diversity", "fd", *class_names]
    table = [[r["label"], r["accuracy"], *r["ci"], r["confidence"], r["diversity"], r["fd"],
              *r["per_class"]] for r in rows]  # fmt: skip
    with open(os.path.join(out_dir, "eval.csv"), "w", newline="") as f:
        csv.writer(f).writerows([header, *table])
    fig = figure(figsize=(21, 4))
    axes = fig.subplots(1, 4)
    whole, inside = ([r for r in rows[1:] if r["interval"] == i] for i in (None, interval))
    guided = "in [{:g}, {:g}]".format(*interval)
    for ax, key in zip(axes, ("accuracy", "diversity", "fd")):
        for part, style, name in ((whole, "o-", "whole path"), (inside, "s--", guided)):
            if part:
                ax.plot([r["w"] for r in part], [r[key] for r in part], style, label=name)
        ax.axhline(rows[0][key], ls=":", c="k")  # the real images
    for c, name in enumerate(class_names):
        axes[3].plot([r["w"] for r in whole], [r["per_class"][c] for r in whole], "o-", label=name)
    titles = ("classified as requested (dotted: real)", "diversity (dotted: real)",
              "FD to real test images (dotted: real)", "accuracy per class")  # fmt: skip
    for ax, title in zip(axes, titles):
        ax.set(xlabel="guidance scale w", title=title)
        ax.legend(fontsize=7)
    fig.savefig(os.path.join(out_dir, "eval.png"), dpi=150, bbox_inches="tight")


# -----------------------------------------------------------------------------
# Training


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema = decay * ema + (1 - decay) * model, for all tensors in one multi-tensor kernel."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def ema_decay_at(step, decay):
    """EMA decay for the update after optimizer step `step` (0-based): step / (step + 1) makes
    the EMA the plain mean of all weights so far, until that reaches `decay` at step
    1 / (1 - decay) - 1; from there on it averages over about the last 1 / (1 - decay) steps."""
    return min(decay, step / (step + 1))


def warmup_cosine(step, warmup_steps, total_steps):
    """lr multiplier: linear warm-up from 0 to 1, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1 + math.cos(math.pi * progress))


def setup(args, device, total_steps):
    """Everything a run needs, built alike for training, --sample-only, --eval and --bench: model,
    EMA and their compiled copies, AdamW, lr schedule, loss scaler, one training step, sampler."""
    dtype, ctx = precision(args.dtype, device)
    torch.manual_seed(args.seed)  # the same initial weights, and so the same EMA, on every rank
    model = build_model(args).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    # fused AdamW: one kernel for the whole update instead of several per parameter tensor
    optimizer = torch.optim.AdamW(model.parameters(), args.lr, weight_decay=args.weight_decay,
                                  fused=device.type in ("cuda", "cpu"))  # fmt: skip
    lr_lambda = partial(warmup_cosine, warmup_steps=args.warmup_steps, total_steps=total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 only
    train_model = DistributedDataParallel(model) if dist.is_initialized() else model
    # compile the DDP-wrapped model, so that the gradient all-reduce overlaps the backward pass;
    # training batches all have one shape (epoch_batches), so this compiles once
    train_model = torch.compile(train_model) if args.compile else train_model

    def step(x0, y, ema_decay):
        """loss, backward, clip, AdamW, EMA; returns the loss unsynced, so the GPU runs ahead."""
        with ctx:
            loss = flow_loss(train_model, x0, y, args.p_uncond, args.t_sampling)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # the scaler is a no-op except with --dtype fp16
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        update_ema(ema, model, ema_decay)
        scheduler.step()
        return loss.detach()

    def sample(model, y, w, noise, interval=args.guidance_interval):
        """generate() with this run's settings bound, under its autocast context."""
        with ctx:
            return generate(model, y, w, noise, args.sample_steps, args.solver, interval)

    # the EMA, compiled separately; dynamic: one graph for every batch size the figures use
    sampler = torch.compile(ema, dynamic=True) if args.compile else ema
    return SimpleNamespace(model=model, ema=ema, optimizer=optimizer, scheduler=scheduler,
                           scaler=scaler, step=step, sampler=sampler, sample=sample,
                           dtype=dtype)  # fmt: skip


def main(argv=None):
    args = get_args(argv)
    rank, world_size, device = setup_distributed(args.device)
    master = rank == 0  # only rank 0 prints, shows progress bars and writes files
    if args.bench:
        return benchmark(args, device)
    no_training = args.sample_only or args.eval
    ckpt_path = args.ckpt or os.path.join(args.out_dir, "ckpt.pt")
    check_output_paths(args.out_dir, ckpt_path, writes_ckpt=not no_training,
                       fresh=not (args.resume or no_training))  # fmt: skip
    if no_training:  # figures or the table from a checkpoint: one process is enough
        if world_size > 1:
            dist.destroy_process_group()
            if not master:
                return None
        ckpt = load_checkpoint(ckpt_path, args)  # and its MODEL_ARGS into args
        run = setup(args, device, total_steps=1)
        run.model.load_state_dict(ckpt["model"])
        run.ema.load_state_dict(ckpt["ema"])
        if args.sample_only:
            run_experiments(run.sampler, run.sample, ckpt["losses"], args)
        if args.eval:
            evaluate_checkpoint(run, args, device)
        return run.model
    ckpt = load_checkpoint(ckpt_path, args) if args.resume else None  # and its MODEL_ARGS

    if rank > 0:
        dist.barrier()  # rank 0 downloads the dataset first, the others then read it
    all_images, all_labels = load_dataset(args.dataset, args.data_dir, args.synthetic_size,
                                          args.seed)  # fmt: skip
    if world_size > 1 and rank == 0:
        dist.barrier()
    keep = slice(None)  # all digits, or a balanced subset chosen by the seed (on every rank alike)
    if args.train_size:
        keep = balanced_subset(all_labels, args.train_size, args.seed)
    images, labels = all_images[keep].to(device), all_labels[keep].to(device)  # MNIST: 47 MB
    rank_batch = args.batch_size // world_size
    steps_per_epoch = len(images) // world_size // rank_batch  # the last, shorter batch is left
    if steps_per_epoch == 0:
        fail(f"--batch-size {args.batch_size} is larger than the {len(images)} training images")
    max_steps = args.max_steps or args.epochs * steps_per_epoch  # the lr schedule spans them
    run, step, losses, saved_step = setup(args, device, max_steps), 0, [], None
    curve, seconds = [], 0.0  # the learning curve (step, seconds, accuracy); training time
    if ckpt:
        for part in CHECKPOINT_PARTS:
            if part != "scaler" or ckpt[part]:  # empty unless saved with --dtype fp16
                getattr(run, part).load_state_dict(ckpt[part])
        step, losses, saved_step = ckpt["step"], ckpt["losses"], ckpt["step"]
        curve, seconds = ckpt.get("curve", []), ckpt.get("seconds", 0.0)
    if master:
        resumed = f", resumed at step {step}" if ckpt else ""
        print(f"{sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M parameters, {device}, "
              f"{run.dtype}, {world_size} process(es), {len(images)} training images, "
              f"{max_steps} steps{resumed}")  # fmt: skip
    check_quality = None
    if master and args.eval_every:
        classifier = get_classifier(f"{args.out_dir}/classifier.pt", classifier_key(args),
                                    all_images, all_labels, args.classifier_steps, args.seed,
                                    device)  # fmt: skip
        check_quality = partial(quality_check, run.sampler, run.sample, classifier,
                                args.guidance_scale, args.seed)  # fmt: skip

    batches, window, stop, hint = None, [], False, args.preset is None
    bar = tqdm(total=max_steps, initial=step, disable=not master, leave=False, dynamic_ncols=True)
    t_start = t_log = time.perf_counter()
    with StopSignal() as stop_signal, bar:  # restores the signal handlers, closes the bar
        while step < max_steps and not stop:
            epoch, i = divmod(step, steps_per_epoch)
            if i == 0 or batches is None:  # a fresh order each epoch, a function of seed and epoch
                batches = epoch_batches(len(images), rank_batch, epoch, args.seed, rank,
                                        world_size, device)  # fmt: skip
            seed_step(args.seed, rank, step)
            x0, y = to_model_range(images[batches[i]]), labels[batches[i]]
            window.append(run.step(x0, y, ema_decay_at(step, args.ema_decay)))
            step, epoch_end = step + 1, (step + 1) % steps_per_epoch == 0 or step + 1 == max_steps
            bar.update()
            # the same on every rank: the check below makes all of them agree
            curve_due = args.eval_every and (step % args.eval_every == 0 or step == max_steps)
            if step % args.log_every and not epoch_end and not curve_due:
                continue
            # every --log-every steps one check: non-finite loss, Ctrl-C, all DDP ranks agreeing
            window_losses, nonfinite, stop = check_window(window, stop_signal.requested, world_size)
            if nonfinite:
                bad = (~window_losses.isfinite()).nonzero()  # empty if another rank had it
                bad_step = step - len(window) + 1 + (int(bad[0]) if len(bad) else 0)
                kept = f"{ckpt_path} still holds step {saved_step}" if saved_step else "nothing"
                fail(f"loss became non-finite at step {bad_step}; stopped without saving ({kept}"
                     " kept). Try a lower --lr, or --dtype fp32", code=1)  # fmt: skip
            losses += window_losses.tolist()
            now = time.perf_counter()
            dt, window = (now - t_log) / len(window), []
            if master:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                tqdm.write(f"epoch {epoch + 1:3d} | step {step:7d} | loss {losses[-1]:.4f} | lr "
                           f"{run.scheduler.get_last_lr()[0]:.2e} | {1e3 * dt:6.1f} ms/step | "
                           f"{args.batch_size / dt:6.0f} img/s")  # fmt: skip
                if hint:  # after the first window: a GPU-sized run on a laptop says so
                    hint = slow_hardware_hint(dt, max_steps, device)
            if master and curve_due:
                curve.append((step, seconds + now - t_start, check_quality()))
                tqdm.write(f"quality | step {step:7d} | {curve[-1][1]:6.0f} s | accuracy "
                           f"{curve[-1][2]:.3f} at w = {args.guidance_scale:g}")  # fmt: skip
                save_quality_curve(curve, f"{args.out_dir}/quality_curve.png")
            if stop or step == max_steps or (epoch_end and (epoch + 1) % args.save_every == 0):
                if master:
                    state = {k: getattr(run, k).state_dict() for k in CHECKPOINT_PARTS}
                    state["model_args"] = {key: getattr(args, key) for key in MODEL_ARGS}
                    state.update(script=SCRIPT, args=vars(args), step=step, losses=losses,
                                 curve=curve, seconds=seconds + now - t_start)  # fmt: skip
                    save_checkpoint(state, ckpt_path)
                saved_step = step
            if master and epoch_end and args.sample_every and (epoch + 1) % args.sample_every == 0:
                path = f"{args.out_dir}/samples_epoch{epoch + 1:03d}.png"
                plot_class_grid(run.sampler, run.sample, path, args.guidance_scale, args.seed, 4)
            t_log = time.perf_counter()

    if world_size > 1:  # every rank leaves the group here; rank 0 then draws the figures
        dist.barrier()  # the gloo threads idle first (a busy group can hang on exit)
        dist.destroy_process_group()
    if master:
        if stop:
            save_loss_curve(
                losses, f"{args.out_dir}/loss.png", f"{SCRIPT}: flow matching loss (MSE)"
            )
            print(f"interrupted at step {step}: saved {ckpt_path}; continue with --resume")
        else:
            print(f"done: {step} steps, checkpoint {ckpt_path}")
            run_experiments(run.sampler, run.sample, losses, args)
    return run.model


def slow_hardware_hint(seconds_per_step, steps, device):
    """One line when a run on a CPU or MPS device would take longer than a laptop recipe: the
    time of the whole run at the measured speed, and the preset that fits. Training goes on."""
    hours = seconds_per_step * steps / 3600
    if device.type in ("cpu", "mps") and hours > 1 / 6:
        tqdm.write(f"note: {steps} steps at {1e3 * seconds_per_step:.0f} ms/step take about "
                   f"{hours:.1f} h on this {device.type}; `--preset laptop` trains real digits "
                   "in minutes on a laptop CPU")  # fmt: skip
    return False  # said once at most


def classifier_key(args):
    """What the eval classifier is trained from: the cached one is valid for these only."""
    keys = "dataset data_dir synthetic_size seed classifier_steps".split()
    return {k: getattr(args, k) for k in keys}


def quality_check(model, sample, classifier, w, seed, per_class=10):
    """The learning curve's point: accuracy of a fixed set (the same noise every time) of
    per_class samples of each digit at guidance scale w."""
    device = next(model.parameters()).device
    y = torch.arange(NUM_CLASSES).repeat_interleave(per_class)  # (10 * per_class,)
    samples = sample_rows(model, sample, y.to(device), [w], seed).cpu()
    return fidelity(classifier, samples, y, device)["accuracy"]


def save_quality_curve(curve, path):
    """quality_curve.png: the learning curve's accuracy against step and wall-clock seconds."""
    steps, seconds, accuracy = zip(*curve)
    fig = figure(figsize=(10, 3.5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, x, label in zip(axes, (steps, seconds), ("optimizer step", "seconds since the start")):
        ax.plot(x, accuracy, "o-")
        ax.set(xlabel=label, ylim=(0, 1.02))
    axes[0].set_ylabel("classified as requested")
    fig.suptitle("Learning curve: 10 fixed-noise samples per digit, scored by the eval classifier")
    fig.savefig(path, dpi=150)


def evaluate_checkpoint(run, args, device):
    """--eval: the classifier (trained once, cached in --out-dir), then the fidelity table, each
    row printed as soon as it is done, then eval.csv and eval.png."""
    train_set, test_set = (load_dataset(args.dataset, args.data_dir, args.synthetic_size,
                                        args.seed, train) for train in (True, False))  # fmt: skip
    classifier = get_classifier(f"{args.out_dir}/classifier.pt", classifier_key(args), *train_set,
                                args.classifier_steps, args.seed, device)  # fmt: skip
    per_class = args.eval_per_class or (100 if device.type == "cuda" else 30)
    print(f"class fidelity: {per_class} samples per class and row, {args.solver} "
          f"{args.sample_steps} steps; accuracy with its 95% (Wilson) interval; FD: Frechet "
          "distance to half of the test digits in the classifier's features")  # fmt: skip
    t0, rows = time.perf_counter(), []
    print(format_row(None, DIGITS))
    for row in evaluate(run.sampler, run.sample, classifier, test_set, args.eval_scales,
                        args.eval_interval, per_class, args.seed):  # fmt: skip
        print(format_row(row, DIGITS), flush=True)
        rows.append(row)
    print(f"{len(rows) - 1} rows in {time.perf_counter() - t0:.0f} s")
    save_eval(rows, DIGITS, args.eval_interval, args.out_dir)


# -----------------------------------------------------------------------------
# Config


def checked(convert, is_valid, expected):
    """An argparse `type` that converts, then validates: one line naming the flag if bad."""

    def parse(text):
        with contextlib.suppress(ValueError):
            if is_valid(value := convert(text)):
                return value
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")

    return parse


def floats(text):  # "0.2,0.8" -> (0.2, 0.8)
    return tuple(float(v) for v in text.split(","))


positive_int = checked(int, lambda v: v > 0, "a positive integer")
nonnegative_int = checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = checked(float, lambda v: 0 < v < math.inf, "a positive number")
nonnegative_float = checked(float, lambda v: 0 <= v < math.inf, "a number >= 0")
probability = checked(float, lambda v: 0 <= v <= 1, "a probability in [0, 1]")
float_list = checked(floats, lambda v: 0 <= min(v) <= max(v) < math.inf, "numbers >= 0 like 0,1,4")
interval_pair = checked(floats, lambda v: len(v) == 2 and 0 <= v[0] < v[1] <= 1,
                        "two numbers LO,HI with 0 <= LO < HI <= 1, like 0.2,0.8")  # fmt: skip


# Presets: recipes of flag values; they become the parser's defaults, so a flag given on the
# command line wins. The laptop recipe is counted in optimizer steps, so it costs the same on the
# 4,000-digit subset as on full MNIST: a small DiT, 20x the lr, a short warm-up and EMA, a conv
# stem and head, loud class embeddings and guidance only for t <= 0.7.
PRESETS = {
    "laptop": {
        "width": 128, "depth": 4, "heads": 4, "cond_dim": 256, "conv_channels": 16,
        "label_init_std": 1.0, "batch_size": 64, "lr": 2e-3, "warmup_steps": 100,
        "max_steps": 1800, "ema_decay": 0.996, "guidance_interval": (0.0, 0.7),
        "sample_steps": 20, "eval_every": 300, "out_dir": "out/flow_dit_mnist_laptop",
    },
}  # fmt: skip


def preset_epilog():
    """--help's last lines: each preset as the flags it stands for."""

    def flag(key, value):  # ("ch_mult", [1, 2, 2]) -> "--ch-mult 1,2,2"
        value = ",".join(f"{v:g}" for v in value) if isinstance(value, (list, tuple)) else value
        return f"--{key.replace('_', '-')} {value}"

    wrap = partial(textwrap.fill, width=100, initial_indent="  ", subsequent_indent="      ",
                   break_on_hyphens=False)  # fmt: skip
    lines = [wrap(f"--preset {name}: " + " ".join(flag(k, v) for k, v in values.items()))
             for name, values in PRESETS.items()]  # fmt: skip
    return "presets (flags given on the command line win):\n" + "\n".join(lines)


def get_args(argv=None):
    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        """Defaults in the help, and the presets' epilog as written."""

    description = "Class-conditional flow matching with a DiT on MNIST, with CFG."
    p = argparse.ArgumentParser(f"{SCRIPT}.py", description=description, epilog=preset_epilog(),
                                formatter_class=Formatter)  # fmt: skip
    p.error = fail  # one line instead of the whole usage block, exit code 2
    # fmt: off
    p.add_argument("--preset", choices=tuple(PRESETS), help="a recipe of flag values (see below)")
    add = p.add_argument_group("data").add_argument
    add("--dataset", choices=("mnist", "synthetic"), default="mnist",
        help="torchvision MNIST, or procedural seven-segment digits built in memory")
    add("--data-dir", default="data", help="where torchvision finds or downloads MNIST")
    add("--train-size", type=nonnegative_int, default=0,
        help="train on a balanced subset: N/10 digits per class, chosen by --seed; 0: all")
    add("--synthetic-size", type=positive_int, default=10000, help="images in --dataset synthetic")
    add = p.add_argument_group("model").add_argument
    add("--width", type=positive_int, default=256, help="transformer width (channels)")
    add("--depth", type=positive_int, default=6, help="number of DiT blocks")
    add("--heads", type=positive_int, default=8, help="attention heads per block")
    add("--patch-size", type=positive_int, default=4, help="patch side, divides 28 (4: 49 tokens)")
    add("--mlp-ratio", type=positive_float, default=4.0, help="MLP width as a multiple of --width")
    add("--cond-dim", type=positive_int, default=1024, help="width of c = embed(t) + embed(y)")
    add("--conv-channels", type=nonnegative_int, default=0,
        help="if > 0: 3x3 convs of this width around the patches (hide their grid); 0: plain DiT")
    add("--label-init-std", type=positive_float, default=0.02,
        help="std of the initial class embeddings (DiT: 0.02; 1 lets the condition act sooner)")
    add = p.add_argument_group("flow matching").add_argument
    add("--t-sampling", choices=("uniform", "logit-normal"), default="uniform",
        help="training distribution of t: U(0, 1) or sigmoid(N(0, 1)) (Esser et al.)")
    add = p.add_argument_group("training").add_argument
    add("--epochs", type=positive_int, default=30, help="passes over the training set")
    add("--max-steps", type=positive_int, default=None,
        help="the run's length in optimizer steps (the lr schedule spans them); replaces --epochs")
    add("--batch-size", type=positive_int, default=128, help="global batch, split over ranks")
    add("--lr", type=positive_float, default=1e-4, help="peak AdamW learning rate")
    add("--weight-decay", type=nonnegative_float, default=0.01, help="AdamW decay")
    add("--warmup-steps", type=nonnegative_int, default=500, help="linear lr warm-up, then cosine")
    add("--grad-clip", type=positive_float, default=1.0, help="max gradient norm")
    add("--p-uncond", type=probability, default=0.1, help="label dropout to the null class")
    add("--ema-decay", type=probability, default=0.9995,
        help="EMA of the sampling weights: a plain mean at first, then over the last 1/(1-d) steps")
    add("--log-every", type=positive_int, default=50, help="steps between logs and loss checks")
    add("--save-every", type=positive_int, default=1, help="epochs between checkpoints")
    add("--sample-every", type=nonnegative_int, default=5,
        help="epochs between preview grids; 0: none")
    add("--resume", action="store_true", help="continue from --ckpt (default --out-dir/ckpt.pt)")
    add = p.add_argument_group("sampling").add_argument
    add("--guidance-scale", type=nonnegative_float, default=4.0,
        help="CFG scale w: 0 unconditional, 1 conditional, > 1 guided")
    add("--sample-steps", type=positive_int, default=50, help="ODE steps from t=1 to t=0")
    add("--guidance-interval", type=interval_pair, default=(0.0, 1.0), metavar="LO,HI",
        help="guide only while t is in [LO, HI] (t = 1 is noise), conditional elsewhere")
    add("--solver", choices=("euler", "heun"), default="euler", help="heun: 2nd order, 2x the cost")
    add("--digit", type=int, choices=range(NUM_CLASSES), default=7, metavar="0..9",
        help="digit shown in guidance_sweep.png")
    add("--guidance-scales", type=float_list, default=(1, 2, 3, 4, 5, 7),
        help="w of the rows of guidance_sweep.png")
    add("--grid-per-class", type=positive_int, default=8,
        help="samples per class in class_grid.png (and per row of guidance_sweep.png)")
    add("--sample-only", action="store_true", help="no training: the figures from --ckpt")
    add("--ckpt", default=None, help="checkpoint to read and write (default --out-dir/ckpt.pt)")
    add = p.add_argument_group("evaluation").add_argument
    add("--eval", action="store_true", help="no training: score --ckpt's samples with a classifier")
    add("--eval-per-class", type=positive_int, default=None,
        help="samples per class and row of the --eval table (>= 2); default 100 on CUDA, else 30")
    add("--eval-scales", type=float_list, default=(0, 1, 2, 3, 4, 6), help="w scored by --eval")
    add("--eval-interval", type=interval_pair, default=(0.0, 0.7), metavar="LO,HI",
        help="guidance interval of the table's extra rows (one per w > 1)")
    add("--eval-every", type=nonnegative_int, default=0,
        help="steps between learning-curve checks (100 samples at --guidance-scale scored by the "
             "eval classifier, quality_curve.png); 0: none")
    add("--classifier-steps", type=positive_int, default=300,
        help="training steps (batch 128) of the eval classifier")
    add = p.add_argument_group("system").add_argument
    add("--out-dir", default="out/flow_dit_mnist", help="checkpoint, figures and eval table")
    add("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"), help="cuda > mps > cpu")
    add("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
        help="autocast precision; auto = bf16 on GPUs with native bf16 (compute capability 8.0+), "
             "fp16 on older GPUs, fp32 on CPU and MPS")
    add("--compile", action="store_true", help="torch.compile the model and the sampling EMA")
    add("--seed", type=nonnegative_int, default=0, help="random seed")
    add("--bench", action="store_true", help="time fast vs plain training and sampling, then exit")
    add("--bench-steps", type=positive_int, default=20, help="timed training steps per variant")
    add("--bench-samples", type=positive_int, default=256, help="images per timed sampling run")
    # fmt: on
    args = p.parse_args(argv)
    if args.preset:  # the preset's values become the defaults: given flags still win
        p.set_defaults(**PRESETS[args.preset])
        args = p.parse_args(argv)
    p.set_defaults(**dict.fromkeys(vars(args)))  # parse again without defaults: what was given?
    args.given = tuple(k for k, v in vars(p.parse_args(argv)).items() if v is not None)

    # checks that involve several flags, still before any data or model is touched
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world_size:
        p.error(f"--batch-size {args.batch_size} is not divisible by the {world_size} ranks")
    if IMAGE_SIZE % args.patch_size:
        p.error(f"--patch-size {args.patch_size} must divide the image size {IMAGE_SIZE}")
    if args.width % args.heads or args.width % 4:  # 4: the 2-D sin-cos position embedding
        p.error(f"--width {args.width} must be divisible by --heads {args.heads} and by 4")
    if args.train_size % NUM_CLASSES:
        p.error(
            f"--train-size {args.train_size} must be divisible by {NUM_CLASSES} (a balanced set)"
        )
    if args.eval_per_class is not None and args.eval_per_class < 2:
        p.error("--eval-per-class must be at least 2 (diversity is a pairwise distance)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but no CUDA device is visible (try --device cpu)")
    if args.device == "mps" and not torch.backends.mps.is_available():
        p.error("--device mps, but MPS is not available (try --device cpu)")
    if args.resume + args.bench + (args.sample_only or args.eval) > 1:
        p.error("choose one of --resume, --bench and --sample-only/--eval")
    if args.bench and world_size > 1:
        p.error("--bench runs in one process: start it with python, not torchrun")
    return args


# -----------------------------------------------------------------------------
# Utilities: device and precision, DDP, output paths, checkpoints, figures, --bench


def fail(message, code=2):
    """Exit with one clear line instead of a traceback (bad flag or checkpoint, missing data)."""
    print(f"{SCRIPT}.py: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def precision(name, device):
    """(dtype, autocast context). bf16/fp16 autocast runs convs and matmuls in half precision,
    norms, softmax and the loss in fp32; with fp32 the context is a no-op, so one `with ctx:`
    serves every precision. fp16 needs the GradScaler, which setup() switches on for it."""
    if name == "auto":
        # bf16 only where the GPU runs it natively (Ampere, compute capability 8.0+); older CUDA
        # GPUs (T4, V100) emulate it slowly: fp16 with the loss scaler there
        cuda = device.type == "cuda"
        native_bf16 = cuda and torch.cuda.get_device_capability(device) >= (8, 0)
        name = ("bf16" if native_bf16 else "fp16") if cuda else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    fp32 = dtype == torch.float32
    # fp32 is true fp32: no TF32 tensor cores in matmuls nor in cuDNN convolutions
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not fp32
    return dtype, contextlib.nullcontext() if fp32 else torch.autocast(device.type, dtype=dtype)


def setup_distributed(device_name):
    """(rank, world_size, device): DDP if torchrun set RANK, else one process. cuda > mps > cpu."""
    if device_name == "auto":
        mps = torch.backends.mps.is_available()
        device_name = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    device = torch.device(device_name)
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def seed_step(seed, rank, step):
    """Seed the draws of one training step (t, noise, label dropout) from (seed, rank, step)
    alone: a resumed run continues exactly, with no random state to save."""
    torch.manual_seed(hash((seed, rank, step)))


def check_window(window, stop_requested, world_size):
    """The window's losses on the CPU (one sync), and (non-finite, stop) agreed by all ranks."""
    losses = torch.stack(window).float()
    flags = torch.tensor([not losses.isfinite().all(), stop_requested], device=losses.device)
    if world_size > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    nonfinite, stop = flags.tolist()
    return losses.cpu(), nonfinite, stop


class StopSignal:
    """Inside `with StopSignal() as s:`, Ctrl-C or SIGTERM (schedulers, `kill`) sets s.requested,
    so the loop saves and exits cleanly at its next check; a second Ctrl-C aborts at once."""

    def __enter__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def check_output_paths(out_dir, ckpt_path, writes_ckpt, fresh=False):
    """Fail now, with one line, if the figures or the checkpoint could not be written later, or
    if a fresh run (no --resume) would overwrite another run's checkpoint."""
    if fresh and os.path.exists(ckpt_path):
        fail(f"{ckpt_path} already holds a run: continue it with --resume, or train a new one "
             "with another --out-dir")  # fmt: skip
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        fail(f"--out-dir {out_dir} is a file, not a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        fail(f"cannot create --out-dir {out_dir} ({e.strerror})")
    ckpt_dir = os.path.dirname(ckpt_path) or "."
    if writes_ckpt and not os.path.isdir(ckpt_dir):
        fail(f"--ckpt {ckpt_path}: the folder {ckpt_dir} does not exist")
    for folder in (out_dir, ckpt_dir) if writes_ckpt else (out_dir,):
        try:
            tempfile.TemporaryFile(dir=folder).close()  # a probe: can we create files there?
        except OSError as e:
            fail(f"cannot write to {folder} ({e.strerror})")


def save_checkpoint(state, path):
    """Atomic: a crash or kill during torch.save leaves the previous file at `path` untouched."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, args):
    """This script's checkpoint, its MODEL_ARGS copied into args; a contradicting flag: exit 2."""
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path}; train first, or point --ckpt at one")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, wrong format, pickled code: all mean "not loadable"
        fail(f"{path} is not a readable checkpoint ({type(e).__name__}); it may be truncated")
    if not isinstance(ckpt, dict) or ckpt.get("script") != SCRIPT or "model_args" not in ckpt:
        fail(f"{path} was not written by {SCRIPT}.py")
    for key, saved in ckpt["model_args"].items():
        flag = "--" + key.replace("_", "-")
        if key in args.given and getattr(args, key) != saved:
            fail(f"{path} was trained with {flag} {saved}; leave {flag} out or pass {flag} {saved}")
        setattr(args, key, saved)
    # the parameter names and shapes of the network these flags build (built on the CPU: under a
    # second, where the meta device's weight init would first import torch._dynamo, ~3 s)
    expected = {k: v.shape for k, v in build_model(args).state_dict().items()}
    if {k: v.shape for k, v in ckpt["model"].items()} != expected:
        fail(f"{path} holds the network of another version of {SCRIPT}.py; train again")
    return ckpt


def figure(**kwargs):
    """A matplotlib Figure for files, no pyplot; imported here, so importing the script is fast."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def save_image_grid(images, path, title, row_labels, col_labels=None):
    """Save images (rows * cols, 1, H, W) in [-1, 1], one row per row label, as a labelled PNG."""
    (n, c, h, w), nrow = images.shape, len(row_labels)
    ncol = n // nrow
    x = F.pad((images.float().cpu().clamp(-1, 1) + 1) / 2, (1, 1, 1, 1), value=1.0)
    h, w = h + 2, w + 2  # with a one-pixel white frame
    x = x.view(nrow, ncol, c, h, w).permute(0, 3, 1, 4, 2).reshape(nrow * h, ncol * w, c)
    ax = figure(figsize=(1 + 0.8 * ncol, 0.8 + 0.8 * nrow)).subplots()
    ax.imshow(x.squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([w * (i + 0.5) for i in range(ncol)] if col_labels else [], col_labels or [])
    ax.set_yticks([h * (i + 0.5) for i in range(nrow)], row_labels)
    ax.tick_params(labelsize=8)
    ax.set_title(title, fontsize=10)
    ax.figure.savefig(path, dpi=150, bbox_inches="tight")


def save_loss_curve(losses, path, title):
    fig = figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(losses, lw=0.5, alpha=0.4, label="per step")
    window = max(1, len(losses) // 50)
    smooth = torch.tensor(losses).unfold(0, window, 1).mean(1)
    ax.plot(range(window - 1, len(losses)), smooth, label=f"mean of {window} steps")
    ax.set(xlabel="step", ylabel="loss", yscale="log", title=title)
    ax.legend(loc="upper right")  # a fixed corner: "best" searches all the points, slowly
    fig.savefig(path, dpi=150, bbox_inches="tight")


def benchmark(args, device):
    """--bench: training steps and CFG sampling as the flags select them ("fast") against fp32 and
    eager ("plain"), both built by setup() as a real run builds them, on random data of the
    training shape; medians of three alternating rounds. The warm-up steps also compare the two
    losses, from the same weights and random draws."""
    plain = argparse.Namespace(**{**vars(args), "dtype": "fp32", "compile": False})
    B, n, shape = args.batch_size, args.bench_samples, (IN_CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
    x0, y = torch.randn(B, *shape, device=device).clamp(-1, 1), torch.arange(B) % NUM_CLASSES
    noise, labels = torch.randn(n, *shape, device=device), torch.arange(n) % NUM_CLASSES
    variants = {}
    for name, flags in (("fast", args), ("plain", plain)):
        run = setup(flags, device, total_steps=10**6)
        v = variants[name] = SimpleNamespace(dtype=flags.dtype, losses=[], times=[])
        v.train = partial(run.step, x0, y.to(device), 0.999)
        v.sample = partial(run.sample, run.sampler, labels.to(device), args.guidance_scale, noise)
        for i in range(args.bench_steps):  # warm-up (compilation), the same draws in both
            torch.manual_seed(i)
            v.losses.append(v.train().item())
        v.sample()
    for _ in range(3):  # alternate, so that clock or thermal drift hits both variants alike
        for v in variants.values():
            precision(v.dtype, device)  # TF32 on or off, as in that variant
            v.times.append((timed(v.train, device, args.bench_steps), timed(v.sample, device)))
    cuda = device.type == "cuda"
    hw = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{SCRIPT} --bench on {hw}, torch {torch.__version__}: train batch {B}, CFG sampling "
          f"of {n} images x {args.sample_steps} {args.solver} steps\n"
          "variant  train ms/step  train img/s  sample s  sample img/s")  # fmt: skip
    (tf, sf), (tp, sp) = ([statistics.median(t) for t in zip(*v.times)] for v in variants.values())
    for name, step_s, sample_s in (("fast", tf, sf), ("plain", tp, sp)):
        print(
            f"{name:8} {1e3 * step_s:13.1f} {B / step_s:12.1f} {sample_s:9.3g} {n / sample_s:13.1f}"
        )
    gaps = [abs(f - p) / p for f, p in zip(variants["fast"].losses, variants["plain"].losses)]
    print(f"speed-up fast / plain: training {tp / tf:.2f}x, sampling {sp / sf:.2f}x\nloss, fast vs "
          f"plain, first {len(gaps)} steps: mean relative difference {statistics.mean(gaps):.2e}, "
          f"max {max(gaps):.2e}")  # fmt: skip
    return variants


def timed(fn, device, repeat=1):
    """Seconds per call of fn, over `repeat` back-to-back calls, the device synchronised."""
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / repeat


def synchronize(device):
    """Wait for the device's queued work (CUDA and MPS run asynchronously; the CPU does not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


if __name__ == "__main__":
    main()
