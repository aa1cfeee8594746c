"""
Class-conditional DDPM on CIFAR-10 with classifier-free guidance (CFG), in one file.

What it teaches: how a diffusion model is told *what* to draw. A U-Net predicts the noise in a
noisy image x_t; the class label enters every residual block through adaptive GroupNorm (AdaGN).
Training replaces the label by a learned "null" class 15% of the time, so the same network also
learns the unconditional model; sampling combines the two predictions and pushes past the
conditional one (CFG):  eps = eps_uncond + w * (eps_cond - eps_uncond).

Papers:
  DDPM           Ho, Jain & Abbeel 2020           https://arxiv.org/abs/2006.11239
  Improved DDPM  Nichol & Dhariwal 2021 (cosine)  https://arxiv.org/abs/2102.09672
  ADM            Dhariwal & Nichol 2021 (AdaGN)   https://arxiv.org/abs/2105.05233
  DDIM           Song, Meng & Ermon 2020          https://arxiv.org/abs/2010.02502
  CFG            Ho & Salimans 2022               https://arxiv.org/abs/2207.12598
  CFG interval   Kynkaanniemi et al. 2024         https://arxiv.org/abs/2404.07724

Commands:
  python ddpm_cifar_cfg.py --preset laptop          # real digits on a laptop CPU in minutes (MNIST)
  python ddpm_cifar_cfg.py --preset laptop --eval   # its class-fidelity table
  python ddpm_cifar_cfg.py                          # CIFAR-10 on one GPU, then the experiments
  torchrun --standalone --nproc_per_node=4 ddpm_cifar_cfg.py  # the same on 4 GPUs
  python ddpm_cifar_cfg.py --resume                 # continue from out/ddpm_cifar/ckpt.pt
  python ddpm_cifar_cfg.py --sample-only            # experiments from that checkpoint
  python ddpm_cifar_cfg.py --eval                   # class-fidelity table from it
  python ddpm_cifar_cfg.py --bench --compile        # speed table: fast vs plain path
  python ddpm_cifar_cfg.py --dataset synthetic --base-ch 32 --batch-size 32 --max-steps 100 \\
      --sample-steps 20 --device cpu --out-dir out/smoke   # offline CPU smoke run
--preset laptop trains in steps (--max-steps), so it costs the same on any size of MNIST folder;
with full MNIST, --train-size 4000 trains on 400 digits of each class, as measured below.

Outputs (in --out-dir): ckpt.pt, loss.png, samples_epochNNN.png, the experiments class_grid.png,
guidance_sweep.png, interpolation.png, ema_vs_raw.png; --eval-every: quality_curve.png and the
eval classifier classifier.pt; --eval: eval.csv, eval.png.

EMA: --ema-decay d averages the weights of the last 1 / (1 - d) steps (before that, all steps so
far). The GPU default 0.9995 averages the last 2,000 of the 19,500 steps of 50 CIFAR-10 epochs;
the laptop preset's 0.996 the last 250 of its 2,500 steps.

Measured: `python ddpm_cifar_cfg.py --preset laptop` on the 5k-digit MNIST subset (4,000 training
digits), a 2-core AMD EPYC CPU, torch 2.14.1: 6 min 25 s in all (the eval classifier 43 s, 2,500
steps 332 s at about 125 ms per step, the figures); its learning curve (100 EMA samples at w = 3)
reads 11%, 27%, 69%, 96% and 99% of the digits as requested after 500, 1,000, 1,500, 2,000 and
2,500 steps: the digits are well formed early, *which* digit follows late. Its --eval (58 s):
97.5% at w = 3 with 0.88 of the real digits' diversity. GPU and CIFAR-10: not measured yet.

Left out on purpose: FID with an Inception network (--eval measures a Frechet distance in its
own classifier's features instead), learned variances, v-prediction, EDM preconditioning, latent
diffusion: each would hide the lesson under machinery.
"""

import argparse
import contextlib
import copy
import csv
import math
import os
import signal
import sys
import tempfile
import textwrap
import time
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

SCRIPT = "ddpm_cifar_cfg"
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # index of the learned "no label" row of the class embedding
IMAGE_SIZE = 32
CLASS_NAMES = {
    "cifar10": "airplane automobile bird cat deer dog frog horse ship truck".split(),
    "mnist": list("0123456789"),
    "synthetic": [
        f"{c} {s}" for c in ("red", "blue") for s in "disk square ring cross stripes".split()
    ],
}
# The flags that fix the network and the meaning of t. A checkpoint stores them (as nanoGPT stores
# model_args): --sample-only, --eval and --resume take them from it.
MODEL_ARGS = (
    "dataset base_ch ch_mult num_res_blocks attn_res attn_heads cond_dim dropout schedule timesteps"
).split()
CHECKPOINT_PARTS = ("model", "ema", "optimizer", "scheduler", "scaler")  # with state_dict()s
EVAL_BATCH = 100  # images per sampling call in --eval

# -----------------------------------------------------------------------------
# Diffusion: noise schedule, forward process and the loss with label dropout
# Time convention: t is an integer in [0, T). t = 0 is the first, smallest noising step and
# t = T-1 is (almost) pure noise. Training draws t uniformly from [0, T); sampling walks from
# T-1 down to 0. The same range on both sides.


def make_alphas_cumprod(schedule, timesteps):
    """alpha_bar_t = prod_{s <= t} (1 - beta_s) for t = 0..T-1, as float32 of shape (T,)."""
    if schedule == "linear":  # Ho et al. 2020: beta from 1e-4 to 0.02 at T = 1000, rescaled for T
        scale = 1000 / timesteps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    else:  # cosine, Nichol & Dhariwal 2021 eq. 17: alpha_bar(t) = f(t) / f(0), with
        s = 0.008  # f(t) = cos^2((t/T + s) / (1 + s) * pi/2)
        f = torch.cos((torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + s) / (1 + s)
                      * math.pi / 2) ** 2  # fmt: skip
        betas = 1 - f[1:] / f[:-1]
    betas = betas.clamp(max=0.999)  # avoids beta = 1 at t = T (cosine) or > 1 for a short T
    return torch.cumprod(1 - betas, dim=0).float()


def q_sample(alphas_cumprod, x0, t, noise):
    """Forward process, Ho et al. eq. 4: x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps."""
    a = alphas_cumprod[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def diffusion_loss(model, x0, y, alphas_cumprod, p_uncond):
    """Noise-prediction MSE (Ho et al. Algorithm 1) with label dropout for CFG."""
    B = x0.shape[0]
    # classifier-free guidance: the null class replaces a random p_uncond share of the labels, so
    # the same network also learns the unconditional noise prediction
    y = torch.where(torch.rand(B, device=y.device) < p_uncond, NULL_CLASS, y)
    t = torch.randint(0, len(alphas_cumprod), (B,), device=x0.device)
    noise = torch.randn(x0.shape, device=x0.device)  # NCHW draw: same noise in any memory format
    eps = model(q_sample(alphas_cumprod, x0, t, noise), t, y)
    return F.mse_loss(eps.float(), noise)


# -----------------------------------------------------------------------------
# Sampling: classifier-free guidance and DDIM


def guided_eps(model, x, t, class_emb, null_emb, guidance_scale):
    """Classifier-free guidance (Ho & Salimans 2022): eps = eps_uncond + w (eps_cond - eps_uncond).
    w = 1 is the plain conditional prediction, w = 0 the unconditional one, w > 1 pushes samples
    further towards the class. Both predictions come from ONE batched forward pass (only the
    conditional one at w = 1, only the unconditional one at w = 0)."""
    B = x.shape[0]
    if guidance_scale in (0, 1):  # one prediction alone: the conditional (1) or unconditional (0)
        emb = class_emb if guidance_scale == 1 else null_emb.expand(B, -1)
        return model(x, t, class_emb=emb).float()
    cond = torch.cat([class_emb, null_emb.expand(B, -1)])  # (2B, cond_dim): [cond; uncond]
    eps = model(torch.cat([x, x]), torch.cat([t, t]), class_emb=cond).float()  # (2B, C, H, W)
    eps_cond, eps_uncond = eps.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


@torch.no_grad()
def ddim_sample(model, class_emb, noise, w, alphas_cumprod, steps, eta=0, interval=(0, 1), seed=0):
    """DDIM (Song et al. 2020, eq. 12) with CFG at scale w, from x_{T-1} = noise down to x_0 on
    `steps` evenly spaced timesteps. class_emb: (B, cond_dim), e.g. model.class_emb(labels).
    eta = 0 is deterministic; eta = 1 adds DDPM's ancestral noise, drawn from a generator seeded
    with `seed`, so that sampling never disturbs the training random stream. Guidance interval
    (Kynkaanniemi et al. 2024): guide only while t / T lies in `interval`, use the conditional
    prediction (w = 1) elsewhere. Callers run it under the autocast context."""
    generator = torch.Generator(noise.device).manual_seed(seed)
    null_emb = model.class_emb.weight[NULL_CLASS]  # (cond_dim,)
    T = len(alphas_cumprod)
    timesteps = torch.linspace(T - 1, 0, steps).round().long().tolist()
    x = noise
    for i, t in enumerate(timesteps):
        a = alphas_cumprod[t]
        a_prev = alphas_cumprod[timesteps[i + 1]] if i + 1 < steps else torch.ones_like(a)
        t_batch = torch.full((x.shape[0],), t, device=x.device)
        w_t = w if interval[0] <= t / T <= interval[1] else 1.0
        eps = guided_eps(model, x, t_batch, class_emb, null_emb, w_t)
        # predicted clean image, clipped to the data range, and the noise consistent with it
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        # x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        z = torch.randn(x.shape, device=x.device, generator=generator)
        # clamped: with eta = 1 and a_prev near 1 it is ~0, and float32 rounding can make it
        # -6e-8, whose square root (NaN) would wipe out every image
        noise_share = (1 - a_prev - sigma**2).clamp(min=0).sqrt()
        x = a_prev.sqrt() * x0 + noise_share * eps + sigma * z
    return x


# -----------------------------------------------------------------------------
# Model


def norm_groups(channels):
    """32 groups as in DDPM/ADM, fewer in narrow layers so that every group keeps at least 4
    channels: a group of one channel would normalise away each image's mean per channel (its
    colour and brightness)."""
    groups = 32
    while groups > 1 and (channels % groups or channels // groups < 4):
        groups //= 2
    return groups


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding (B,) -> (B, dim) of integer timesteps, as Transformer positions.
    Computed in float32 (math.log, not np.log, which would silently make it float64)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) / half * torch.arange(half, device=t.device))
    angles = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)  # (B, dim)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with a skip connection. The conditioning vector (time +
    class) sets a per-channel scale and shift of the second GroupNorm: adaptive GroupNorm
    (ADM's "scale-shift norm"), AdaGN(h, c) = GroupNorm(h) * (1 + scale(c)) + shift(c)."""

    def __init__(self, in_ch, out_ch, cond_dim, dropout):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.modulation = nn.Linear(cond_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(norm_groups(out_ch), out_ch, affine=False)  # affine from cond
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, cond):
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out_ch, H, W)
        scale, shift = self.modulation(cond)[:, :, None, None].chunk(2, dim=1)  # (B, out_ch, 1, 1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, pre-norm, residual."""

    def __init__(self, channels, heads):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(norm_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # (B, heads, H*W, C/heads) each
        h = F.scaled_dot_product_attention(q, k, v)  # fused kernel (flash / memory-efficient)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)


class UNetBlock(nn.Module):
    """A ResBlock, followed by self-attention at the resolutions listed in --attn-res."""

    def __init__(self, in_ch, out_ch, cond_dim, dropout, attn_heads):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, cond_dim, dropout)
        self.attn = SelfAttention(out_ch, attn_heads) if attn_heads else nn.Identity()

    def forward(self, x, cond):
        return self.attn(self.res(x, cond))


class Resample(nn.Module):
    """A 3x3 conv that halves the resolution (stride 2), or doubles it after a nearest-neighbour
    upsampling (up=True)."""

    def __init__(self, channels, up):
        super().__init__()
        self.upsample = up
        self.conv = nn.Conv2d(channels, channels, 3, stride=1 if up else 2, padding=1)

    def forward(self, x, cond):  # cond unused: every U-Net layer takes (x, cond)
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x)  # down: (B, C, H/2, W/2); up: (B, C, 2H, 2W)


class UNet(nn.Module):
    """Noise predictor eps_theta(x_t, t, class): a U-Net 32 -> 16 -> 8 -> 16 -> 32 with skip
    connections, conditioned on one vector cond = time embedding + class embedding."""

    def __init__(self, in_ch=3, base_ch=128, ch_mult=(1, 2, 2), num_res_blocks=2, attn_res=(8,),
                 attn_heads=4, cond_dim=256, dropout=0.1, class_init_std=0.02,
                 image_size=IMAGE_SIZE):  # fmt: skip
        super().__init__()
        self.base_ch = base_ch
        self.time_mlp = nn.Sequential(
            nn.Linear(base_ch, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim)
        )
        self.class_emb = nn.Embedding(NUM_CLASSES + 1, cond_dim)  # row NULL_CLASS = "no label"
        self.stem = nn.Conv2d(in_ch, base_ch, 3, padding=1)

        def block(cin, cout, res):
            return UNetBlock(cin, cout, cond_dim, dropout, attn_heads if res in attn_res else 0)

        ch, res, skip_chs = base_ch, image_size, [base_ch]
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(block(ch, base_ch * mult, res))
                ch = base_ch * mult
                skip_chs.append(ch)
            if level < len(ch_mult) - 1:
                self.down.append(Resample(ch, up=False))
                skip_chs.append(ch)
                res //= 2
        mid_blocks = [UNetBlock(ch, ch, cond_dim, dropout, heads) for heads in (attn_heads, 0)]
        self.mid = nn.ModuleList(mid_blocks)  # ResBlock, attention, ResBlock
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):  # one more than down: it also takes a skip
                self.up.append(block(ch + skip_chs.pop(), base_ch * mult, res))
                ch = base_ch * mult
            if level > 0:
                self.up.append(Resample(ch, up=True))
                res *= 2
        self.out_norm = nn.GroupNorm(norm_groups(ch), ch)
        self.out_conv = nn.Conv2d(ch, in_ch, 3, padding=1)
        self.initialize_weights(class_init_std)

    def initialize_weights(self, class_init_std):
        # std 0.02 as in ADM; std 1 makes the label as loud as the time embedding from the first
        # step, so that a short run learns *which* class early
        nn.init.normal_(self.class_emb.weight, std=class_init_std)
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.conv2.weight)  # each residual branch starts as zero: identity
                nn.init.zeros_(m.conv2.bias)
            if isinstance(m, SelfAttention):
                nn.init.zeros_(m.proj.weight)  # each attention block starts as identity
                nn.init.zeros_(m.proj.bias)
        nn.init.zeros_(self.out_conv.weight)  # the first prediction is eps = 0
        nn.init.zeros_(self.out_conv.bias)

    def forward(self, x, t, y=None, class_emb=None):
        """x: (B, C, H, W) noisy images, t: (B,) integer timesteps, and the class either as
        y: (B,) labels (NULL_CLASS = unconditional) or as class_emb: (B, cond_dim), a ready class
        embedding such as a mix of two rows (interpolation). Returns the noise (B, C, H, W)."""
        if class_emb is None:
            class_emb = self.class_emb(y)  # (B, cond_dim)
        # SiLU applied once here instead of at the input of every block's modulation layer
        cond = F.silu(self.time_mlp(timestep_embedding(t, self.base_ch)) + class_emb)  # (B, cond)
        h = self.stem(x)  # (B, base_ch, 32, 32)
        skips = [h]
        for layer in self.down:
            h = layer(h, cond)
            skips.append(h)  # down to (B, base_ch * ch_mult[-1], 8, 8)
        for layer in self.mid:
            h = layer(h, cond)
        for layer in self.up:
            if isinstance(layer, UNetBlock):
                h = torch.cat([h, skips.pop()], dim=1)  # (B, ch + skip_ch, H, W)
            h = layer(h, cond)
        return self.out_conv(F.silu(self.out_norm(h)))  # (B, C, 32, 32)


def build_model(args):
    return UNet(1 if args.dataset == "mnist" else 3, args.base_ch, tuple(args.ch_mult),
                args.num_res_blocks, tuple(args.attn_res), args.attn_heads, args.cond_dim,
                args.dropout, args.class_init_std)  # fmt: skip


# -----------------------------------------------------------------------------
# Data
# The whole training set is held as one uint8 tensor (CIFAR-10: 150 MB), on the GPU when there is
# one: batches are drawn by indexing, with no DataLoader worker processes to feed.


def make_synthetic(n, seed):
    """n class-dependent 32x32 RGB images, uint8 (n, 3, 32, 32), and labels (n,). Class k is a
    shape (disk, square, ring, cross, diagonal stripes: k % 5) in a colour (red or blue: k // 5) at
    a jittered position and size on a noisy dark background: learnable in minutes, and a class
    label fixes both colour and shape, so unguided samples visibly mix them."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")  # (32, 32)
    cy, cx = (15.5 + torch.randint(-5, 6, (2, n, 1, 1), generator=g)).unbind(0)  # (n, 1, 1)
    r = 6 + 4 * torch.rand(n, 1, 1, generator=g)
    dy, dx = (yy - cy).abs(), (xx - cx).abs()  # (n, 32, 32)
    d = (dy**2 + dx**2).sqrt()
    shapes = torch.stack([
        d < r,                                                               # disk
        (dy < 0.8 * r) & (dx < 0.8 * r),                                     # square
        (d < r) & (d > 0.55 * r),                                            # ring
        ((dy < 0.3 * r) & (dx < r)) | ((dx < 0.3 * r) & (dy < r)),           # cross
        (d < r) & ((xx + yy) % 6 < 3),                                       # diagonal stripes
    ], dim=1)  # (n, 5, 32, 32)  # fmt: skip
    mask = shapes[torch.arange(n), labels % 5][:, None]  # (n, 1, 32, 32)
    colour = torch.tensor([[0.9, 0.25, 0.2], [0.2, 0.45, 0.95]])[labels // 5]  # (n, 3)
    colour = (colour + 0.08 * torch.randn(n, 3, generator=g)).clamp(0, 1)[:, :, None, None]
    background = 0.1 + 0.15 * torch.rand(n, 1, 1, 1, generator=g)
    images = torch.where(mask, colour, background) + 0.03 * torch.randn(n, 3, 32, 32, generator=g)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


def load_dataset(name, data_dir, synthetic_size, seed, train=True):
    """The whole training (or test) set as (uint8 images (N, C, 32, 32), int64 labels (N,))."""
    if name == "synthetic":  # the test set: a fifth as large, drawn with another seed
        n = synthetic_size if train else max(100, synthetic_size // 5)
        return make_synthetic(n, seed if train else seed + 1)
    import torchvision

    try:
        if name == "cifar10":
            ds = torchvision.datasets.CIFAR10(data_dir, train=train, download=True)
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)  # (50000, 3, 32, 32)
        else:
            ds = torchvision.datasets.MNIST(data_dir, train=train, download=True)
            images = F.pad(ds.data, (2, 2, 2, 2))[:, None]  # (60000, 1, 32, 32): 28x28 padded
    except (OSError, RuntimeError) as e:  # no network (URLError is an OSError), corrupt archive
        hint = "put the data there and pass --data-dir, or run offline with --dataset synthetic"
        fail(f"could not load {name} into {data_dir!r} ({type(e).__name__}: {e}); {hint}", code=1)
    return images.contiguous(), torch.as_tensor(ds.targets)


def load_training_set(args):
    """The training set of --dataset, or with --train-size N a balanced subset of it: N / 10
    images of each class, chosen by --seed (4,000 of full MNIST reproduce a 4,000-digit folder's
    runs in size and balance)."""
    images, labels = load_dataset(args.dataset, args.data_dir, args.synthetic_size, args.seed)
    if args.train_size:
        keep = balanced_subset(labels, args.train_size, args.seed)
        images, labels = images[keep], labels[keep]
    return images, labels


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


def epoch_batches(num_items, batch_size, epoch, seed, rank=0, world_size=1, device="cpu"):
    """Index batches of one epoch: a permutation made from seed and epoch only (the same on every
    rank), one equal shard of it per rank. Whole batches only: the items left over (fewer than
    world_size * batch_size, different ones each epoch) wait for the next epoch, so that every
    step has one shape (torch.compile then never recompiles)."""
    g = torch.Generator().manual_seed(1_000_000 * seed + epoch)
    steps = num_items // world_size // batch_size
    perm = torch.randperm(num_items, generator=g)[: steps * batch_size * world_size]
    return perm[rank::world_size].to(device).split(batch_size)


def get_batch(images, labels, idx, hflip, memory_format):
    """uint8 images -> float in [-1, 1], with random horizontal flips (CIFAR only)."""
    x = images[idx].float() / 127.5 - 1  # (B, C, 32, 32)
    if hflip:
        flip = torch.rand(len(idx), 1, 1, 1, device=x.device) < 0.5
        x = torch.where(flip, x.flip(3), x)
    return x.contiguous(memory_format=memory_format), labels[idx]


# -----------------------------------------------------------------------------
# Experiments
# Each takes the model and `sample`, the DDIM sampler with its settings bound
# (functools.partial), so it runs from any checkpoint. Every figure reuses fixed noise, so that
# only the quantity under study changes between images.


def fixed_noise(n, channels, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(device)


def class_rows(model, sample, w, seed, rows=1):
    """rows x 10 samples at guidance scale w, one column per class, from the noise of `seed`."""
    labels = torch.arange(NUM_CLASSES, device=model.class_emb.weight.device).repeat(rows)
    noise = fixed_noise(len(labels), model.stem.in_channels, labels.device, seed)
    return sample(model, model.class_emb(labels), noise, w, seed=seed)


def interpolate_classes(model, sample, a, b, w, seed, num_mixes=8):
    """Samples (num_mixes, C, H, W) along the straight line from class a's embedding to class b's,
    all from one fixed noise image: the conditioning vectors in between were never trained."""
    emb = model.class_emb.weight  # (11, cond_dim)
    mix = torch.linspace(0, 1, num_mixes, device=emb.device)[:, None]  # (M, 1)
    noise = fixed_noise(1, model.stem.in_channels, emb.device, seed).expand(num_mixes, -1, -1, -1)
    return sample(model, (1 - mix) * emb[a] + mix * emb[b], noise, w, seed=seed)


def run_experiments(raw, ema, sample, args):
    """The lesson's four figures, from the raw and EMA weights (after training or --sample-only)."""
    names, out, w, seed = CLASS_NAMES[args.dataset], args.out_dir, args.guidance_scale, args.seed
    raw.eval()  # dropout off
    x = class_rows(ema, sample, w, seed, args.grid_per_class)
    title = f"EMA samples, one column per class (w={w:g})"
    save_image_grid(x, f"{out}/class_grid.png", title, names)
    # one row per guidance scale, the same noise in every row
    x = torch.cat([class_rows(ema, sample, scale, seed) for scale in args.guidance_scales])
    title = "Guidance sweep: same noise in each column; w=1 is the plain conditional model"
    rows = [f"w={scale:g}" for scale in args.guidance_scales]
    save_image_grid(x, f"{out}/guidance_sweep.png", title, names, rows)
    # one row per class pair a -> b, the same noise in every row
    x = torch.cat([interpolate_classes(ema, sample, a, b, w, seed) for a, b in args.interp_pairs])
    title = f"Class-embedding interpolation (w={w:g}, one fixed noise)"
    mixes = [f"{m:.2f}" for m in torch.linspace(0, 1, len(x) // len(args.interp_pairs)).tolist()]
    rows = [f"{names[a]} -> {names[b]}" for a, b in args.interp_pairs]
    save_image_grid(x, f"{out}/interpolation.png", title, mixes, rows)
    x = torch.cat([class_rows(model, sample, w, seed) for model in (raw, ema)])
    title = f"Raw vs EMA weights (w={w:g}, same noise)"
    save_image_grid(x, f"{out}/ema_vs_raw.png", title, names, ["raw", "EMA"])
    print(f"wrote class_grid.png, guidance_sweep.png, interpolation.png, ema_vs_raw.png to {out}")


def curve_accuracy(classifier, model, sample, w, seed, device, per_class=10):
    """A point of the learning curve (--eval-every): the share of per_class samples of each
    class at scale w, always from the same noise, that the eval classifier reads as requested."""
    x = class_rows(model, sample, w, seed, rows=per_class).float().cpu()  # (10 * per_class, ...)
    labels = torch.arange(NUM_CLASSES).repeat(per_class)  # the order of class_rows
    return fidelity(classifier, x, labels, device)["accuracy"]


# -----------------------------------------------------------------------------
# Evaluation: measured class fidelity
# A small CNN trained on the real training set judges which class every sample shows. Accuracy
# and confidence measure "did we get a cat"; the mean pairwise distance between the samples of one
# class measures how varied the cats are; the Frechet distance (FD) between the classifier's
# features of the samples and of real test images measures both at once, as FID does in the
# features of an Inception network. The `real` row scores one half of the test images against the
# other: a judge that cannot recognise them could not grade generated ones, and its FD is the
# floor that a perfect generator would reach with as many samples.


class Residual(nn.Sequential):
    def forward(self, x):
        return x + super().forward(x)


def build_classifier(in_channels):
    """A small ResNet-style CNN (0.2M parameters): conv-BN-ReLU stages with residual blocks. The
    last two layers are the head; everything before it gives the 128 features FD is measured in."""

    def conv_bn(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU())  # fmt: skip

    return nn.Sequential(
        conv_bn(in_channels, 32), Residual(*conv_bn(32, 32)), nn.MaxPool2d(2),  # (B, 32, H/2, W/2)
        conv_bn(32, 64), Residual(*conv_bn(64, 64)), nn.MaxPool2d(2),  # (B, 64, H/4, W/4)
        conv_bn(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (B, 128) features
        nn.Dropout(0.2), nn.Linear(128, NUM_CLASSES),  # (B, 10) logits
    )  # fmt: skip


def get_classifier(args, images, labels, device):
    """The judge, cached in --out-dir/classifier.pt if it was trained from exactly these flags,
    else trained for --classifier-steps on uint8 images (N, C, H, W) and cached: AdamW with a
    one-cycle lr schedule; as augmentation every image moves by up to 2 pixels (and is flipped
    half the time on CIFAR-10). Counted in steps, it costs the same on any size of data."""
    path, steps, seed = f"{args.out_dir}/classifier.pt", args.classifier_steps, args.seed
    keys = "dataset data_dir synthetic_size train_size seed classifier_steps".split()
    trained_from = {k: getattr(args, k) for k in keys}  # the cache is valid for these only
    torch.manual_seed(seed)  # the initial weights and dropout masks
    classifier = build_classifier(images.shape[1]).to(device)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["trained_from"] == trained_from:
            classifier.load_state_dict(state["model"])
            return classifier.eval()
    except Exception:  # missing, unreadable or another network: train a new one
        pass
    t0, g, H, W = time.time(), torch.Generator().manual_seed(seed), *images.shape[-2:]
    batch_size, lr = 128, 2e-3
    optimizer = torch.optim.AdamW(classifier.parameters(), lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    per_epoch = math.ceil(len(images) / batch_size)
    for step in tqdm(range(steps), desc="classifier", leave=False, dynamic_ncols=True):
        if step % per_epoch == 0:  # a fresh order every pass over the data
            batches = torch.randperm(len(images), generator=g).split(batch_size)
        idx = batches[step % per_epoch]
        padded = F.pad(images[idx].float() / 127.5 - 1, (2, 2, 2, 2), value=-1.0)
        dy, dx = torch.randint(0, 5, (2, len(idx)), generator=g).tolist()
        x = torch.stack([p[:, i : i + H, j : j + W] for p, i, j in zip(padded, dy, dx)])
        if args.dataset == "cifar10":  # horizontal flips
            x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g) < 0.5, x.flip(3), x)
        loss = F.cross_entropy(classifier(x.to(device)), labels[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    save_checkpoint({"trained_from": trained_from, "model": classifier.state_dict()}, path)
    print(f"classifier: trained {steps} steps in {time.time() - t0:.0f} s, saved to {path}")
    return classifier.eval()


@torch.no_grad()
def classify(classifier, images, device):
    """(features (N, 128), logits (N, 10)) of images (N, C, H, W) in [-1, 1], 500 at a time."""
    body, head = classifier[:-2], classifier[-2:]  # features | dropout (off in eval) + linear
    features, logits = [], []
    for x in images.split(500):
        f = body(x.to(device))
        features.append(f.float().cpu())
        logits.append(head(f).float().cpu())
    return torch.cat(features), torch.cat(logits)


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


def fidelity(classifier, images, labels, device, reference=None):
    """accuracy: fraction classified as the requested class, with its 95% (Wilson) interval ci;
    confidence: mean probability of the requested class; diversity: mean L2 distance between two
    distinct images of one class (pixels in [-1, 1]), averaged over classes; fd: Frechet distance
    of the images' classifier features to `reference` features (if given); per_class: the accuracy
    of each class. images (N, C, H, W) in [-1, 1], on the CPU."""
    features, logits = classify(classifier, images, device)
    probs = logits.softmax(-1)  # (N, 10)
    hit = (probs.argmax(1) == labels).float()  # (N,)
    flat = [images[labels == c].flatten(1).double() for c in range(NUM_CLASSES)]  # (N_c, C*H*W)
    distances = [torch.cdist(f, f).sum() / (len(f) * (len(f) - 1)) for f in flat if len(f) > 1]
    return {
        "accuracy": hit.mean().item(),
        "ci": wilson_interval(hit.sum().item(), len(hit)),
        "confidence": probs[torch.arange(len(labels)), labels].mean().item(),
        "diversity": torch.stack(distances).mean().item(),
        "fd": None if reference is None else frechet_distance(features, reference),
        "per_class": [hit[labels == c].mean().item() for c in range(NUM_CLASSES)],
    }


def split_in_halves(labels):
    """Indices of two halves of a labelled set, each class's items dealt alternately into them
    (whatever order the set is stored in): the real row's images and the FD reference."""
    return [
        torch.cat([(labels == c).nonzero()[i::2, 0] for c in range(NUM_CLASSES)]) for i in (0, 1)
    ]


def evaluate(run, args, device):
    """--eval: a `real` row for up to --eval-per-class test images of each class, one row per w of
    --eval-scales on the whole chain, and one per w > 1 guided only in --eval-interval. Every row
    starts from the same noise, so the rows differ only by the guidance; each is printed when done.
    The test set is split in two halves: the `real` row's images come from one, the reference of
    every row's FD from the other."""
    classifier = get_classifier(args, *load_training_set(args), device)
    images, labels = load_dataset(args.dataset, args.data_dir, args.synthetic_size, args.seed,
                                  train=False)  # fmt: skip
    images = images.float() / 127.5 - 1
    halves = split_in_halves(labels)
    reference = classify(classifier, images[halves[1]], device)[0]  # (N/2, 128)
    n, t0, names = args.eval_per_class, time.time(), CLASS_NAMES[args.dataset]
    real = torch.cat([halves[0][labels[halves[0]] == c][:n] for c in range(NUM_CLASSES)])
    scores = fidelity(classifier, images[real], labels[real], device, reference)
    rows = [{"w": "real", "interval": None, "label": "real", **scores}]
    print(f"class fidelity: {n} samples per class and row, {args.sample_steps} DDIM steps, "
          f"accuracy with its 95% interval (Wilson), FD to half of the test images")  # fmt: skip
    print(format_row(None, names))
    print(format_row(rows[0], names))
    y = torch.arange(NUM_CLASSES).repeat_interleave(n)  # (10 * n,)
    noise = fixed_noise(len(y), images.shape[1], "cpu", args.seed)
    emb, scales, interval = run.sampler.class_emb, args.eval_scales, args.eval_interval
    for w, where in [(w, None) for w in scales] + [(w, interval) for w in scales if w > 1]:
        guided = partial(run.sample, run.sampler, w=w, interval=where or (0, 1), seed=args.seed)
        label = f"{w:g}" + (" in [{:g}, {:g}]".format(*where) if where else "")
        bar = tqdm(total=len(y), desc=f"w = {label}", unit="img", leave=False, dynamic_ncols=True)
        samples = []
        with run.ctx, bar:
            for c, z in zip(y.split(EVAL_BATCH), noise.split(EVAL_BATCH)):
                samples.append(guided(emb(c.to(device)), z.to(device)).float().cpu())
                bar.update(len(c))
        rows.append({"w": w, "interval": where, "label": label,
                     **fidelity(classifier, torch.cat(samples), y, device, reference)})  # fmt: skip
        tqdm.write(format_row(rows[-1], names))
    print(f"{len(rows) - 1} rows in {time.time() - t0:.0f} s")
    save_eval(rows, names, interval, args.out_dir)


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
        for part, style, name in ((whole, "o-", "whole chain"), (inside, "s--", guided)):
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


def save_quality_curve(curve, path, title):
    """quality_curve.png: the learning curve's accuracy against step and against wall-clock time."""
    fig = figure(figsize=(10, 3.5))
    axes = fig.subplots(1, 2)
    for ax, key, xlabel in zip(axes, ("step", "seconds"), ("step", "seconds of training")):
        ax.plot([p[key] for p in curve], [p["accuracy"] for p in curve], "o-")
        ax.set(xlabel=xlabel, ylabel="classified as requested", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=150, bbox_inches="tight")


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


def train_step(model, ema, optimizer, scaler, loss, ema_decay, grad_clip):
    """backward -> clip -> AdamW -> EMA, for a loss computed (under autocast) from `model`."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # the scaler is a no-op except with --dtype fp16
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    update_ema(ema, model, ema_decay)


def setup(args, device, total_steps):
    """Everything a run needs, built the same way for training, --sample-only, --eval and --bench:
    model and EMA (and compiled copies), AdamW, lr schedule, scaler, autocast, step, sampler."""
    dtype, ctx = precision(args.dtype, device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(args.seed)  # the same initial weights, and so the same EMA, on every rank
    model = build_model(args).to(device, memory_format=fmt)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(  # fused: one kernel for the whole update, not one per tensor
        model.parameters(), args.lr, weight_decay=args.weight_decay,
        fused=device.type in ("cuda", "cpu"),
    )  # fmt: skip
    lr_lambda = partial(warmup_cosine, warmup_steps=args.warmup_steps, total_steps=total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 only
    alphas_cumprod = make_alphas_cumprod(args.schedule, args.timesteps).to(device)
    train_model = DistributedDataParallel(model) if dist.is_initialized() else model
    if args.compile:  # compiled around DDP, so that its gradient all-reduce overlaps the backward
        train_model = torch.compile(train_model)  # static shapes: every batch has one size

    def step(x0, y, ema_decay):
        """One optimizer step; returns the loss without syncing, so the GPU can run ahead."""
        with ctx:
            loss = diffusion_loss(train_model, x0, y, alphas_cumprod, args.p_uncond)
        train_step(model, ema, optimizer, scaler, loss, ema_decay, args.grad_clip)
        scheduler.step()
        return loss.detach()

    sample = partial(ddim_sample, alphas_cumprod=alphas_cumprod, steps=args.sample_steps,
                     eta=args.eta, interval=args.guidance_interval)  # fmt: skip
    # the EMA, compiled separately; dynamic: the figures and --eval sample batches of many sizes
    sampler = torch.compile(ema, dynamic=True) if args.compile else ema
    return argparse.Namespace(model=model, ema=ema, optimizer=optimizer, scheduler=scheduler,
                              scaler=scaler, step=step, sampler=sampler, sample=sample, ctx=ctx,
                              dtype=dtype, memory_format=fmt)  # fmt: skip


def main(argv=None):
    args = get_args(argv)
    rank, world_size, device = setup_distributed(args.device)
    master = rank == 0  # only rank 0 prints, shows progress bars and writes files
    if args.bench:
        return benchmark(args, device)
    no_training = args.sample_only or args.eval
    if no_training and world_size > 1:  # the figures and the table need one process, not DDP
        dist.destroy_process_group()
        if not master:
            return None
    ckpt_path = args.ckpt or os.path.join(args.out_dir, "ckpt.pt")
    check_output_paths(args.out_dir, ckpt_path, writes_ckpt=not no_training)
    if not (no_training or args.resume) and os.path.exists(ckpt_path):
        fail(f"{ckpt_path} already holds a run: continue it with --resume, or train a new one "
             "with another --out-dir")  # fmt: skip
    # the checkpoint also sets the MODEL_ARGS flags: the architecture and the schedule
    ckpt = load_checkpoint(ckpt_path, args) if args.resume or no_training else None
    if no_training:
        run = setup(args, device, total_steps=1)
        run.model.load_state_dict(ckpt["model"])
        run.ema.load_state_dict(ckpt["ema"])
        if args.sample_only:
            with run.ctx:
                run_experiments(run.model, run.sampler, run.sample, args)
        if args.eval:
            evaluate(run, args, device)
        return run.model

    if rank > 0:
        dist.barrier()  # rank 0 downloads the dataset first, the others then read it
    images, labels = load_training_set(args)
    if world_size > 1 and rank == 0:
        dist.barrier()
    rank_batch, hflip = args.batch_size // world_size, args.dataset == "cifar10"
    # whole batches only (the last, shorter one is left out): one shape for torch.compile
    steps_per_epoch = len(images) // world_size // rank_batch
    if steps_per_epoch == 0:
        fail(f"--batch-size {args.batch_size} is larger than the {len(images)} training images")
    max_steps = args.max_steps or args.epochs * steps_per_epoch  # the lr schedule spans the run
    # the learning curve (--eval-every): a fixed set of samples scored by the eval classifier
    judge = get_classifier(args, images, labels, device) if args.eval_every and master else None
    images, labels = images.to(device), labels.to(device)
    run, step, losses, curve, seconds = setup(args, device, max_steps), 0, [], [], 0.0
    if ckpt:
        for part in CHECKPOINT_PARTS:
            if ckpt[part]:  # the scaler's state is empty unless the run used --dtype fp16
                getattr(run, part).load_state_dict(ckpt[part])
        step, losses = ckpt["step"], ckpt["losses"]
        curve, seconds = ckpt.get("curve", []), ckpt.get("seconds", 0.0)  # older runs had neither
    params = sum(p.numel() for p in run.model.parameters()) / 1e6
    resumed = f", resumed at step {step}" if ckpt else ""
    if master:
        print(f"{params:.2f}M parameters, {device}, {run.dtype}, {world_size} process(es){resumed}")

    stop, batches, window, saved_step = False, None, [], step  # saved_step 0: nothing saved yet
    bar = tqdm(total=max_steps, initial=step, disable=not master, leave=False, dynamic_ncols=True)
    t_start = time.perf_counter() - seconds  # seconds: the training time before a --resume
    t_log = time.perf_counter()
    hint = device.type in ("cpu", "mps") and args.preset is None  # the slow-hardware hint, once
    with StopSignal() as signals, bar:  # restores the signal handlers, closes the bar
        while step < max_steps and not stop:
            epoch, i = divmod(step, steps_per_epoch)
            if i == 0 or batches is None:  # a fresh order each epoch, a function of seed and epoch
                n = len(images)
                batches = epoch_batches(n, rank_batch, epoch, args.seed, rank, world_size, device)
            seed_step(args.seed, rank, step)
            x0, y = get_batch(images, labels, batches[i], hflip, run.memory_format)
            window.append(run.step(x0, y, ema_decay_at(step, args.ema_decay)))
            step, epoch_end = step + 1, (step + 1) % steps_per_epoch == 0 or step + 1 == max_steps
            bar.update()
            check = args.eval_every and (step % args.eval_every == 0 or step == max_steps)
            if step % args.log_every and not epoch_end and not check:
                continue
            # every --log-every steps one check: non-finite loss, Ctrl-C, all DDP ranks agreeing
            window = torch.stack(window).float()  # one device sync for the whole window
            flags = torch.tensor([not window.isfinite().all(), signals.requested], device=device)
            if world_size > 1:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # so that all ranks stop together
            nonfinite, stop = flags.tolist()
            if nonfinite:  # the first non-finite step of the window (its first: another rank's)
                bad_step = step - len(window) + 1 + int((~window.isfinite()).int().argmax())
                kept = f"{ckpt_path} still holds step {saved_step}" if saved_step else "nothing"
                fail(f"loss became non-finite at step {bad_step}; stopped without saving ({kept}"
                     " kept). Try a lower --lr, or --dtype fp32", code=1)  # fmt: skip
            losses += window.tolist()
            dt, window = (time.perf_counter() - t_log) / len(window), []
            if master:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                tqdm.write(f"epoch {epoch + 1:3d} | step {step:7d} | loss {losses[-1]:.4f} | lr "
                           f"{run.scheduler.get_last_lr()[0]:.2e} | {1e3 * dt:6.1f} ms/step | "
                           f"{args.batch_size / dt:6.0f} img/s")  # fmt: skip
            if master and hint and (max_steps - step) * dt > 900:  # more than 15 minutes to go
                tqdm.write(f"at {1e3 * dt:.0f} ms/step on this {device.type} the {max_steps:,} "
                           f"steps of this run take about {duration(max_steps * dt)}; "
                           f"`python {SCRIPT}.py --preset laptop` trains in minutes")  # fmt: skip
            hint = False
            if master and check:  # the learning curve: EMA samples at the default w
                with run.ctx:
                    accuracy = curve_accuracy(judge, run.sampler, run.sample, args.guidance_scale,
                                              args.seed, device)  # fmt: skip
                curve.append({"step": step, "seconds": time.perf_counter() - t_start,
                              "accuracy": accuracy})  # fmt: skip
                tqdm.write(
                    f"step {step:7d} | {curve[-1]['seconds']:6.0f} s | samples at "
                    f"w={args.guidance_scale:g} classified as requested: {accuracy:.3f}"
                )
                title = f"{SCRIPT}: EMA samples at w={args.guidance_scale:g}, 10 per class"
                save_quality_curve(curve, f"{args.out_dir}/quality_curve.png", title)
            if stop or step == max_steps or (epoch_end and (epoch + 1) % args.save_every == 0):
                if master:
                    parts = {k: getattr(run, k).state_dict() for k in CHECKPOINT_PARTS}
                    parts["model_args"] = {key: getattr(args, key) for key in MODEL_ARGS}
                    meta = {"script": SCRIPT, "args": vars(args), "step": step, "losses": losses,
                            "curve": curve, "seconds": time.perf_counter() - t_start}  # fmt: skip
                    save_checkpoint({**meta, **parts}, ckpt_path)
                saved_step = step
            if master and epoch_end and args.sample_every and (epoch + 1) % args.sample_every == 0:
                w = args.guidance_scale
                with run.ctx:
                    x = class_rows(run.sampler, run.sample, w, args.seed, rows=2)
                path = f"{args.out_dir}/samples_epoch{epoch + 1:03d}.png"
                title = f"EMA samples after epoch {epoch + 1} (w={w:g})"
                save_image_grid(x, path, title, CLASS_NAMES[args.dataset])
            t_log = time.perf_counter()

    if world_size > 1:  # every rank leaves the group here; rank 0 then draws the figures
        dist.barrier()  # the gloo threads idle first (a busy group can hang on exit)
        dist.destroy_process_group()
    if master:
        save_loss_curve(losses, f"{args.out_dir}/loss.png", f"{SCRIPT}: training loss")
        if stop:
            print(f"interrupted at step {step}: saved {ckpt_path}; continue with --resume")
        else:
            print(f"done: {step} steps in {time.perf_counter() - t_start:.0f} s, "
                  f"checkpoint {ckpt_path}")  # fmt: skip
            with run.ctx:
                run_experiments(run.model, run.sampler, run.sample, args)
    return run.model


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


def split(convert):  # "1,2,2" -> [1, 2, 2]
    return lambda text: [convert(v) for v in text.split(",")]


positive_int = checked(int, lambda v: v > 0, "a positive integer")
nonnegative_int = checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = checked(float, lambda v: 0 < v < math.inf, "a positive number")
nonnegative_float = checked(float, lambda v: 0 <= v < math.inf, "a number >= 0")
probability = checked(float, lambda v: 0 <= v <= 1, "a probability in [0, 1]")
unit_float = checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
int_list = checked(split(int), lambda v: min(v) > 0, "positive integers like 1,2,2")
float_list = checked(split(float), lambda v: 0 <= min(v) <= max(v) < math.inf,
                     "numbers >= 0 like 1,2,4")  # fmt: skip
interval_pair = checked(lambda text: tuple(split(float)(text)),  # "0.2,0.8" -> (0.2, 0.8)
                        lambda v: len(v) == 2 and 0 <= v[0] < v[1] <= 1,
                        "two numbers LO,HI with 0 <= LO < HI <= 1, like 0.2,0.8")  # fmt: skip
class_pairs = checked(  # "3-5,0-8" -> [(3, 5), (0, 8)]
    lambda text: [tuple(int(c) for c in pair.split("-")) for pair in text.split(",")],
    lambda v: all(len(p) == 2 and 0 <= min(p) <= max(p) < NUM_CLASSES for p in v),
    f"pairs of class labels in 0..{NUM_CLASSES - 1} like 3-5,0-8",
)


# A preset is a recipe: its values replace the defaults below, flags given on the command line win.
PRESETS = {
    # real digits on a laptop CPU in minutes: a 0.35M-parameter U-Net with a high lr, in steps
    "laptop": {
        "dataset": "mnist", "base_ch": 16, "ch_mult": [1, 2, 2], "num_res_blocks": 1,
        "cond_dim": 128, "dropout": 0.0, "schedule": "linear", "batch_size": 64, "lr": 5e-3,
        "warmup_steps": 100, "max_steps": 2500, "p_uncond": 0.1, "ema_decay": 0.996,
        "guidance_scale": 3.0, "sample_steps": 25, "sample_every": 0, "eval_every": 500,
        "out_dir": "out/ddpm_mnist_laptop",
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

    description = __doc__.strip().split("\n")[0]
    p = argparse.ArgumentParser(f"{SCRIPT}.py", description=description, epilog=preset_epilog(),
                                formatter_class=Formatter)  # fmt: skip
    p.error = fail  # one line instead of the whole usage block, exit code 2
    # fmt: off
    p.add_argument("--preset", choices=tuple(PRESETS), help="a recipe of flag values (see below)")
    add = p.add_argument_group("data").add_argument
    add("--dataset", default="cifar10", choices=("cifar10", "mnist", "synthetic"),
        help="cifar10, mnist (padded to 32x32) or synthetic (coloured shapes made in memory)")
    add("--data-dir", default="data", help="where torchvision finds or downloads data")
    add("--synthetic-size", type=positive_int, default=10000, help="images in --dataset synthetic")
    add("--train-size", type=nonnegative_int, default=0,
        help="train on a balanced subset: N/10 images per class, chosen by --seed (0: all)")
    add = p.add_argument_group("model").add_argument
    add("--base-ch", type=positive_int, default=128, help="channels at 32x32 (even)")
    add("--ch-mult", type=int_list, default=[1, 2, 2], help="channel multiplier per resolution")
    add("--num-res-blocks", type=positive_int, default=2, help="residual blocks per resolution")
    add("--attn-res", type=int_list, default=[8], help="resolutions (pixels) with self-attention")
    add("--attn-heads", type=positive_int, default=4, help="self-attention heads")
    add("--cond-dim", type=positive_int, default=256, help="width of the time + class embedding")
    add("--dropout", type=probability, default=0.1, help="dropout in residual blocks")
    add("--class-init-std", type=positive_float, default=0.02,
        help="std of the class embedding's initial weights (1: the label is heard from step 1)")
    add = p.add_argument_group("diffusion").add_argument
    add("--schedule", default="cosine", choices=("cosine", "linear"), help="beta schedule")
    add("--timesteps", type=positive_int, default=1000, help="diffusion steps T")
    add = p.add_argument_group("training").add_argument
    add("--epochs", type=positive_int, default=50, help="passes over the training set")
    add("--max-steps", type=positive_int,
        help="optimizer steps of the run, instead of --epochs; the lr schedule spans them")
    add("--batch-size", type=positive_int, default=128, help="global batch, split over ranks")
    add("--lr", type=positive_float, default=2e-4, help="peak AdamW learning rate")
    add("--weight-decay", type=nonnegative_float, default=1e-4, help="AdamW decay")
    add("--warmup-steps", type=nonnegative_int, default=1000, help="steps of linear lr warm-up")
    add("--grad-clip", type=positive_float, default=1.0, help="max gradient norm")
    add("--p-uncond", type=probability, default=0.15, help="share of labels made null (CFG)")
    add("--ema-decay", type=probability, default=0.9995,
        help="EMA decay d: averages the last 1/(1-d) steps' weights (the plain mean before)")
    add("--log-every", type=positive_int, default=50, help="steps between logs and checks")
    add("--save-every", type=positive_int, default=1, help="epochs between checkpoints")
    add("--sample-every", type=nonnegative_int, default=5,
        help="epochs between preview grids (0: none)")
    add("--eval-every", type=nonnegative_int, default=0,
        help="steps between learning-curve points: 100 samples scored by the eval classifier, "
             "in the log and quality_curve.png (0: none)")
    add("--resume", action="store_true", help="continue from --ckpt (default --out-dir/ckpt.pt)")
    add = p.add_argument_group("sampling and experiments").add_argument
    add("--guidance-scale", type=nonnegative_float, default=4.0,
        help="CFG scale w: 0 unconditional, 1 conditional, >1 guided")
    add("--sample-steps", type=positive_int, default=50, help="DDIM steps")
    add("--guidance-interval", type=interval_pair, default=(0.0, 1.0), metavar="LO,HI",
        help="guide only while t / T is in [LO, HI] (t = T is noise), conditional elsewhere")
    add("--eta", type=unit_float, default=0.0, help="DDIM noise: 0 deterministic, 1 DDPM-like")
    add("--guidance-scales", type=float_list, default=[1, 2, 4, 6, 8, 10], help="w of the sweep")
    add("--interp-pairs", type=class_pairs, default=[(3, 5), (0, 8), (1, 9), (2, 0)],
        help="class pairs a-b for interpolation.png (CIFAR: cat->dog, airplane->ship, ...)")
    add("--grid-per-class", type=positive_int, default=10,
        help="samples per class in class_grid.png")
    add("--sample-only", action="store_true", help="no training: the experiments from --ckpt")
    add("--ckpt", default=None, help="checkpoint to read and write (default --out-dir/ckpt.pt)")
    add = p.add_argument_group("evaluation").add_argument
    add("--eval", action="store_true", help="no training: score --ckpt's samples with a classifier")
    add("--eval-per-class", type=positive_int,
        help="samples per class and row (>= 2); default 100 on a GPU, 20 on CPU or MPS")
    add("--eval-scales", type=float_list, default=[0, 1, 2, 3, 4, 6], help="w scored by --eval")
    add("--eval-interval", type=interval_pair, default=(0.0, 0.7), metavar="LO,HI",
        help="guidance interval of the table's extra rows (one per w > 1)")
    add("--classifier-steps", type=positive_int, default=400,
        help="training steps (batch 128) of the eval classifier")
    add = p.add_argument_group("system").add_argument
    add("--out-dir", default="out/ddpm_cifar", help="checkpoints and figures go here")
    add("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"), help="cuda > mps > cpu")
    add("--seed", type=nonnegative_int, default=0, help="random seed")
    add("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
        help="autocast precision; auto = bf16 on GPUs with native bf16 (compute capability "
             "8.0+), fp16 on older GPUs, fp32 on CPU and MPS")
    add("--compile", action="store_true", help="torch.compile the model and the sampling EMA")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=True,
        help="NHWC memory format for the convolutions (faster on tensor cores)")
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
    if args.base_ch % 2:
        p.error(f"--base-ch must be even (sinusoidal time embedding), got {args.base_ch}")
    if IMAGE_SIZE % 2 ** (len(args.ch_mult) - 1):
        p.error(f"--ch-mult has too many levels for {IMAGE_SIZE}x{IMAGE_SIZE} images")
    resolutions = [IMAGE_SIZE // 2**i for i in range(len(args.ch_mult))]
    for res in [*args.attn_res, resolutions[-1]]:  # the middle block has attention too
        if res not in resolutions:
            p.error(f"--attn-res {res} is not one of the U-Net resolutions {resolutions}")
        channels = args.base_ch * args.ch_mult[resolutions.index(res)]
        if channels % args.attn_heads:
            p.error(f"--attn-heads {args.attn_heads} does not divide {channels} channels at {res}")
    if args.sample_steps > args.timesteps:
        p.error(f"--sample-steps {args.sample_steps} exceeds --timesteps {args.timesteps}")
    if args.train_size % NUM_CLASSES:
        p.error(
            f"--train-size {args.train_size} must be divisible by {NUM_CLASSES} (a balanced set)"
        )
    if args.eval_per_class is None:  # sampling speed: minutes on a CPU, seconds on a GPU
        gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        args.eval_per_class = 100 if gpu else 20
    if args.eval_per_class < 2:
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
    """Exit with one clear line instead of a traceback (bad checkpoint, missing data)."""
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
    """DDP: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; plain `python` is one process.
    Returns (rank, world_size, device); device "auto" picks cuda > mps > cpu."""
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
    """Seed the draws of one training step (t, noise, label dropout, flips, dropout masks) from
    (seed, rank, step) alone: a resumed run continues exactly, with no random state to save."""
    torch.manual_seed(hash((seed, rank, step)))


class StopSignal:
    """Inside `with StopSignal() as s:`, Ctrl-C or SIGTERM (torchrun, schedulers, `kill`) sets
    s.requested, so the loop saves and exits cleanly at its next check; a second Ctrl-C aborts at
    once."""

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


def duration(seconds):
    """2000 -> "33 minutes", 30000 -> "8.3 hours", 700000 -> "8.1 days"."""
    if seconds < 5400:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds / 3600:.1f} hours" if seconds < 172800 else f"{seconds / 86400:.1f} days"


def check_output_paths(out_dir, ckpt_path, writes_ckpt):
    """Fail now, with one line, if the figures or the checkpoint could not be written later."""
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
    """A checkpoint of this script; its MODEL_ARGS flags go into args (contradicting ones fail)."""
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path}; train first, or point --ckpt at one")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, wrong format, pickled code: all mean "not loadable"
        fail(f"{path} is not a readable checkpoint ({type(e).__name__}); it may be truncated")
    if not isinstance(ckpt, dict) or ckpt.get("script") != SCRIPT or "model_args" not in ckpt:
        fail(f"{path} was not written by {SCRIPT}.py")
    for key, saved in ckpt["model_args"].items():
        if key in args.given and getattr(args, key) != saved:
            flag = "--" + key.replace("_", "-")
            value = ",".join(map(str, saved)) if isinstance(saved, list) else saved
            fail(f"{path} was trained with {flag} {value}; leave {flag} out or pass {flag} {value}")
        setattr(args, key, saved)
    if args.sample_steps > args.timesteps:  # again: --timesteps may come from the checkpoint
        fail(f"--sample-steps {args.sample_steps} exceeds {path}'s --timesteps {args.timesteps}")
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


def save_image_grid(images, path, title, col_labels, row_labels=None):
    """Save images (nrow * ncol, C, H, W) in [-1, 1], row by row, ncol = len(col_labels), as PNG."""
    n, c, h, w = images.shape
    ncol, nrow = len(col_labels), n // len(col_labels)
    x = F.pad((images.float().cpu().clamp(-1, 1) + 1) / 2, (1, 1, 1, 1), value=1.0)
    h, w = h + 2, w + 2  # with a one-pixel white frame
    x = x.view(nrow, ncol, c, h, w).permute(0, 3, 1, 4, 2).reshape(nrow * h, ncol * w, c)
    fig = figure(figsize=(1 + 0.8 * ncol, 0.8 + 0.8 * nrow))
    ax = fig.subplots()
    ax.imshow(x.squeeze(-1).numpy(), cmap="gray" if c == 1 else None, vmin=0, vmax=1)
    ax.set_xticks([w * (i + 0.5) for i in range(ncol)], col_labels, rotation=45, ha="right")
    ax.set_yticks([h * (i + 0.5) for i in range(len(row_labels or []))], row_labels or [])
    ax.tick_params(labelsize=8)
    ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=150, bbox_inches="tight")


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
    """--bench: the training step and CFG sampling of the configuration the flags select ("fast")
    against the plain one (fp32, eager, NCHW), both built by setup() as a real run builds them, on
    random data; medians of three alternating rounds. The first --bench-steps steps (the warm-up)
    also compare the two variants' losses, from the same weights and random draws."""
    plain = argparse.Namespace(**{**vars(args), "dtype": "fp32", "compile": False,
                                  "channels_last": False})  # fmt: skip
    B, n, C = args.batch_size, args.bench_samples, 1 if args.dataset == "mnist" else 3
    x0 = torch.randn(B, C, IMAGE_SIZE, IMAGE_SIZE, device=device).clamp(-1, 1)
    noise = torch.randn(n, C, IMAGE_SIZE, IMAGE_SIZE, device=device)
    y, labels = (torch.arange(k, device=device) % NUM_CLASSES for k in (B, n))
    runs, losses, times = {}, {}, {}
    for name, variant in (("fast", args), ("plain", plain)):
        run = runs[name] = setup(variant, device, total_steps=10**6)
        run.train = partial(run.step, x0.contiguous(memory_format=run.memory_format), y, 0.999)
        emb = run.sampler.class_emb(labels)
        run.sample_all = partial(run.sample, run.sampler, emb, noise, args.guidance_scale)
        run.flags, losses[name], times[name] = variant, [], ([], [])
        for i in range(args.bench_steps):  # warm-up (compilation), the same draws in both
            torch.manual_seed(i)
            losses[name].append(run.train().item())
        with run.ctx:
            run.sample_all()
    for _ in range(3):  # alternate, so that clock or thermal drift hits both variants alike
        for name, run in runs.items():
            precision(run.flags.dtype, device)  # TF32 on or off, as in that variant
            times[name][0].append(timed(run.train, device, args.bench_steps))
            with run.ctx:
                times[name][1].append(timed(run.sample_all, device))
    cuda = device.type == "cuda"
    hw = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{SCRIPT} --bench on {hw}, torch {torch.__version__}: train batch {B}, CFG sampling "
          f"of {n} images x {args.sample_steps} DDIM steps\n"
          "variant  train ms/step  train img/s  sample s  sample img/s")  # fmt: skip
    (tf, sf), (tp, sp) = (torch.tensor(times[k]).median(1).values.tolist() for k in runs)
    for name, t, s in (("fast", tf, sf), ("plain", tp, sp)):
        print(f"{name:8} {1e3 * t:13.1f} {B / t:12.1f} {s:9.3g} {n / s:13.1f}")
    gaps = [abs(f - p) / p for f, p in zip(losses["fast"], losses["plain"])]
    print(f"speed-up fast / plain: training {tp / tf:.2f}x, sampling {sp / sf:.2f}x\nloss, fast vs "
          f"plain, first {len(gaps)} steps: mean relative difference {sum(gaps) / len(gaps):.2e}, "
          f"max {max(gaps):.2e}")  # fmt: skip


def synchronize(device):
    """Wait for the device's queued work (CUDA and MPS run asynchronously; the CPU does not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn, device, repeat=1):
    """Seconds per call of fn, over `repeat` back-to-back calls, the device synchronised."""
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / repeat


if __name__ == "__main__":
    main()
