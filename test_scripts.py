"""Tests for the three scripts: python -m pytest test_scripts.py

Everything runs on the CPU in under two minutes: models are shrunk through the scripts' own width
flags, data is the scripts' built-in synthetic data (nothing is downloaded), and the end-to-end
tests run the real command lines in subprocesses.
"""

import concurrent.futures
import contextlib
import copy
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cross_attention_toy as cat
import ddpm_cifar_cfg as ddpm
import flow_dit_mnist_cfg as flow

HERE = Path(__file__).resolve().parent
# Tiny models run fastest on one thread, and subprocesses (torchrun starts two) would otherwise
# oversubscribe the cores: OpenMP threads of busy processes spin against each other.
torch.set_num_threads(1)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# Tiny models through each script's own flags: seconds per run on a CPU.
TINY = {
    "ddpm_cifar_cfg": [
        "--dataset", "synthetic", "--synthetic-size", "48", "--base-ch", "8", "--ch-mult", "1,2",
        "--num-res-blocks", "1", "--attn-res", "16", "--attn-heads", "2", "--cond-dim", "16",
        "--batch-size", "8", "--sample-steps", "2", "--grid-per-class", "1", "--device", "cpu",
        "--log-every", "2", "--guidance-scales", "1,4", "--interp-pairs", "3-5",
    ],
    "flow_dit_mnist_cfg": [
        "--dataset", "synthetic", "--synthetic-size", "48", "--width", "32", "--depth", "2",
        "--heads", "2", "--cond-dim", "64", "--batch-size", "8", "--sample-steps", "2",
        "--device", "cpu", "--log-every", "2", "--grid-per-class", "1",
    ],
    "cross_attention_toy": [
        "--width", "16", "--ch-mult", "1,2", "--attn-res", "8", "--self-attn-res", "8",
        "--heads", "2", "--text-dim", "32", "--text-depth", "1", "--batch-size", "8",
        "--sample-steps", "2", "--eval-per-prompt", "1", "--eval-scales", "1",
        "--guidance-scales", "1", "--guidance-scale", "2", "--device", "cpu", "--log-every", "2",
        "--eval-every", "0",
    ],
}  # fmt: skip
MODULES = {"ddpm_cifar_cfg": ddpm, "flow_dit_mnist_cfg": flow, "cross_attention_toy": cat}
SCRIPTS = list(MODULES)
LOSS_FUNCTIONS = {"ddpm_cifar_cfg": "diffusion_loss", "flow_dit_mnist_cfg": "flow_loss",
                  "cross_attention_toy": "diffusion_loss"}  # fmt: skip


def epochs(name, n):
    """--epochs n for the scripts that train on a fixed dataset; cross_attention_toy.py draws a
    fresh batch every step and counts --max-steps only."""
    return [] if name == "cross_attention_toy" else ["--epochs", str(n)]


def run_script(name, *flags, timeout=120):
    """Run a script as a user would, in a subprocess; returns the CompletedProcess."""
    cmd = [sys.executable, str(HERE / f"{name}.py"), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE, env=ENV)


def run_main(module, argv, capsys):
    """Run main(argv) in-process and return (exit code, stdout, stderr)."""
    try:
        module.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def train_on_fixed_batch(module, model, x0, cond, loss_fn, steps, lr):
    """`steps` calls of the script's own train_step on one batch, at a constant lr, on the CPU."""
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(steps):
        module.train_step(model, ema, optimizer, scaler, loss_fn(model, x0, cond), 0.99, 1.0)


# -----------------------------------------------------------------------------
# ddpm_cifar_cfg.py


def tiny_ddpm(*extra):
    return ddpm.get_args(TINY["ddpm_cifar_cfg"] + list(extra))


def test_ddpm_unet_shape_with_real_and_null_labels():
    model = ddpm.build_model(tiny_ddpm())
    x = torch.randn(4, 3, 32, 32)
    t = torch.tensor([0, 10, 500, 999])
    y = torch.tensor([0, 9, ddpm.NULL_CLASS, ddpm.NULL_CLASS])
    assert model(x, t, y).shape == x.shape
    assert ddpm.build_model(tiny_ddpm("--dataset", "mnist"))(x[:, :1], t, y).shape == (4, 1, 32, 32)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_ddpm_schedule_sanity(schedule):
    a = ddpm.make_alphas_cumprod(schedule, 1000)
    assert a.shape == (1000,)
    assert (a > 0).all() and (a < 1).all()
    assert (a[1:] < a[:-1]).all(), "alpha_bar must be strictly decreasing"
    assert a[-1] < 0.01, "t = T-1 must be (almost) pure noise"
    x0, noise = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 3, 32, 32)
    x_t0 = ddpm.q_sample(a, x0, torch.zeros(2, dtype=torch.long), noise)
    assert (x_t0 - x0).abs().max() < 0.1, "q_sample at t=0 must be close to x0"


def test_ddpm_cfg_algebra():
    torch.manual_seed(0)
    model = ddpm.build_model(tiny_ddpm()).eval()
    for p in model.parameters():  # random weights everywhere, so that cond != uncond
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([5, 500, 900])
    y = torch.tensor([1, 2, 3])
    emb, null = model.class_emb(y), model.class_emb.weight[ddpm.NULL_CLASS]
    with torch.no_grad():
        cond = model(x, t, y)
        uncond = model(x, t, torch.full_like(y, ddpm.NULL_CLASS))
        assert not torch.allclose(cond, uncond)
        torch.testing.assert_close(ddpm.guided_eps(model, x, t, emb, null, 1.0), cond)
        torch.testing.assert_close(ddpm.guided_eps(model, x, t, emb, null, 0.0), uncond)
        w3 = ddpm.guided_eps(model, x, t, emb, null, 3.0)
        torch.testing.assert_close(w3, uncond + 3 * (cond - uncond), rtol=1e-4, atol=1e-4)


def test_ddpm_loss_decreases_on_fixed_batch():
    args = tiny_ddpm("--lr", "1e-2", "--dropout", "0")
    torch.manual_seed(0)
    model = ddpm.build_model(args)
    images, labels = ddpm.make_synthetic(8, seed=0)
    x0, y = ddpm.get_batch(images, labels, torch.arange(8), False, torch.contiguous_format)
    ac = ddpm.make_alphas_cumprod("cosine", 1000)
    loss_fn = partial(ddpm.diffusion_loss, alphas_cumprod=ac, p_uncond=0.15)

    def fixed_loss():  # the same t, noise and dropped labels every time
        torch.manual_seed(123)
        with torch.no_grad():
            return loss_fn(model, x0, y).item()

    before = fixed_loss()
    train_on_fixed_batch(ddpm, model, x0, y, loss_fn, steps=10, lr=args.lr)
    after = fixed_loss()
    assert before > 0.9, "the zero-initialised output layer predicts eps = 0: loss ~ 1 at start"
    assert after < 0.6 * before, f"loss went from {before:.3f} to only {after:.3f}"


def test_ddpm_end_to_end_then_sample_only(tmp_path, capsys, monkeypatch):
    """Training with a learning curve and the figures, then --sample-only, --eval (which reuses
    the curve's cached classifier) and a --resume that extends the curve. In-process: the
    torchrun and Ctrl-C tests run the script as a real command line."""
    out = tmp_path / "run"
    curve = ["--eval-every", "3", "--classifier-steps", "2", "--warmup-steps", "1"]
    flags = TINY["ddpm_cifar_cfg"] + curve + ["--max-steps", "3", "--out-dir", str(out)]
    code, stdout, err = run_main(ddpm, flags, capsys)
    assert code == 0, err
    for name in ["ckpt.pt", "loss.png", "quality_curve.png", "classifier.pt"]:
        assert (out / name).stat().st_size > 0, name
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and len(ckpt["losses"]) == 3
    assert ckpt["scheduler"]["_last_lr"] == [0.0], "the cosine ends at --max-steps, not --epochs"
    [point] = ckpt["curve"]
    assert point["step"] == 3 and 0 <= point["accuracy"] <= 1 and point["seconds"] > 0
    assert f"step       3 | {point['seconds']:6.0f} s | samples at w=4 classified" in stdout
    figures = ["class_grid.png", "guidance_sweep.png", "interpolation.png", "ema_vs_raw.png"]
    for name in figures:
        (out / name).unlink()
    flags = TINY["ddpm_cifar_cfg"] + ["--sample-only", "--ckpt", str(out / "ckpt.pt"),
                                      "--out-dir", str(out)]  # fmt: skip
    code, stdout, err = run_main(ddpm, flags, capsys)
    assert code == 0, err
    for name in figures:
        assert (out / name).stat().st_size > 1000, name
    flags = TINY["ddpm_cifar_cfg"] + ["--eval", "--out-dir", str(out), "--eval-per-class", "3"]
    flags += ["--eval-scales", "0,4", "--classifier-steps", "2"]
    code, stdout, err = run_main(ddpm, flags, capsys)
    assert code == 0, err
    assert "classifier: trained" not in stdout, "the classifier of the learning curve is reused"
    table = stdout.splitlines()
    header = next(i for i, line in enumerate(table) if line.split()[:2] == ["w", "accuracy"])
    assert table[header].split()[2:6] == ["95%", "CI", "confidence", "diversity"]
    labels = [line.split()[0] for line in table[header + 1 : header + 5]]
    assert labels == ["real", "0", "4", "4"] and "in [0, 0.7]" in table[header + 4]
    with open(out / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:7] == ["w", "accuracy", "ci_low", "ci_high", "confidence", "diversity",
                                 "fd"]  # fmt: skip
    assert list(rows[0])[7:] == ddpm.CLASS_NAMES["synthetic"], "one accuracy column per class"
    assert [r["w"] for r in rows] == ["real", "0", "4", "4 in [0, 0.7]"]
    for r in rows:  # the accuracy inside its interval, the FD of a row >= 0
        assert float(r["ci_low"]) <= float(r["accuracy"]) <= float(r["ci_high"]), r
        assert float(r["fd"]) >= 0
    assert (out / "eval.png").stat().st_size > 0
    skip_experiments(ddpm, monkeypatch)
    ddpm.main(TINY["ddpm_cifar_cfg"] + curve + ["--max-steps", "6", "--out-dir", str(out),
                                                "--resume"])  # fmt: skip
    resumed = torch.load(out / "ckpt.pt", weights_only=True)["curve"]
    assert [p["step"] for p in resumed] == [3, 6] and resumed[0] == point, "the curve survives"
    assert resumed[1]["seconds"] > point["seconds"]


def test_ddpm_ema_equals_per_parameter_reference():
    torch.manual_seed(0)
    model, ema = ddpm.build_model(tiny_ddpm()), ddpm.build_model(tiny_ddpm())
    reference = [p.detach().clone() for p in ema.parameters()]
    for decay in (0.5, 0.9, 0.999):
        for p in model.parameters():
            p.data.normal_()
        ddpm.update_ema(ema, model, decay)
        for r, p in zip(reference, model.parameters(), strict=True):
            r.mul_(decay).add_(p.detach(), alpha=1 - decay)
    for r, e in zip(reference, ema.parameters(), strict=True):
        torch.testing.assert_close(e, r)


def test_ddpm_ema_is_the_running_mean_until_the_cap_then_exponential():
    """--ema-decay d: the plain mean of the weights so far until step 1/(1-d) - 1, where the decay
    reaches d; from there on an exponential average with decay exactly d, over a run long enough
    to reach it (d = 0.99: the cap at step 99 of 300)."""
    assert [ddpm.ema_decay_at(s, 0.99) for s in (0, 1, 9, 98)] == [0, 0.5, 0.9, 98 / 99]
    assert ddpm.ema_decay_at(99, 0.99) == 0.99 and ddpm.ema_decay_at(10**6, 0.99) == 0.99
    model, ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    weights = torch.randn(300, generator=torch.Generator().manual_seed(0)).double()
    model.double(), ema.double()
    expected = 0.0
    for s, w in enumerate(weights.tolist()):
        model.weight.data.fill_(w)
        ddpm.update_ema(ema, model, ddpm.ema_decay_at(s, 0.99))
        if s < 100:  # the mean of the weights after steps 0..s
            expected = weights[: s + 1].mean().item()
        else:
            expected = 0.99 * expected + 0.01 * w
        assert ema.weight.item() == pytest.approx(expected, abs=1e-12), s
    assert ema.weight.item() != pytest.approx(weights[-100:].mean().item(), abs=1e-3)


def test_ddpm_lr_warm_up_then_cosine_to_zero():
    lr = partial(ddpm.warmup_cosine, warmup_steps=10, total_steps=110)
    assert [lr(s) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]  # linear, reaching 1 at step 9
    assert (
        lr(10) == 1.0
        and lr(60) == pytest.approx(0.5)
        and lr(35) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    )  # cosine of the share of the decay done
    assert lr(110) == pytest.approx(0.0, abs=1e-12) and lr(500) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", ["ddpm_cifar_cfg", "flow_dit_mnist_cfg"])
def test_epoch_batches_are_whole_disjoint_and_reshuffled(name):
    """Whole batches only (one shape for torch.compile): 103 items in batches of 10 are 10
    batches of distinct items, a fresh order each epoch; two ranks take disjoint equal shards."""
    epoch_batches = MODULES[name].epoch_batches
    batches = epoch_batches(103, 10, epoch=3, seed=0)
    assert [len(b) for b in batches] == [10] * 10
    seen = torch.cat(batches).tolist()
    assert len(set(seen)) == 100 and set(seen) <= set(range(103))
    other = epoch_batches(103, 10, epoch=4, seed=0)
    assert set(torch.cat(other).tolist()) != set(seen), "other items are left over each epoch"
    shards = [epoch_batches(103, 5, 3, 0, rank, 2) for rank in (0, 1)]
    assert [len(b) for b in shards[0]] == [len(b) for b in shards[1]] == [5] * 10
    a, b = (set(torch.cat(s).tolist()) for s in shards)
    assert not a & b, "ranks see disjoint shards"


def test_ddpm_precision_auto_follows_compute_capability(monkeypatch):
    """auto: bf16 only on GPUs with native bf16 (compute capability 8.0+), fp16 (with the loss
    scaler) on a T4 or V100, fp32 on the CPU; fp32 also turns TF32 off in matmuls and cuDNN."""
    cuda, saved = torch.device("cuda"), (torch.backends.cuda.matmul.allow_tf32,
                                         torch.backends.cudnn.allow_tf32)  # fmt: skip
    try:
        for capability, dtype in [((7, 5), torch.float16), ((7, 0), torch.float16),
                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)]:  # fmt: skip
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, c=capability: c)
            assert ddpm.precision("auto", cuda)[0] == dtype, capability
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        dtype, ctx = ddpm.precision("auto", torch.device("cpu"))
        assert dtype == torch.float32 and isinstance(ctx, contextlib.nullcontext)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert ddpm.precision("fp16", torch.device("cpu"))[0] == torch.float16
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_ddpm_timed_synchronizes_mps_and_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("mps"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("cuda"))
    for device in ("mps", "cuda", "cpu"):
        ddpm.timed(lambda: calls.append("fn"), torch.device(device))
    assert calls == ["mps", "fn", "mps", "cuda", "fn", "cuda", "fn"]


def test_ddpm_bf16_autocast_on_cpu_gives_a_loss_close_to_fp32():
    args = tiny_ddpm("--dropout", "0")
    torch.manual_seed(0)
    model = ddpm.build_model(args)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)  # a non-zero output layer
    images, labels = ddpm.make_synthetic(8, seed=0)
    x0, y = ddpm.get_batch(images, labels, torch.arange(8), False, torch.contiguous_format)
    ac = ddpm.make_alphas_cumprod("cosine", 1000)
    losses = {}
    for name in ("fp32", "bf16"):
        dtype, ctx = ddpm.precision(name, torch.device("cpu"))
        torch.manual_seed(1)
        with ctx:
            losses[name] = ddpm.diffusion_loss(model, x0, y, ac, 0.15)
        assert losses[name].dtype == torch.float32
    assert math.isfinite(losses["bf16"].item()) and losses["bf16"] != losses["fp32"], losses
    assert losses["bf16"].item() == pytest.approx(losses["fp32"].item(), rel=0.03)


def count_graphs(monkeypatch):
    """torch.compile with a backend that runs the traced graph as it is and counts the graphs
    Dynamo hands it: every (re)compilation adds one."""
    graphs, real_compile = [], torch.compile

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend=counting, **kw))
    torch._dynamo.reset()
    return graphs


def test_ddpm_compiled_training_and_sampling_never_recompile(monkeypatch):
    """Training steps of one batch shape compile once; the sampler (dynamic) compiles once for
    batches of every size: the figures' 10, 8 and 20 images, --eval's last smaller batch."""
    graphs = count_graphs(monkeypatch)
    args = tiny_ddpm("--compile", "--ch-mult", "1", "--attn-res", "32")  # a U-Net of one level
    run = ddpm.setup(args, torch.device("cpu"), total_steps=10)
    images, labels = ddpm.make_synthetic(8, seed=0)
    counts = []
    for batch in ddpm.epoch_batches(8, 4, epoch=0, seed=0):  # two steps
        run.step(*ddpm.get_batch(images, labels, batch, False, run.memory_format), 0.5)
        counts.append(len(graphs))
    assert counts[0] >= 1 and counts[1] == counts[0], counts
    after_training = counts[-1]
    counts = []
    for n in (3, 5):  # a guided pass is one batch of 2n
        noise = torch.randn(n, 3, 32, 32)
        run.sample(run.sampler, run.sampler.class_emb(torch.arange(n)), noise, 4.0)
        counts.append(len(graphs))
    assert counts[0] > after_training, "the sampler is compiled"
    assert counts[1] == counts[0], "a new batch size recompiled the sampler"


def test_ddpm_compile_wraps_the_ddp_model(monkeypatch, tmp_path):
    """torch.compile(DDP(model)): DDP's gradient all-reduce then overlaps the compiled backward."""
    import torch.distributed as dist

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or m)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        ddpm.setup(tiny_ddpm("--compile"), torch.device("cpu"), total_steps=1)
    finally:
        dist.destroy_process_group()
    assert isinstance(compiled[0], torch.nn.parallel.DistributedDataParallel)


def test_ddpm_ddim_with_eta_1_and_few_steps_stays_finite():
    """eta = 1, 3 steps: 1 - a_prev - sigma^2 is ~0 at the last step and float32 rounding makes
    it negative; clamped, the samples are finite and land on the data."""
    a = ddpm.make_alphas_cumprod("cosine", 1000)
    points, noise, labels = point_mass_setup()
    model = PointMassEps(a, points)
    for steps in (2, 3):
        torch.manual_seed(0)
        x = ddpm.ddim_sample(model, model.class_emb(labels), noise, 1.0, a, steps, eta=1.0)
        assert x.isfinite().all(), steps
        torch.testing.assert_close(x, points[labels], rtol=0, atol=1e-4)
        drawn = torch.rand(1)
        torch.manual_seed(0)
        assert torch.equal(drawn, torch.rand(1)), "its own generator: the global stream untouched"


def test_ddpm_ddim_clips_the_predicted_x0_to_the_data_range():
    """Data outside [-1, 1] (a point mass at +-1.5): every predicted x0 is clipped to [-1, 1], so
    the samples end at +-1, not at the data."""
    a = ddpm.make_alphas_cumprod("cosine", 1000)
    points = torch.full((ddpm.NUM_CLASSES + 1, 1, 4, 4), 1.5)
    points[1::2] = -1.5
    model = PointMassEps(a, points)
    labels = torch.arange(4)
    x = ddpm.ddim_sample(model, model.class_emb(labels), torch.randn(4, 1, 4, 4), 1.0, a, 5)
    torch.testing.assert_close(x, torch.tensor([1.0, -1, 1, -1]).view(4, 1, 1, 1).expand_as(x))


def test_ddpm_guidance_interval_is_read_on_t_over_T():
    """An interval not symmetric under t / T -> 1 - t / T: [0.5, 1] (the noisy half) guides the
    first two of the steps t / T = 0.999, 0.666, 0.333, 0; reading it as 1 - t / T would guide
    the last two."""
    model, B = CountingModel(), 3
    a, emb = ddpm.make_alphas_cumprod("cosine", 1000), model.class_emb(torch.zeros(B).long())
    ddpm.ddim_sample(model, emb, torch.randn(B, 1, 32, 32), 3.0, a, 4, interval=(0.5, 1.0))
    assert model.batch_sizes == [2 * B, 2 * B, B, B]


def test_ddpm_adagn_scales_by_one_plus_scale():
    """AdaGN(h, c) = GroupNorm(h) * (1 + scale(c)) + shift(c): with the modulation's bias alone
    (scale, shift) and the second conv an identity, the block is x + silu(that), by hand."""
    torch.manual_seed(0)
    block = ddpm.ResBlock(8, 8, cond_dim=3, dropout=0.0)
    torch.nn.init.zeros_(block.modulation.weight)
    with torch.no_grad():
        block.conv2.weight.zero_()
        block.conv2.weight[:, :, 1, 1] = torch.eye(8)  # a 3x3 conv that copies its input
        block.conv2.bias.zero_()
    x, cond = torch.randn(2, 8, 5, 5), torch.randn(2, 3)
    h = block.conv1(F.silu(block.norm1(x)))
    groups = ddpm.norm_groups(8)
    for scale, shift in [(0.0, 0.0), (-1.0, 0.3), (0.5, -0.2)]:
        with torch.no_grad():
            block.modulation.bias.copy_(torch.tensor([scale] * 8 + [shift] * 8))
            expected = x + F.silu(F.group_norm(h, groups) * (1 + scale) + shift)
            torch.testing.assert_close(block(x, cond), expected, rtol=1e-5, atol=1e-5)


def test_ddpm_self_attention_mixes_positions_by_hand():
    """Attention over the H*W positions, per head, from the layer's own 1x1 convs, by hand; the
    zero-initialised output projection makes a fresh layer the identity."""
    torch.manual_seed(0)
    C, heads, H, W = 8, 2, 3, 4
    layer = ddpm.build_model(tiny_ddpm()).mid[0].attn  # as the U-Net initialises it
    x = torch.randn(2, C * 2, H, W)
    assert torch.equal(layer(x), x)
    layer = ddpm.SelfAttention(C, heads)
    torch.nn.init.normal_(layer.proj.weight, std=0.3)  # not the zero init
    x = torch.randn(2, C, H, W)
    with torch.no_grad():
        h = F.group_norm(x, layer.norm.num_groups, layer.norm.weight, layer.norm.bias)
        qkv = torch.einsum("oc,bcp->bop", layer.qkv.weight[:, :, 0, 0], h.flatten(2))
        qkv = qkv + layer.qkv.bias[:, None]  # (B, 3C, H*W)
        q, k, v = qkv.split(C, dim=1)
        d = C // heads
        out = torch.zeros(2, C, H * W)
        for b in range(2):
            for i in range(heads):
                sl = slice(i * d, (i + 1) * d)
                weights = (q[b, sl].T @ k[b, sl] / math.sqrt(d)).softmax(-1)  # (HW, HW)
                out[b, sl] = v[b, sl] @ weights.T
        out = torch.einsum("oc,bcp->bop", layer.proj.weight[:, :, 0, 0], out)
        expected = x + (out + layer.proj.bias[:, None]).view(2, C, H, W)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_ddpm_timestep_embedding_and_norm_groups_by_hand():
    e = ddpm.timestep_embedding(torch.tensor([0, 3]), 4)  # frequencies 1 and 1 / 100
    expected = [[1, 1, 0, 0], [math.cos(3), math.cos(0.03), math.sin(3), math.sin(0.03)]]
    torch.testing.assert_close(e, torch.tensor(expected))
    assert [ddpm.norm_groups(c) for c in (8, 16, 32, 64, 128, 256, 12)] == [2, 4, 8, 16, 32, 32, 2]


def test_ddpm_fresh_unet_predicts_zero_and_resample_halves_or_doubles():
    """initialize_weights: the zero output layer makes the first prediction eps = 0 and each
    zero-initialised residual branch an identity; Resample halves (stride 2) or doubles
    (nearest neighbour) the resolution."""
    torch.manual_seed(0)
    model = ddpm.build_model(tiny_ddpm())
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 700])
    assert model(x, t, torch.tensor([1, ddpm.NULL_CLASS])).abs().max() == 0
    block = model.down[0].res
    torch.testing.assert_close(block(model.stem(x), torch.randn(2, 16)), block.skip(model.stem(x)))
    up = ddpm.Resample(2, up=True)
    torch.nn.init.dirac_(up.conv.weight)  # a copy: leaves the upsampling alone
    torch.nn.init.zeros_(up.conv.bias)
    small = torch.arange(8.0).view(1, 2, 2, 2)
    torch.testing.assert_close(
        up(small, None), small.repeat_interleave(2, 2).repeat_interleave(2, 3)
    )
    assert ddpm.Resample(2, up=False)(torch.randn(1, 2, 8, 8), None).shape == (1, 2, 4, 4)
    for std in (0.02, 1.0):  # --class-init-std sets the class embedding's initial scale
        weight = ddpm.build_model(tiny_ddpm("--class-init-std", str(std))).class_emb.weight
        assert abs(weight.std().item() / std - 1) < 0.15, std


def test_ddpm_frechet_distance_is_zero_for_a_set_and_grows_with_a_shift():
    f = torch.randn(500, 6, generator=torch.Generator().manual_seed(0))
    assert abs(ddpm.frechet_distance(f, f)) < 1e-9
    for c in (0.1, 0.5, 2.0):  # a mean shift by c in each of 6 dimensions adds 6 c^2
        assert ddpm.frechet_distance(f, f + c) == pytest.approx(6 * c * c, rel=1e-6)
    scaled = ddpm.frechet_distance(f, 2 * f)  # S_b = 4 S_a: tr(S_a + 4 S_a - 4 S_a) = tr(S_a)
    assert scaled == pytest.approx(
        torch.cov(f.double().T).trace().item() + f.mean(0).square().sum().item(), rel=1e-6
    )


def test_ddpm_eval_halves_hold_every_class_whatever_the_order():
    """Test images stored as 0, 1, ..., 9, 0, 1, ... (as in some subsets): both halves hold half
    of every class, and they are disjoint."""
    labels = torch.arange(60) % 10
    first, second = ddpm.split_in_halves(labels)
    assert not set(first.tolist()) & set(second.tolist()) and len(first) == len(second) == 30
    for half in (first, second):
        assert torch.equal(labels[half].bincount(minlength=10), torch.full((10,), 3))


def test_ddpm_wilson_interval_by_hand():
    lo, hi = ddpm.wilson_interval(95, 100)  # p = 0.95, z = 1.96
    assert (round(lo, 4), round(hi, 4)) == (0.8882, 0.9785)
    lo, hi = ddpm.wilson_interval(20, 20)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(20 / (20 + 1.96**2), rel=1e-6)


def test_ddpm_preset_sets_defaults_and_given_flags_win(capsys):
    args = ddpm.get_args(["--preset", "laptop", "--lr", "1e-3"])
    preset = ddpm.PRESETS["laptop"]
    assert args.lr == 1e-3, "a flag on the command line wins"
    assert args.base_ch == preset["base_ch"] == 16 and args.max_steps == preset["max_steps"]
    assert args.dataset == "mnist" and args.out_dir == "out/ddpm_mnist_laptop" and args.eval_every
    assert "lr" in args.given and "base_ch" not in args.given, "preset values are not 'given'"
    assert ddpm.get_args(["--device", "cpu"]).eval_per_class == 20, "CPU --eval default"
    with pytest.raises(SystemExit):
        ddpm.get_args(["--help"])
    help_text = capsys.readouterr().out
    assert "--preset laptop: --dataset mnist --base-ch 16 --ch-mult 1,2,2" in help_text


def test_ddpm_train_size_is_balanced_and_seeded(capsys):
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(range(20, 30))])  # unbalanced
    keep = ddpm.balanced_subset(labels, 70, seed=0)
    assert torch.bincount(labels[keep]).tolist() == [7] * 10 and len(set(keep.tolist())) == 70
    assert torch.equal(keep, ddpm.balanced_subset(labels, 70, seed=0)), "the same for one seed"
    assert not torch.equal(keep, ddpm.balanced_subset(labels, 70, seed=1)), "another seed"
    with pytest.raises(SystemExit) as exit_info:
        ddpm.balanced_subset(labels, 210, seed=0)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert (
        "--train-size 210 needs 21 images of each class, but the data holds only 20 of class 0"
        in err
    )
    args = tiny_ddpm("--train-size", "20")
    images, labels = ddpm.load_training_set(args)
    assert len(images) == 20 and torch.bincount(labels).tolist() == [2] * 10


def test_ddpm_fresh_run_into_an_occupied_out_dir_stops_before_data_or_model(
    tmp_path, capsys, monkeypatch
):
    (tmp_path / "ckpt.pt").write_bytes(b"a previous run")

    def untouchable(*args, **kwargs):
        raise AssertionError("data or model touched before the out-dir was checked")

    monkeypatch.setattr(ddpm, "build_model", untouchable)
    monkeypatch.setattr(ddpm, "load_dataset", untouchable)
    code, out, err = run_main(ddpm, TINY["ddpm_cifar_cfg"] + ["--out-dir", str(tmp_path)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.strip().endswith(
        f"{tmp_path / 'ckpt.pt'} already holds a run: continue it with --resume, or train a new "
        "one with another --out-dir"
    )
    assert (tmp_path / "ckpt.pt").read_bytes() == b"a previous run"


def test_ddpm_slow_hardware_hint_once_without_a_preset(tmp_path, monkeypatch, capsys):
    """With a mocked clock (500 s per step), a CPU run without --preset prints one line with the
    run's estimated time and the laptop preset, after its first log window; with a preset none."""
    clock = iter(range(0, 10**6, 1000))  # every reading 1,000 s later: 2 steps per log window
    monkeypatch.setattr(ddpm.time, "perf_counter", lambda: next(clock))
    skip_experiments(ddpm, monkeypatch)
    flags = TINY["ddpm_cifar_cfg"] + ["--max-steps", "6"]
    code, out, err = run_main(ddpm, flags + ["--out-dir", str(tmp_path / "a")], capsys)
    assert code == 0, err
    hint = "at 500000 ms/step on this cpu the 6 steps of this run take about 50 minutes; "
    assert out.count(hint + "`python ddpm_cifar_cfg.py --preset laptop` trains in minutes") == 1
    flags += ["--preset", "laptop", "--eval-every", "0", "--out-dir", str(tmp_path / "b")]
    code, out, err = run_main(ddpm, flags, capsys)
    assert code == 0 and "--preset laptop` trains" not in out, err


def test_ddpm_sample_only_under_torchrun_runs_on_rank_0_only(tmp_path, monkeypatch, capsys):
    """Under torchrun, --sample-only and --eval leave DDP at once; rank 0 goes on alone (here up
    to the checkpoint, which is missing), the others leave with exit code 0 and no output."""
    import torch.distributed as dist

    left = []
    monkeypatch.setattr(dist, "destroy_process_group", lambda: left.append(True))
    for rank in (1, 0):
        monkeypatch.setattr(
            ddpm, "setup_distributed", lambda d, r=rank: (r, 2, torch.device("cpu"))
        )
        flags = ["--sample-only", "--ckpt", "missing.pt", "--out-dir", str(tmp_path)]
        code, out, err = run_main(ddpm, TINY["ddpm_cifar_cfg"] + flags, capsys)
        assert left == [True] * (2 - rank)
        if rank == 1:
            assert code == 0 and out == err == ""
        else:
            assert code == 2 and "no checkpoint at missing.pt" in err


def test_ddpm_resume_in_fp16_from_bf16_and_sample_steps_checked_against_the_checkpoint(
    tmp_path, capsys, monkeypatch
):
    """A bf16 checkpoint holds an empty GradScaler state: --resume --dtype fp16 starts a fresh
    scaler. --sample-steps is checked against the checkpoint's --timesteps, not the default."""
    skip_experiments(ddpm, monkeypatch)
    flags = TINY["ddpm_cifar_cfg"] + ["--out-dir", str(tmp_path), "--timesteps", "10"]
    ddpm.main(flags + ["--max-steps", "1", "--dtype", "bf16"])
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["scaler"] == {}
    ddpm.main(flags + ["--max-steps", "2", "--dtype", "fp16", "--resume"])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and "scale" in ckpt["scaler"]
    system = ["--device", "cpu", "--out-dir", str(tmp_path)]
    code, out, err = run_main(ddpm, system + ["--sample-only", "--sample-steps", "20"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"--sample-steps 20 exceeds {tmp_path / 'ckpt.pt'}'s --timesteps 10" in err, err


def test_ddpm_fast_path_fp32_loss_matches_plain_path():
    args = tiny_ddpm("--dropout", "0")  # dropout masks depend on the memory layout
    images, labels = ddpm.make_synthetic(8, seed=1)
    ac = ddpm.make_alphas_cumprod("cosine", 1000)
    losses = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        model = ddpm.build_model(args)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.05)  # non-zero output layer
        model = model.to(memory_format=fmt)  # identical weights, different layout
        x0, y = ddpm.get_batch(images, labels, torch.arange(8), False, fmt)
        torch.manual_seed(1)
        losses.append(ddpm.diffusion_loss(model, x0, y, ac, 0.15).item())
    assert losses[0] > 0
    assert abs(losses[0] - losses[1]) <= 1e-5 * losses[0], losses


@pytest.mark.parametrize("name", SCRIPTS)
def test_bench_prints_table(name, capsys):
    flags = TINY[name] + ["--bench", "--bench-steps", "2", "--bench-samples", "4"]
    code, out, err = run_main(MODULES[name], flags, capsys)
    assert code == 0, err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("variant"))
    fast, plain = (
        next(ln.split() for ln in lines[header:] if ln.startswith(n)) for n in ("fast ", "plain ")
    )
    assert all(float(v) > 0 for v in fast[1:5] + plain[1:5]), out
    assert "speed-up fast / plain: training" in out
    # on the CPU both variants compute in fp32 (the U-Net's only in another memory layout):
    # the same loss up to float rounding
    parity = out.split("mean relative difference ")[1]
    assert float(parity.split(",")[0]) < 1e-5 and float(parity.split("max ")[1]) < 1e-5, out


def test_ddpm_cosine_schedule_is_nichol_dhariwal_eq17():
    T, s = 1000, 0.008
    a = ddpm.make_alphas_cumprod("cosine", T)

    def f(u):  # eq. 17: alpha_bar(u) = f(u) / f(0)
        return math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2

    for t in (0, 1, 10, 250, 500, 750, 900):  # index t: alpha_bar after t + 1 noising steps
        assert a[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5), t


def test_ddpm_linear_schedule_is_ho_et_al():
    a = ddpm.make_alphas_cumprod("linear", 1000)
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    for t in (0, 1, 500, 999):
        assert a[t].item() == pytest.approx(math.prod(1 - b for b in betas[: t + 1]), rel=1e-4)
    # another T: the betas scale with 1000 / T (T = 100: from 1e-3 to 0.2), the same total noise
    a = ddpm.make_alphas_cumprod("linear", 100)
    assert a[0].item() == pytest.approx(1 - 1e-3) and a[1].item() == pytest.approx(
        (1 - 1e-3) * (1 - 1e-3 - 0.199 / 99)
    )
    # the cosine's last beta would be 1 (alpha_bar = 0 at t = T): clipped to 0.999
    cosine = ddpm.make_alphas_cumprod("cosine", 1000)
    assert cosine[-1].item() == pytest.approx(cosine[-2].item() * 0.001)


def test_ddpm_q_sample_is_the_closed_form():
    a = ddpm.make_alphas_cumprod("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    x0, noise = (
        torch.rand(3, 3, 32, 32, generator=g) * 2 - 1,
        torch.randn(3, 3, 32, 32, generator=g),
    )
    t = torch.tensor([0, 400, 999])
    x_t = ddpm.q_sample(a, x0, t, noise)
    for i, ti in enumerate(t.tolist()):
        expected = math.sqrt(a[ti]) * x0[i] + math.sqrt(1 - a[ti]) * noise[i]
        torch.testing.assert_close(x_t[i], expected)


def test_ddpm_loss_regresses_the_forward_process_noise():
    """An oracle that recovers eps from x_t = sqrt(a) x0 + sqrt(1 - a) eps has zero loss, and the
    eps it sees is standard normal with t uniform over 0..T-1: the loss target is the noise."""
    a = ddpm.make_alphas_cumprod("cosine", 1000)
    x0 = torch.rand(4096, 1, 2, 2) * 2 - 1
    seen = {}

    def oracle(x_t, t, y):
        ab = a[t].view(-1, 1, 1, 1)
        seen["eps"], seen["t"] = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt(), t
        return seen["eps"]

    torch.manual_seed(0)
    assert ddpm.diffusion_loss(oracle, x0, torch.zeros(4096, dtype=torch.long), a, 0.15) < 1e-6
    assert abs(seen["eps"].mean()) < 0.03 and abs(seen["eps"].std() - 1) < 0.03
    # the time convention: t is drawn from all of 0..T-1, the steps the sampler walks
    assert seen["t"].min() == 0 and seen["t"].max() == 999
    assert abs(seen["t"].float().mean() - 499.5) < 20


def test_ddpm_label_dropout_rate():
    seen = []

    def spy(x_t, t, y):
        seen.append(y)
        return torch.zeros_like(x_t)

    y = torch.arange(20000) % ddpm.NUM_CLASSES
    x0 = torch.zeros(20000, 1, 1, 1)
    torch.manual_seed(0)
    for p in (0.0, 0.15, 1.0):
        ddpm.diffusion_loss(spy, x0, y, ddpm.make_alphas_cumprod("cosine", 1000), p)
    none, some, every = seen
    assert torch.equal(none, y) and (every == ddpm.NULL_CLASS).all()
    dropped = some == ddpm.NULL_CLASS
    assert abs(dropped.float().mean() - 0.15) < 0.01
    assert torch.equal(some[~dropped], y[~dropped]), "labels that are kept stay unchanged"


class PointMassEps(torch.nn.Module):
    """The exact eps for data that is a point mass: class k's data is points[k] (k = NULL_CLASS:
    the unconditional point), read from one-hot class embeddings; a mixed embedding means the
    mixed point. Records every x_t it sees."""

    def __init__(self, alphas_cumprod, points):
        super().__init__()
        self.alphas_cumprod, self.points, self.seen = alphas_cumprod, points, []
        self.class_emb = torch.nn.Embedding.from_pretrained(torch.eye(ddpm.NUM_CLASSES + 1))
        self.stem = torch.nn.Conv2d(points.shape[1], 1, 1)  # as in the UNet: gives in_channels

    def forward(self, x, t, y=None, class_emb=None):
        self.seen.append((x, t))
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x0 = torch.einsum("bk,kchw->bchw", class_emb, self.points)  # (B, C, H, W)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()


def point_mass_setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    points = 0.25 * torch.randn(ddpm.NUM_CLASSES + 1, 3, 32, 32, generator=g).clamp(-1, 1)
    noise = torch.randn(8, 3, 32, 32, generator=g)
    labels = torch.arange(8) % ddpm.NUM_CLASSES
    return points, noise, labels


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddpm_ddim_on_a_point_mass_keeps_the_forward_marginals_and_lands_on_the_data(eta):
    """With the exact eps, every x_t the sampler visits is distributed as the forward process
    q(x_t | x0) = N(sqrt(a_t) x0, (1 - a_t) I): at eta = 0 it is exactly sqrt(a_t) x0 + sqrt(1 -
    a_t) noise (the same noise at every step), at eta = 1 the standardised noise stays N(0, 1)."""
    a = ddpm.make_alphas_cumprod("cosine", 1000)
    points, noise, labels = point_mass_setup()
    model = PointMassEps(a, points)
    x = ddpm.ddim_sample(model, model.class_emb(labels), noise, 1.0, a, 10, eta, seed=0)
    torch.testing.assert_close(x, points[labels], rtol=0, atol=1e-5)
    visited = [t[0].item() for _, t in model.seen]
    assert visited == torch.linspace(999, 0, 10).round().long().tolist(), "from T-1 down to 0"
    previous = None
    for x_t, t in model.seen:
        x_t, ab = x_t[: len(labels)], a[t[0]]  # the conditional half
        e = (x_t - ab.sqrt() * points[labels]) / (1 - ab).sqrt()  # standardised noise
        if eta == 0:
            torch.testing.assert_close(e, noise, rtol=0, atol=1e-3)
            continue
        assert abs(e.var() - 1) < 0.06, (t[0].item(), e.var())
        if previous is not None:
            # a step from a to a_prev mixes in fresh noise of DDPM's posterior variance
            # s2 = (1 - a_prev) / (1 - a) (1 - a / a_prev): corr = sqrt(1 - s2 / (1 - a_prev))
            e_before, a_before = previous  # the noisier step before this one
            var = (1 - ab) / (1 - a_before) * (1 - a_before / ab)
            corr = torch.corrcoef(torch.stack([e.flatten(), e_before.flatten()]))[0, 1]
            assert abs(corr - (1 - var / (1 - ab)).sqrt()) < 0.03, (t[0].item(), corr)
        previous = e, ab


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
def test_ddpm_ddim_guided_lands_on_the_guided_point(w):
    """For point masses the guided eps_u + w (eps_c - eps_u) is the exact eps of the point
    x_u + w (x_c - x_u): w = 0 gives the unconditional (null-row) point, w = 1 the class's."""
    a = ddpm.make_alphas_cumprod("cosine", 1000)
    points, noise, labels = point_mass_setup()
    points = 0.3 * points  # so that x_u + 3 (x_c - x_u) stays inside the clipping range [-1, 1]
    model = PointMassEps(a, points)
    x = ddpm.ddim_sample(model, model.class_emb(labels), noise, w, a, 8)
    x_u, x_c = points[ddpm.NULL_CLASS], points[labels]
    torch.testing.assert_close(x, x_u + w * (x_c - x_u), rtol=0, atol=1e-4)


def test_ddpm_interpolation_walks_from_one_class_to_the_other():
    """With the exact eps of point masses, the embedding mix (1 - m) e_a + m e_b is the point
    (1 - m) x_a + m x_b (then guided): the row starts at class a's sample and ends at class b's."""
    a = ddpm.make_alphas_cumprod("cosine", 1000)
    points, _, _ = point_mass_setup()
    model = PointMassEps(a, 0.5 * points)
    sample = partial(ddpm.ddim_sample, alphas_cumprod=a, steps=4)
    row = ddpm.interpolate_classes(model, sample, 3, 5, 2.0, seed=7, num_mixes=5)
    mix = torch.linspace(0, 1, 5).view(-1, 1, 1, 1)
    x_mix, x_u = (1 - mix) * model.points[3] + mix * model.points[5], model.points[ddpm.NULL_CLASS]
    torch.testing.assert_close(row, x_u + 2.0 * (x_mix - x_u), rtol=0, atol=1e-4)  # CFG at w = 2
    noise = ddpm.fixed_noise(1, 3, "cpu", seed=7)
    for label, end in ((3, row[0]), (5, row[-1])):
        pure = sample(model, model.class_emb(torch.tensor([label])), noise, 2.0, seed=7)[0]
        torch.testing.assert_close(end, pure, rtol=0, atol=1e-6)


def test_ddpm_fidelity_is_exact_for_an_oracle_and_chance_for_shuffled_labels():
    """The --eval numbers must mean something. Each image's brightness encodes its class and an
    oracle classifier reads it off: accuracy 1 and confidence ~1 for the true labels, chance for
    shuffled ones; per-class accuracy 1 everywhere; diversity 0 for identical images and the exact
    mean distance over the pairs of distinct images otherwise."""
    y = torch.arange(10).repeat(30)  # (300,)
    x = (y.float() / 10).view(-1, 1, 1, 1).expand(-1, 3, 32, 32)  # class k: every pixel k / 10

    class ReadBrightness(torch.nn.Module):  # the classifier's body: features = the logits
        def forward(self, images):
            k = (images.mean((1, 2, 3)) * 10).round().long()
            return 20 * F.one_hot(k, 10).float()

    oracle = torch.nn.Sequential(ReadBrightness(), torch.nn.Identity(), torch.nn.Identity())

    true = ddpm.fidelity(oracle, x, y, "cpu")
    assert true["accuracy"] == 1 and true["confidence"] > 0.99 and true["diversity"] < 1e-4
    assert true["per_class"] == [1.0] * 10
    shuffled = y[torch.randperm(300, generator=torch.Generator().manual_seed(0))]
    assert ddpm.fidelity(oracle, x, shuffled, "cpu")["accuracy"] < 0.2
    # each class: 15 images at k / 10 and 15 at k / 10 + 0.02, so 2 * 15 * 15 of its 30 * 29
    # ordered pairs of distinct images lie 0.02 * sqrt(3 * 32 * 32) apart, the others 0
    two_levels = x + 0.02 * (torch.arange(300) >= 150).view(-1, 1, 1, 1)
    expected = 450 / 870 * 0.02 * math.sqrt(3 * 32 * 32)
    assert ddpm.fidelity(oracle, two_levels, y, "cpu")["diversity"] == pytest.approx(expected, 1e-5)


@pytest.mark.parametrize("name", ["ddpm_cifar_cfg", "flow_dit_mnist_cfg"])
def test_step_seed_is_a_function_of_seed_rank_and_step(name):
    """Each training step's draws depend on (seed, rank, step): the same triple repeats them (exact
    resume), and another rank or step draws differently (DDP ranks must not share their noise)."""

    def draw(seed, rank, step):
        MODULES[name].seed_step(seed, rank, step)
        return torch.randn(8)

    assert torch.equal(draw(0, 0, 5), draw(0, 0, 5))
    for other in [(1, 0, 5), (0, 1, 5), (0, 0, 6)]:
        assert not torch.equal(draw(0, 0, 5), draw(*other)), other


def test_ddpm_get_batch_gives_images_in_minus_one_to_one():
    images = torch.tensor([0, 128, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 3, 32, 32)
    for hflip in (False, True):
        x, y = ddpm.get_batch(images, torch.arange(3), torch.arange(3), hflip,
                              torch.contiguous_format)  # fmt: skip
        assert x[0].eq(-1).all() and x[2].eq(1).all() and abs(x[1].mean().item()) < 0.01


# -----------------------------------------------------------------------------
# flow_dit_mnist_cfg.py

FLOW_TINY = {"width": 32, "depth": 2, "heads": 2, "cond_dim": 64}  # a DiT that runs in milliseconds


def randomize(model, std=0.1, seed=0):
    """Random weights everywhere, so that zero-initialised layers no longer hide bugs."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def tiny_inputs(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 1, 28, 28, generator=g)
    t = torch.rand(B, generator=g)
    y = torch.randint(0, flow.NUM_CLASSES, (B,), generator=g)
    return x, t, y


@pytest.mark.parametrize("patch_size,conv_channels", [(2, 0), (4, 0), (7, 0), (4, 3)])
def test_flow_dit_output_shape_equals_input_shape(patch_size, conv_channels):
    model = randomize(flow.DiT(patch_size=patch_size, conv_channels=conv_channels, **FLOW_TINY))
    x, t, y = tiny_inputs()
    out = model(x, t, y)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    assert model.pos_embed.shape == (1, (28 // patch_size) ** 2, FLOW_TINY["width"])
    loud = flow.DiT(label_init_std=1.0, **FLOW_TINY).y_embedder.table.weight  # (11, cond_dim)
    assert loud.shape == (11, 64) and 0.8 < loud.std() < 1.2  # --label-init-std


def layer_norm_by_hand(x, eps=1e-6):
    return (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + eps).sqrt()


def unpatchify_by_hand(tokens, p, C=1):
    """(B, L, p*p*C) -> (B, C, H, W), one patch at a time: token l = row * G + col holds the
    pixels (a, b, channel) of its p x p patch in that order."""
    B, L, _ = tokens.shape
    G = math.isqrt(L)
    image = torch.zeros(B, C, G * p, G * p)
    for row in range(G):
        for col in range(G):
            patch = tokens[:, row * G + col].reshape(B, p, p, C).permute(0, 3, 1, 2)
            image[:, :, row * p : (row + 1) * p, col * p : (col + 1) * p] = patch
    return image


def test_flow_adaln_zero_blocks_start_as_identity():
    model = flow.DiT(**FLOW_TINY)
    x, t, y = tiny_inputs()
    c = model.t_embedder(t) + model.y_embedder(y)  # (B, cond_dim)
    tokens = model.x_embedder(x).flatten(2).transpose(1, 2) + model.pos_embed  # (B, L, D)
    for block in model.blocks:
        assert torch.equal(block(tokens, c), tokens)  # gates are exactly zero
    assert torch.equal(model(x, t, y), torch.zeros_like(x))  # zero final layer: v = 0
    conv = flow.DiT(conv_channels=4, **FLOW_TINY)  # the conv head's zero bias keeps v = 0
    assert torch.equal(conv(x, t, y), torch.zeros_like(x))
    # With a non-zero final layer, the output is that layer, computed here by hand (adaLN:
    # shift and scale from SiLU(c), LayerNorm without affine, then x (1 + scale) + shift), on
    # the embedded patches: the blocks add nothing until training opens their gates.
    randomize(model.final_layer)
    W, b = model.final_layer.adaLN_modulation[1].weight, model.final_layer.adaLN_modulation[1].bias
    shift, scale = (F.silu(c) @ W.T + b).unsqueeze(1).chunk(2, dim=-1)  # 2 x (B, 1, D)
    modulated = layer_norm_by_hand(tokens) * (1 + scale) + shift
    linear = model.final_layer.linear
    expected = unpatchify_by_hand(modulated @ linear.weight.T + linear.bias, p=4)
    torch.testing.assert_close(model(x, t, y), expected, rtol=1e-5, atol=1e-5)
    assert expected.abs().mean() > 1e-3  # the comparison is not between two zero tensors


def test_flow_modulate_is_one_plus_scale():
    """adaLN: x (1 + scale) + shift, so that scale = 0 (the zero init) leaves x as it is."""
    x, shift, scale = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.5]), torch.tensor([0.25, -1])
    assert flow.modulate(x, shift, scale).tolist() == [3.0, 0.5]  # 2 * 1.25 + 0.5, -1 * 0 + 0.5


def test_flow_dit_block_against_hand_computation():
    """x + gate_a attn(adaLN(x)) + gate_m mlp(adaLN(...)), with the six modulations in the order
    shift, scale, gate (attention), shift, scale, gate (MLP), all computed here by hand."""
    block = randomize(flow.DiTBlock(width=8, heads=2, mlp_ratio=2, cond_dim=6), std=0.3)
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 5, 8, generator=g), torch.randn(2, 6, generator=g)
    lin = block.adaLN_modulation[1]
    m = (F.silu(c) @ lin.weight.T + lin.bias).unsqueeze(1)  # (B, 1, 6D)
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (
        m[..., 8 * i : 8 * (i + 1)] for i in range(6)
    )
    h = x + gate_a * block.attn(layer_norm_by_hand(x) * (1 + scale_a) + shift_a)
    expected = h + gate_m * block.mlp(layer_norm_by_hand(h) * (1 + scale_m) + shift_m)
    torch.testing.assert_close(block(x, c), expected, rtol=1e-5, atol=1e-5)


def test_flow_attention_mixes_tokens_as_computed_by_hand():
    """Multi-head self-attention over the L tokens (not over channels), from the layer's own
    weights: per head softmax(q k^T / sqrt(d)) v, heads concatenated, then the output Linear."""
    attn = randomize(flow.Attention(width=8, heads=2), std=0.5)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))  # (B, L, D)
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(8, dim=-1)  # 3 x (B, L, D)
    heads = []
    for h in range(2):  # head h owns channels 4h .. 4h + 3 of q, k and v
        qh, kh, vh = (z[..., 4 * h : 4 * (h + 1)] for z in (q, k, v))  # (B, L, 4)
        weights = (qh @ kh.transpose(1, 2) / math.sqrt(4)).softmax(dim=-1)  # (B, L, L)
        heads.append(weights @ vh)
    expected = torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)


def test_flow_patchify_layout_and_unpatchify_invert_each_other():
    """A known image through the DiT with an identity patch embedding and identity output layer:
    token row * 7 + col, channel a * 4 + b, holds pixel (4 row + a, 4 col + b), and the
    network's output is the image again (tokens in row-major order, both ways)."""
    model = flow.DiT(width=16, depth=1, heads=2, cond_dim=8, patch_size=4)
    pick = torch.eye(16).view(16, 1, 4, 4)  # output channel a * 4 + b copies pixel (a, b)
    with torch.no_grad():
        model.x_embedder.weight.copy_(pick)
        model.final_layer.linear.weight.copy_(torch.eye(16))
    model.pos_embed.zero_()
    model.final_layer.norm = torch.nn.Identity()  # zero adaLN: the final layer is now identity
    x = torch.arange(784.0).view(1, 1, 28, 28)  # pixel (i, j) holds 28 i + j
    tokens = model.x_embedder(x).flatten(2).transpose(1, 2)  # (1, 49, 16)
    assert tokens[0, 1 * 7 + 2, 3 * 4 + 1].item() == 28 * (4 + 3) + (8 + 1)
    torch.testing.assert_close(model(x, torch.rand(1), torch.zeros(1, dtype=torch.long)), x)
    torch.testing.assert_close(unpatchify_by_hand(tokens, p=4), x)


def test_flow_sincos_positions_against_values_by_hand():
    """dim 8 on a 3 x 3 grid: frequencies 1 and 1/100; channels 0-3 encode the row
    (sin, sin, cos, cos), channels 4-7 the column; token l = 3 row + col."""
    pos = flow.sincos_pos_embed_2d(8, 3)
    assert pos.shape == (9, 8)
    row, col = 1, 2
    by_hand = [math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100),
               math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100)]  # fmt: skip
    torch.testing.assert_close(pos[3 * row + col], torch.tensor(by_hand), rtol=0, atol=1e-6)


def test_flow_timestep_embedding_against_values_by_hand():
    """t = 0.002 is scaled to 2 (t_scale 1000, the integer-step range the sinusoids were made
    for); with 4 frequencies dims, the frequencies are 1 and 1/100, cos first, then sin."""
    embedder = flow.TimestepEmbedder(cond_dim=4, freq_dim=4)
    embedder.mlp = torch.nn.Identity()  # the sinusoids alone
    by_hand = [math.cos(2), math.cos(0.02), math.sin(2), math.sin(0.02)]
    torch.testing.assert_close(embedder(torch.tensor([0.002]))[0], torch.tensor(by_hand))


def test_flow_label_dropout_is_visible_in_the_loss():
    seen = []

    def spy(x, t, y):
        seen.append(y.clone())
        return torch.zeros_like(x)

    x0 = torch.zeros(256, 1, 28, 28)
    y = torch.randint(0, flow.NUM_CLASSES, (256,))
    flow.flow_loss(spy, x0, y, p_uncond=0.0)
    flow.flow_loss(spy, x0, y, p_uncond=1.0)
    flow.flow_loss(spy, x0, y, p_uncond=0.5)
    assert torch.equal(seen[0], y)
    assert (seen[1] == flow.NULL_CLASS).all()
    dropped = (seen[2] == flow.NULL_CLASS).float().mean().item()
    assert 0.35 < dropped < 0.65
    # with v_pred = 0 and x0 = 0 the loss is E[x1^2] = 1
    assert abs(flow.flow_loss(spy, x0, y, 0.1).item() - 1.0) < 0.05


def test_flow_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    images, labels = flow.make_synthetic(64, seed=0)
    x0, y = flow.to_model_range(images), labels
    model = flow.DiT(**FLOW_TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def fixed_loss():  # same t, noise and dropout draws every time it is measured
        torch.manual_seed(123)
        with torch.no_grad():
            return flow.flow_loss(model, x0, y, 0.1).item()

    before = fixed_loss()
    for _ in range(30):
        loss = flow.flow_loss(model, x0, y, 0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = fixed_loss()
    assert after < 0.75 * before, (before, after)


def test_flow_ema_update_and_warmup():
    ema, model = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    expected = [
        0.25 * e + 0.75 * m for e, m in zip(ema.parameters(), model.parameters(), strict=True)
    ]
    flow.update_ema(ema, model, 0.25)
    for p, e in zip(ema.parameters(), expected, strict=True):
        torch.testing.assert_close(p, e)
    # the warm-up: the plain mean of all weights so far, until the cap 1 - 1/2000 at step 1999
    assert [flow.ema_decay_at(s, 0.9995) for s in (0, 1, 3, 1998)] == [0, 1 / 2, 3 / 4, 1998 / 1999]
    assert flow.ema_decay_at(1999, 0.9995) == flow.ema_decay_at(10**6, 0.9995) == 0.9995


def test_flow_ema_is_the_running_mean_then_the_capped_average():
    """A run of 8 updates with --ema-decay 0.75 (cap reached at step 3): the EMA is the mean of
    the weights after steps 0..s while s <= 3 (the initial weights count for nothing), then
    0.75 ema + 0.25 weights."""
    weights = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))  # after each step
    ema, model = torch.nn.Linear(3, 1, bias=False), torch.nn.Linear(3, 1, bias=False)
    for s in range(8):
        model.weight.data[0] = weights[s]
        flow.update_ema(ema, model, flow.ema_decay_at(s, 0.75))
        if s <= 3:
            torch.testing.assert_close(ema.weight[0], weights[: s + 1].mean(0))
    by_hand = weights[:4].mean(0)
    for s in range(4, 8):
        by_hand = 0.75 * by_hand + 0.25 * weights[s]
    torch.testing.assert_close(ema.weight[0], by_hand)


def test_flow_lr_warm_up_then_cosine_values():
    values = [flow.warmup_cosine(s, 10, 110) for s in (0, 4, 9, 10, 60, 110, 200)]
    assert values == pytest.approx([0.1, 0.5, 1.0, 1.0, 0.5, 0.0, 0.0])
    assert flow.warmup_cosine(35, 10, 110) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_flow_cfg_algebra():
    model = randomize(flow.DiT(**FLOW_TINY)).eval()
    x, t, y = tiny_inputs(B=4)
    null = torch.full_like(y, flow.NULL_CLASS)
    with torch.no_grad():
        v_cond, v_uncond = model(x, t, y), model(x, t, null)
    assert (v_cond - v_uncond).abs().max() > 1e-2  # the label matters, so the test can fail
    torch.testing.assert_close(flow.guided_velocity(model, x, t, y, 1.0), v_cond)  # w=1: cond
    torch.testing.assert_close(flow.guided_velocity(model, x, t, y, 0.0), v_uncond)  # w=0: uncond
    torch.testing.assert_close(
        flow.guided_velocity(model, x, t, y, 3.0), v_uncond + 3.0 * (v_cond - v_uncond)
    )


def test_flow_euler_one_step_on_constant_field_is_exact():
    g = torch.Generator().manual_seed(0)
    x1, c = torch.randn(5, 1, 28, 28, generator=g), torch.randn(5, 1, 28, 28, generator=g)
    x0 = flow.sample_ode(lambda x, t: c, x1, steps=1, solver="euler")
    assert torch.equal(x0, x1 - c)  # x(0) = x(1) - integral_0^1 c dt


def test_flow_sampler_walks_from_noise_to_data():
    """Time convention: the sampler starts at t=1 (noise) and ends at t=0 (data)."""
    seen = []

    def record(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    flow.sample_ode(record, torch.zeros(2, 1), steps=4, solver="euler")
    assert seen == pytest.approx([1.0, 0.75, 0.5, 0.25])
    seen.clear()
    flow.sample_ode(record, torch.zeros(2, 1), steps=2, solver="heun")
    assert seen == pytest.approx([1.0, 0.5, 0.5, 0.0])


@pytest.mark.parametrize("steps", [1, 3])
def test_flow_heun_is_exact_on_a_field_linear_in_t(steps):
    """v(x, t) = a + b t: the trapezoid rule integrates it exactly, x(0) = x(1) - a - b / 2.
    Euler is off by b / (2 * steps) here, which shows the test can tell them apart."""
    a, b = torch.tensor([0.3, -1.0]), torch.tensor([2.0, 4.0])
    x1 = torch.tensor([1.0, 1.0])
    exact = x1 - a - b / 2
    heun = flow.sample_ode(lambda x, t: a + b * t, x1[None], steps, solver="heun")
    euler = flow.sample_ode(lambda x, t: a + b * t, x1[None], steps, solver="euler")
    torch.testing.assert_close(heun[0], exact, rtol=0, atol=1e-6)
    assert (euler[0] - exact).abs().max() > 0.3 / steps


def test_flow_heun_is_second_order_on_linear_field():
    """v = k x has the solution x(0) = x(1) exp(-k): halving the step divides Heun's error by
    about 4 (second order) and Euler's by about 2 (first order)."""
    k, x1 = 1.5, torch.ones(1, 1, dtype=torch.float64)
    exact = torch.exp(torch.tensor(-k, dtype=torch.float64))

    def error(steps, solver):
        return (flow.sample_ode(lambda x, t: k * x, x1, steps, solver) - exact).abs().item()

    assert 3.5 < error(8, "heun") / error(16, "heun") < 4.5
    assert 1.7 < error(8, "euler") / error(16, "euler") < 2.3


def test_flow_synthetic_digits_are_mnist_like_and_class_dependent():
    images, labels = flow.make_synthetic(500, seed=0)
    assert images.shape == (500, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    again, _ = flow.make_synthetic(500, seed=0)
    assert torch.equal(images, again)
    ink = torch.stack([images[labels == c].float().mean() for c in range(10)])
    assert ink[8] > 1.5 * ink[1]  # "8" lights 7 segments, "1" two
    x = flow.to_model_range(images)
    assert x.min() == -1 and x.max() <= 1


def test_flow_end_to_end_then_eval(tmp_path, capsys, monkeypatch):
    """Training in two parts (--resume) with the learning curve on, every figure, then --eval
    with the classifier the curve trained (cached). In-process: the command line itself runs in
    the Ctrl-C and torchrun tests."""
    out = tmp_path / "out"
    common = [*TINY["flow_dit_mnist_cfg"], "--out-dir", str(out), "--synthetic-size", "96",
              "--classifier-steps", "2"]  # fmt: skip
    train = common + ["--batch-size", "32", "--warmup-steps", "2", "--sample-every", "1",
                      "--eval-every", "3"]  # fmt: skip
    skip_experiments(flow, monkeypatch)  # the figures once, after the second part
    code, first, err = run_main(flow, train + ["--max-steps", "3"], capsys)
    assert code == 0, err
    monkeypatch.undo()
    code, second, err = run_main(flow, train + ["--max-steps", "6", "--resume"], capsys)
    assert code == 0, err
    for name in ["ckpt.pt", "samples_epoch001.png", "samples_epoch002.png", "class_grid.png",
                 "guidance_sweep.png", "uncond_cond_cfg.png", "class_embeddings.png", "loss.png",
                 "quality_curve.png"]:  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["script"] == "flow_dit_mnist_cfg" and ckpt["step"] == 6
    assert len(ckpt["losses"]) == 6
    assert {"model", "ema", "optimizer", "args", "model_args"} <= set(ckpt)
    assert ckpt["scheduler"]["_last_lr"] == [0.0], "the cosine ends at --max-steps"
    # the learning curve: a point every 3 steps, kept across --resume, seconds growing
    assert [point[0] for point in ckpt["curve"]] == [3, 6] and all(
        0 <= accuracy <= 1 for _, _, accuracy in ckpt["curve"]
    )
    assert ckpt["curve"][0][1] < ckpt["curve"][1][1] <= ckpt["seconds"]
    assert "quality | step       3" in first and "quality | step       6" in second
    assert "classifier: trained 2 steps" in first and "classifier" not in second

    code, stdout, err = run_main(flow, common + ["--eval", "--eval-per-class", "3",
                                                 "--eval-scales", "0,4"], capsys)  # fmt: skip
    assert code == 0, err
    assert "classifier: trained" not in stdout, "the learning curve's classifier, cached"
    table = stdout.splitlines()
    header = next(i for i, line in enumerate(table) if line.split()[:2] == ["w", "accuracy"])
    assert table[header].split()[2:6] == ["95%", "CI", "confidence", "diversity"]
    assert [line.split()[0] for line in table[header + 1 : header + 5]] == ["real", "0", "4", "4"]
    real = table[header + 1].split()  # real, accuracy, lo-hi, ...
    lo, hi = map(float, real[2].split("-"))
    assert lo <= float(real[1]) <= hi
    with open(out / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["w"] for r in rows] == ["real", "0", "4", "4 in [0, 0.7]"]
    for r in rows:
        assert 0 <= float(r["ci_low"]) <= float(r["accuracy"]) <= float(r["ci_high"])
        assert float(r["diversity"]) > 0 and float(r["fd"]) >= 0
        assert all(0 <= float(r[digit]) <= 1 for digit in "0123456789")
    for name in ["eval.png", "classifier.pt"]:
        assert (out / name).stat().st_size > 0, name
    assert os.path.getsize(out / "ckpt.pt") > 0


def test_flow_loss_path_and_target():
    """x_t = (1 - t) x0 + t x1 with x0 != 0 and the target x1 - x0: an oracle that reads the target
    off x_t as (x_t - x0) / t has zero loss, and the x1 it implies is standard normal noise."""
    x0 = torch.rand(4096, 1, 2, 2) * 2 - 1
    y = torch.zeros(4096, dtype=torch.long)
    seen = {}

    def oracle(x_t, t, y):
        t = t.view(-1, 1, 1, 1)
        seen["x1"] = (x_t - (1 - t) * x0) / t
        return (x_t - x0) / t

    torch.manual_seed(0)
    assert flow.flow_loss(oracle, x0, y, 0.1) < 1e-5
    x1 = seen["x1"]
    assert abs(x1.mean()) < 0.03 and abs(x1.std() - 1) < 0.03
    assert abs(torch.corrcoef(torch.stack([x1.flatten(), x0.flatten()]))[0, 1]) < 0.05


def test_flow_training_times():
    torch.manual_seed(0)
    t = flow.sample_t(50000, "cpu", "uniform")
    assert (
        0 <= t.min() and t.max() < 1 and abs(t.mean() - 0.5) < 0.01 and abs(t.var() - 1 / 12) < 0.01
    )
    logit = torch.logit(flow.sample_t(50000, "cpu", "logit-normal"))
    assert abs(logit.mean()) < 0.02 and abs(logit.std() - 1) < 0.02


def gaussian_velocity(mu, s):
    """The exact velocity E[x1 - x0 | x_t = x] for data x0 ~ N(mu, s^2), noise x1 ~ N(0, 1), on
    x_t = (1 - t) x0 + t x1. Its ODE carries x1 = z at t = 1 to exactly mu + s z at t = 0."""

    def velocity(x, t):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *[1] * (x.dim() - 1))  # float or (B,)
        var = (1 - t) ** 2 * s**2 + t**2  # Var(x_t)
        return -mu + (x - (1 - t) * mu) * (t - (1 - t) * s**2) / var

    return velocity


@pytest.mark.parametrize("solver,steps,tol", [("euler", 200, 0.02), ("heun", 50, 2e-3)])
def test_flow_sampler_carries_noise_to_the_gaussian_data(solver, steps, tol):
    g = torch.Generator().manual_seed(0)
    mu, s = 0.4 * torch.randn(1, 1, 28, 28, generator=g), 0.3
    z = torch.randn(16, 1, 28, 28, generator=g)
    x0 = flow.sample_ode(gaussian_velocity(mu, s), z, steps, solver)
    torch.testing.assert_close(x0, mu + s * z, rtol=0, atol=tol)
    assert (x0 - z).abs().max() > 0.5, "the sampler moved the noise"


class GaussianVelocity(torch.nn.Module):
    """A DiT stand-in with the exact velocity for Gaussian data N(means[y], s^2) per class y;
    y = NULL_CLASS is the unconditional data."""

    def __init__(self, means, s):
        super().__init__()
        self.means, self.s = means, s

    def forward(self, x, t, y):
        return gaussian_velocity(self.means[y], self.s)(x, t)


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
def test_flow_guided_sampler_lands_on_the_guided_gaussian(w):
    """With one s for all classes, v_u + w (v_c - v_u) is the exact velocity of the Gaussian with
    mean mu_u + w (mu_c - mu_u): w = 0 gives the unconditional (null-class) data, w = 1 the
    class's."""
    g = torch.Generator().manual_seed(1)
    means, s = 0.1 * torch.randn(flow.NUM_CLASSES + 1, 1, 28, 28, generator=g), 0.3
    y = torch.arange(8) % flow.NUM_CLASSES
    z = torch.randn(8, 1, 28, 28, generator=g)
    x0 = flow.generate(GaussianVelocity(means, s), y, w, z, steps=50, solver="heun")
    mu_u, mu_c = means[flow.NULL_CLASS], means[y]
    expected = (mu_u + w * (mu_c - mu_u) + s * z).clamp(-1, 1)  # generate clips to [-1, 1]
    torch.testing.assert_close(x0, expected, rtol=0, atol=2e-3)


def test_flow_fidelity_is_chance_for_shuffled_labels():
    """The --eval numbers must mean something: on real digits the classifier agrees with the
    labels, and with shuffled labels the same images score like chance."""
    images, labels = flow.make_synthetic(500, seed=0)
    classifier = flow.train_classifier(images, labels, 64, 0, "cpu", batch_size=32, lr=4e-3)
    images, y = flow.make_synthetic(500, seed=1)  # held out
    x = flow.to_model_range(images)
    shuffled = y[torch.randperm(500, generator=torch.Generator().manual_seed(0))]
    assert flow.fidelity(classifier, x, y, "cpu")["accuracy"] > 0.9
    assert flow.fidelity(classifier, x, shuffled, "cpu")["accuracy"] < 0.25


def test_flow_classifier_cache_is_keyed_on_everything_it_was_trained_from(tmp_path, monkeypatch):
    images, labels = flow.make_synthetic(50, seed=0)
    trained = []
    real_train = flow.train_classifier

    def counting_train(*a, **k):
        trained.append(1)
        return real_train(*a, **k)

    monkeypatch.setattr(flow, "train_classifier", counting_train)
    path = tmp_path / "classifier.pt"
    key = {"dataset": "synthetic", "data_dir": "data", "synthetic_size": 50, "seed": 0,
           "classifier_steps": 1}  # fmt: skip
    for changed, expect in [({}, 1), ({}, 1), ({"seed": 1}, 2), ({"synthetic_size": 60}, 3),
                            ({"data_dir": "other"}, 4), ({"classifier_steps": 2}, 5)]:  # fmt: skip
        flow.get_classifier(str(path), {**key, **changed}, images, labels, 1, 0, "cpu")
        assert len(trained) == expect, changed


# --- flow_dit_mnist_cfg.py: hardware, precision, compile


@pytest.mark.parametrize(
    "capability,expected",
    [((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
)
def test_flow_dtype_auto_needs_native_bf16(capability, expected, monkeypatch):
    """auto: bf16 only from compute capability 8.0 (Ampere) on; a T4 (7.5) or V100 (7.0) gets
    fp16 with the loss scaler. TF32 only with mixed precision: fp32 is true fp32."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    dtype, ctx = flow.precision("auto", torch.device("cuda"))
    assert dtype == expected and isinstance(ctx, torch.autocast)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    dtype, ctx = flow.precision("auto", torch.device("cpu"))
    assert dtype == torch.float32 and isinstance(ctx, contextlib.nullcontext)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def test_flow_timed_synchronises_mps_and_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("mps"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("cuda"))
    for device in ("mps", "cuda", "cpu"):
        flow.timed(lambda: None, torch.device(device))
    assert calls == ["mps", "mps", "cuda", "cuda"]  # before and after the timed calls


def test_flow_bf16_autocast_on_cpu_gives_a_loss_close_to_fp32():
    model = randomize(flow.DiT(**FLOW_TINY), std=0.05)
    x0, _, y = tiny_inputs(B=8)
    losses = {}
    for name in ("fp32", "bf16"):
        dtype, ctx = flow.precision(name, torch.device("cpu"))
        torch.manual_seed(0)  # the same t, noise and label dropout
        with ctx:
            losses[name] = flow.flow_loss(model, x0.clamp(-1, 1), y, 0.1)
    assert losses["fp32"].dtype == losses["bf16"].dtype == torch.float32  # the loss in fp32
    assert torch.isfinite(losses["bf16"]) and losses["bf16"] != losses["fp32"], "bf16 ran"
    assert losses["bf16"].item() == pytest.approx(losses["fp32"].item(), rel=0.02)


class FakeDDP(torch.nn.Module):
    """Stands for DistributedDataParallel (which needs a process group): passes calls through."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module(*args)


def test_flow_compile_wraps_ddp_and_compiles_once(tmp_path, monkeypatch, capsys):
    """--compile, counted on the CPU with dynamo's tracing and the eager backend: training
    compiles the DDP-wrapped model, once (52 images give 6 full batches of 8, the last 4 are
    left out); sampling compiles once for all the batch sizes of the figures (dynamic)."""
    graphs, compiled, real_compile = [], [], torch.compile

    def counting_compile(model, **kwargs):
        compiled.append(model)
        return real_compile(model, backend=lambda gm, inputs: graphs.append(gm) or gm.forward,
                            **kwargs)  # fmt: skip

    monkeypatch.setattr(torch, "compile", counting_compile)
    skip_experiments(flow, monkeypatch)
    torch._dynamo.reset()
    flags = TINY["flow_dit_mnist_cfg"] + ["--depth", "1", "--synthetic-size", "52", "--epochs", "1",
             "--compile", "--out-dir", str(tmp_path)]  # fmt: skip
    code, out, err = run_main(flow, flags, capsys)
    assert code == 0 and "done: 6 steps" in out, err
    assert len(graphs) == 1, "the training graph, compiled once"
    torch._dynamo.reset()  # as in --sample-only: the sampler compiles first
    run = flow.setup(flow.get_args(flags), torch.device("cpu"), total_steps=1)
    for B, w in [(20, 4.0), (2, 4.0), (10, 1.0), (7, 0.0)]:  # 40, 4, 10, 7 images per pass
        y = torch.arange(B) % 10
        run.sample(run.sampler, y, w, torch.randn(B, 1, 28, 28))
    assert len(graphs) == 2, "and one sampling graph for every batch size"
    monkeypatch.setattr(flow.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(flow, "DistributedDataParallel", FakeDDP)
    compiled.clear()
    flow.setup(flow.get_args(flags), torch.device("cpu"), total_steps=1)
    assert isinstance(compiled[0], FakeDDP), "torch.compile(DDP(model)), not DDP(compiled)"
    torch._dynamo.reset()


COMPILE_CHECK = """
import sys
import torch
import torch._inductor.config
sys.path.insert(0, {here!r})
from test_scripts import flow, randomize, tiny_inputs

torch._inductor.config.compile_threads = 1  # no worker pool to start
model = randomize(flow.DiT(width=16, depth=1, heads=2, cond_dim=16), std=0.05).eval()
x, t, y = tiny_inputs(B=4)
with torch.no_grad():
    compiled = torch.compile(model, fullgraph=True)(x, t, y)
    torch.testing.assert_close(compiled, model(x, t, y), rtol=1e-4, atol=1e-5)
print("compiled == eager")
"""
HAS_CC = any(shutil.which(cc) for cc in ("cc", "gcc", "g++", "clang"))


def start_compile_check(name, out_dir):
    """COMPILE_CHECK in a process of its own (it runs in the background, see background_runs)."""
    script = out_dir / "compile_check.py"
    script.write_text(COMPILE_CHECK.format(here=str(HERE)))
    return start([sys.executable, str(script)], out_dir, cwd=out_dir)


@pytest.mark.skipif(not HAS_CC, reason="torch.compile (inductor) on the CPU needs a C++ compiler")
def test_flow_real_compile_on_cpu_matches_eager(background_runs):
    """The one real torch.compile of the suite (inductor, a depth-1 DiT, the sampling forward):
    one graph with no breaks (fullgraph=True), and the eager velocities."""
    proc, out_dir = background_runs["test_flow_real_compile_on_cpu_matches_eager", None].result()
    out, err = output(out_dir)
    assert proc.returncode == 0 and "compiled == eager" in out, err[-3000:]


def test_flow_resume_fp16_from_a_bf16_checkpoint(tmp_path, monkeypatch):
    """A bf16 checkpoint holds an empty loss-scaler state; --resume --dtype fp16 starts a fresh
    scaler instead of failing on it (and fp16 autocast runs on the CPU too)."""
    skip_experiments(flow, monkeypatch)
    flags = TINY["flow_dit_mnist_cfg"] + ["--max-steps", "4", "--out-dir", str(tmp_path)]
    flow.main(flags + ["--max-steps", "2", "--dtype", "bf16"])
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["scaler"] == {}
    flow.main(flags + ["--resume", "--dtype", "fp16"])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["scaler"]["scale"] > 0


def test_flow_sample_only_and_eval_run_on_rank_0_alone(tmp_path, monkeypatch, capsys):
    """Under torchrun, --sample-only and --eval leave the process group at once; rank 0 makes the
    figures or the table alone, the other ranks return before touching the checkpoint."""
    skip_experiments(flow, monkeypatch)
    flow.main(TINY["flow_dit_mnist_cfg"] + ["--max-steps", "1", "--out-dir", str(tmp_path)])
    left = []
    monkeypatch.setattr(flow.dist, "destroy_process_group", lambda: left.append(1))
    monkeypatch.setattr(flow, "setup_distributed", lambda name: (1, 2, torch.device("cpu")))
    monkeypatch.setattr(flow, "load_checkpoint", lambda *a: pytest.fail("rank 1 read the ckpt"))
    for mode in ("--sample-only", "--eval"):
        assert flow.main(["--device", "cpu", "--out-dir", str(tmp_path), mode]) is None
    assert left == [1, 1]


# --- flow_dit_mnist_cfg.py: presets, data size, output folders, progress


def test_flow_preset_values_are_defaults_that_flags_override(capsys):
    args = flow.get_args(["--preset", "laptop", "--width", "64"])
    laptop = flow.PRESETS["laptop"]
    assert args.width == 64 and args.depth == laptop["depth"] == 4 and args.max_steps == 1800
    assert args.out_dir == "out/flow_dit_mnist_laptop" and args.eval_every > 0
    assert "width" in args.given and "depth" not in args.given  # checkpoints still win
    assert flow.get_args([]).width == 256 and flow.get_args([]).out_dir == "out/flow_dit_mnist"
    with pytest.raises(SystemExit):
        flow.get_args(["--help"])
    assert "--preset laptop: --width 128 --depth 4" in capsys.readouterr().out


def test_flow_train_size_is_balanced_and_seeded(capsys):
    labels = torch.arange(300) % 10
    subset = flow.balanced_subset(labels, 40, seed=0)
    assert torch.bincount(labels[subset]).tolist() == [4] * 10 and len(set(subset.tolist())) == 40
    assert torch.equal(subset, flow.balanced_subset(labels, 40, seed=0))
    assert not torch.equal(subset, flow.balanced_subset(labels, 40, seed=1))
    with pytest.raises(SystemExit) as exit_info:
        flow.balanced_subset(labels, 400, seed=0)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "--train-size 400 needs 40 images of each class, but the data holds only 30" in err


def test_flow_fresh_run_refuses_an_occupied_out_dir(tmp_path, monkeypatch, capsys):
    skip_experiments(flow, monkeypatch)
    flags = TINY["flow_dit_mnist_cfg"] + ["--max-steps", "1", "--out-dir", str(tmp_path)]
    flow.main(flags + ["--train-size", "20"])  # 2 digits per class: 20 images, 2 full batches
    assert "20 training images" in capsys.readouterr().out
    for name in ("build_model", "load_dataset"):
        monkeypatch.setattr(flow, name, lambda *a, **k: pytest.fail("data or model touched"))
    code, out, err = run_main(flow, flags, capsys)
    assert code == 2 and err.count("\n") == 1
    assert (f"{tmp_path / 'ckpt.pt'} already holds a run: continue it with --resume, or train a "
            "new one with another --out-dir") in err  # fmt: skip


def test_flow_slow_hardware_note_with_mocked_timing(tmp_path, monkeypatch, capsys):
    """After the first log window, a run without a preset passes its measured speed to the note
    (the clock mocked: 1 s per reading, 2 steps per window); the note names the whole run's time
    and the laptop preset on a CPU or MPS device when that is over 10 minutes, else nothing."""
    skip_experiments(flow, monkeypatch)
    clock, calls = iter(range(10**6)), []
    monkeypatch.setattr(flow.time, "perf_counter", lambda: float(next(clock)))
    monkeypatch.setattr(flow, "slow_hardware_hint", lambda *a: calls.append(a))
    flags = TINY["flow_dit_mnist_cfg"] + ["--max-steps", "4", "--eval-every", "0"]
    flow.main(flags + ["--out-dir", str(tmp_path / "a")])
    assert calls == [(0.5, 4, torch.device("cpu"))], "once, with 1 s / 2 steps"
    flow.main(flags + ["--preset", "laptop", "--out-dir", str(tmp_path / "b")])
    assert len(calls) == 1, "a preset fits its hardware already"
    monkeypatch.undo()
    capsys.readouterr()
    for seconds_per_step, device in [(2.0, "cpu"), (2.0, "mps"), (2.0, "cuda"), (0.04, "cpu")]:
        assert flow.slow_hardware_hint(seconds_per_step, 14040, torch.device(device)) is False
    notes = capsys.readouterr().out.splitlines()
    assert len(notes) == 2 and notes[0] == (
        "note: 14040 steps at 2000 ms/step take about 7.8 h on this cpu; `--preset laptop` trains "
        "real digits in minutes on a laptop CPU"
    )


def test_flow_wilson_interval_diversity_and_frechet_distance_by_hand():
    points = torch.tensor([0.0, 3.0, 4.0]).view(3, 1, 1, 1)  # pairs 3, 4 and 1 apart
    assert flow.mean_pairwise_distance(points) == pytest.approx(8 / 3)
    z2 = 1.96**2
    assert flow.wilson_interval(300, 300) == pytest.approx((300 / (300 + z2), 1.0))
    lo, hi = flow.wilson_interval(50, 100)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=g)
    assert abs(flow.frechet_distance(a, a)) < 1e-8
    shift = torch.tensor([1.0, -2.0, 0, 0, 0, 0.5])
    assert flow.frechet_distance(a, a + shift) == pytest.approx(5.25)  # |shift|^2, same cov
    # independent coordinates: FD = sum over them of (mu_a - mu_b)^2 + (s_a - s_b)^2
    b = a * torch.tensor([2.0, 1, 1, 1, 1, 3])
    va, vb = a.double().var(0), b.double().var(0)
    by_hand = (va + vb - 2 * (va * vb).sqrt()).sum() + (a.mean(0) - b.mean(0)).square().sum()
    assert flow.frechet_distance(a, b) == pytest.approx(by_hand.item(), rel=0.02)
    assert flow.frechet_distance(a, a + 0.5 * shift) < flow.frechet_distance(a, a + shift)


def test_flow_eval_real_row_has_every_class_in_interleaved_test_sets():
    """Test digits stored as 0, 1, ..., 9, 0, 1, ... (as in some subsets): the real row still
    holds per_class digits of every class, and its FD is against the other digits of each class."""
    images = torch.randint(0, 256, (60, 1, 28, 28), dtype=torch.uint8)
    labels, classifier = torch.arange(60) % 10, flow.build_classifier(1).eval()
    model = torch.nn.Linear(1, 1)  # only its device is used for the real row
    real = next(flow.evaluate(model, None, classifier, (images, labels), (), (0, 0.7), 3, 0))
    assert real["w"] == "real" and not any(math.isnan(a) for a in real["per_class"])
    assert real["fd"] > 0


def test_flow_guidance_interval_direction():
    """[0, 0.5] is the data half of the path (t = 0 is data): Euler at t = 1, 0.75, 0.5, 0.25
    guides only the last two steps; a reversed t (1 - t) would guide the first two."""
    model, B = CountingModel(), 2
    flow.generate(model, torch.zeros(B, dtype=torch.long), 3.0, torch.randn(B, 1, 28, 28), 4,
                  interval=(0.0, 0.5))  # fmt: skip
    assert model.batch_sizes == [B, B, 2 * B, 2 * B]


# -----------------------------------------------------------------------------
# cross_attention_toy.py


def tiny_cat(*extra):
    return cat.get_args(TINY["cross_attention_toy"] + list(extra))


def change_first_object(scene, what):
    """The same scene with the first object's colour, shape or position changed."""
    colour, shape, pos = scene[0]
    if what == "colour":
        colour = next(c for c in cat.COLOURS if c != colour)
    elif what == "shape":
        shape = next(s for s in cat.SHAPES if s != shape)
    else:  # a quadrant that no object of the scene occupies
        pos = next(p for p in cat.POSITIONS if p not in {o[2] for o in scene})
    return ((colour, shape, pos), *scene[1:])


def test_cat_cross_attention_shape_and_padding_mask():
    torch.manual_seed(0)
    B, L, S, D, D_c, heads = 2, 10, 6, 32, 24, 4
    attn = cat.CrossAttention(D, D_c, heads)  # default init: the output projection is not zero
    x, context = torch.randn(B, L, D), torch.randn(B, S, D_c)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    out, no_weights = attn(x, context, mask)
    out_w, weights = attn(x, context, mask, need_weights=True)
    assert out.shape == (B, L, D) and no_weights is None and weights.shape == (B, heads, L, S)
    torch.testing.assert_close(out_w, out, atol=1e-5, rtol=1e-5)  # both paths compute the same
    assert (weights.masked_select(~mask[:, None, None, :]) == 0).all(), "padding gets no weight"
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, heads, L))
    changed_pad = context.clone()
    changed_pad[~mask] = 100 * torch.randn(int((~mask).sum()), D_c)
    torch.testing.assert_close(attn(x, changed_pad, mask)[0], out, atol=1e-5, rtol=1e-5)
    changed_word = context.clone()
    changed_word[:, 1] += 1.0  # a real token: the output must move, else the test proves nothing
    assert not torch.allclose(attn(x, changed_word, mask)[0], out, atol=1e-3)


def heads_by_hand(q, k, v, heads, allowed=None):
    """Multi-head attention written out: q (B, L, D), k, v (B, S, D), each head a contiguous
    block of D / heads channels; softmax over the S keys (allowed: (B, L, S) bool)."""
    d, out = q.shape[-1] // heads, []
    for i in range(heads):
        qi, ki, vi = (z[..., i * d : (i + 1) * d] for z in (q, k, v))
        logits = qi @ ki.transpose(1, 2) / math.sqrt(d)  # (B, L, S)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        out.append(logits.softmax(-1) @ vi)
    return torch.cat(out, -1)  # (B, L, D)


def rotary_by_hand(x, base=100.0):
    """x: (B, L, d) -> each channel pair (i, i + d/2) of position p rotated by p * base^(-2i/d)."""
    out, half = x.clone(), x.shape[-1] // 2
    for p in range(x.shape[1]):
        for i in range(half):
            theta = p * base ** (-i / half)
            a, b = x[:, p, i], x[:, p, i + half]
            out[:, p, i] = a * math.cos(theta) - b * math.sin(theta)
            out[:, p, i + half] = a * math.sin(theta) + b * math.cos(theta)
    return out


def linear(layer, x):
    return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def test_cat_self_attention_over_positions_by_hand():
    """x + W_o Attn(LN(x)) from the layer's own weights: attention runs over the L positions
    (the softmax over keys), per head, with the mask and, for text, rotary q and k."""
    torch.manual_seed(0)
    B, L, D, heads = 2, 6, 8, 2
    x = torch.randn(B, L, D)
    allowed = torch.rand(B, L, L) < 0.6
    allowed |= torch.eye(L, dtype=torch.bool)  # every query keeps one key
    for rotary in (False, True):
        attn = cat.SelfAttention(D, heads, rotary=rotary)  # default init: proj is not zero
        q, k, v = linear(attn.qkv, F.layer_norm(x, (D,), attn.norm.weight, attn.norm.bias)).split(
            D, -1
        )
        if rotary:  # per head: the pairs (i, i + d/2) inside each head's channels
            d = D // heads
            q, k = (torch.cat([rotary_by_hand(z[..., j * d : (j + 1) * d]) for j in range(heads)],
                              -1) for z in (q, k))  # fmt: skip
        for mask in (None, allowed):
            expected = x + linear(attn.proj, heads_by_hand(q, k, v, heads, mask))
            got = attn(x, None if mask is None else mask[:, None])
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=str(rotary))


def test_cat_cross_attention_by_hand():
    """x + W_o softmax(Q K^T / sqrt(d) + M) V with Q = LN(x) W_q, K = c W_k, V = c W_v: image
    positions are the queries, text tokens the keys, padding masked; both paths."""
    torch.manual_seed(0)
    B, L, S, D, D_c, heads = 2, 5, 4, 8, 6, 2
    attn = cat.CrossAttention(D, D_c, heads)
    x, context = torch.randn(B, L, D), torch.randn(B, S, D_c)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    q = F.linear(F.layer_norm(x, (D,), attn.norm.weight, attn.norm.bias), attn.to_q.weight)
    k, v = F.linear(context, attn.to_kv.weight).split(D, -1)
    expected = x + linear(
        attn.proj, heads_by_hand(q, k, v, heads, mask[:, None, :].expand(B, L, S))
    )
    for need_weights in (False, True):
        torch.testing.assert_close(attn(x, context, mask, need_weights)[0], expected, atol=1e-5,
                                   rtol=1e-4)  # fmt: skip


def test_cat_rotary_embedding_by_hand_depends_on_offsets_only():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 8)  # (B, heads, L, d)
    expected = rotary_by_hand(x.reshape(6, 7, 8)).reshape(2, 3, 7, 8)
    torch.testing.assert_close(cat.rotary_embedding(x), expected, atol=1e-6, rtol=1e-5)
    # the same q at every position and the same k: q_m . k_n depends on m - n alone
    q, k = (cat.rotary_embedding(torch.randn(1, 1, 1, 8).expand(1, 1, 7, 8))[0, 0] for _ in "qk")
    dots = q @ k.T  # (7, 7)
    for offset in range(-6, 7):
        diagonal = dots.diagonal(offset)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), atol=1e-5, rtol=0)


def test_cat_timestep_and_position_embeddings_by_hand():
    emb = cat.timestep_embedding(torch.tensor([0, 7, 999]), 8)  # half = 4 frequencies
    for b, t in enumerate((0, 7, 999)):
        for i in range(4):
            f = 10000 ** (-i / 4)
            assert emb[b, i].item() == pytest.approx(math.cos(t * f), abs=1e-4)
            assert emb[b, 4 + i].item() == pytest.approx(math.sin(t * f), abs=1e-4)
    pos = cat.sincos_2d(4, 8)  # position p = (row, col) = divmod(p, 4); 2 frequencies per axis
    for p in range(16):
        y, x = divmod(p, 4)
        f = [10000 ** (-i / 2) for i in range(2)]
        expected = ([math.sin(y * g) for g in f] + [math.cos(y * g) for g in f]
                    + [math.sin(x * g) for g in f] + [math.cos(x * g) for g in f])  # fmt: skip
        assert pos[p].tolist() == pytest.approx(expected, abs=1e-6), p


def test_cat_resblock_and_unet_block_by_hand():
    """ResBlock: GroupNorm-SiLU-conv, the time embedding as norm(h) * (1 + scale) + shift, then
    SiLU-conv and the skip. UNetBlock: one token per position (row-major, the fixed 2D embedding
    added), self-attention, then cross-attention to the text, back to (B, C, H, W)."""
    torch.manual_seed(0)
    B, C_in, C, t_dim, D_c, side = 2, 8, 16, 12, 6, 4
    block = cat.UNetBlock(C_in, C, t_dim, D_c, 2, side, self_attn=True, cross_attn=True)
    res = block.res  # default init: nothing is zero
    x, temb = torch.randn(B, C_in, side, side), torch.randn(B, t_dim)
    context, mask = torch.randn(B, 3, D_c), torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    h = res.conv1(F.silu(F.group_norm(x, 8, res.norm1.weight, res.norm1.bias)))
    scale, shift = linear(res.t_proj, F.silu(temb)).split(C, -1)  # (B, C) each
    h = F.group_norm(h, 8, res.norm2.weight, res.norm2.bias)
    h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    r = res.skip(x) + res.conv2(F.silu(h))
    torch.testing.assert_close(res(x, temb), r, atol=1e-5, rtol=1e-4)
    tokens = r.permute(0, 2, 3, 1).reshape(B, side * side, C) + cat.sincos_2d(side, C)
    tokens = block.cross_attn(block.self_attn(tokens), context, mask)[0]
    expected = tokens.reshape(B, side, side, C).permute(0, 3, 1, 2)
    torch.testing.assert_close(block(x, temb, context, mask), expected, atol=1e-5, rtol=1e-4)


def test_cat_text_encoder_by_hand():
    """Embeddings, then per layer x = attn(x) (clause and padding mask) and x = x + mlp(x), then
    the final LayerNorm; the mask: token i sees token j iff j is real and in i's clause."""
    torch.manual_seed(0)
    encoder = cat.TextEncoder(len(cat.VOCAB), 16, 1, 2)
    tokens = cat.tokenize([cat.IN_DIST_PROMPTS[8], cat.IN_DIST_PROMPTS[0]], cat.MAX_LEN)
    clause = [[0] * 8 + [1] * 8, [0] * 16]  # <start> + 7 words, then "and" + 7 words; padding
    real = tokens != cat.PAD_ID
    allowed = torch.tensor([[[a == b for b in c] for a in c] for c in clause]) & real[:, None, :]
    h = encoder.attn[0](encoder.tok_emb(tokens), allowed[:, None])
    expected = encoder.norm(h + encoder.mlp[0](h))
    torch.testing.assert_close(encoder(tokens, real), expected)


def test_cat_fresh_unet_predicts_zero_and_every_block_starts_as_identity():
    torch.manual_seed(0)
    model = cat.build_model(tiny_cat())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    tokens = cat.tokenize(cat.IN_DIST_PROMPTS[:2], cat.MAX_LEN)
    assert (model(x, t, tokens) == 0).all(), "conv_out is zero-initialised"
    checked = []
    for m in model.modules():
        if isinstance(m, cat.ResBlock):  # the skip path alone
            h, temb = (
                torch.randn(2, m.norm1.num_channels, 4, 4),
                torch.randn(2, m.t_proj.in_features),
            )
            checked.append(torch.equal(m(h, temb), m.skip(h)))
        elif isinstance(m, (cat.SelfAttention, cat.CrossAttention)):  # the identity
            h = torch.randn(2, 5, m.norm.normalized_shape[0])
            if isinstance(m, cat.SelfAttention):
                checked.append(torch.equal(m(h), h))
            else:
                context = torch.randn(2, 3, m.to_kv.in_features)
                checked.append(torch.equal(m(h, context, torch.ones(2, 3, dtype=torch.bool))[0], h))
    # 5 ResBlocks, 1 + 3 self-attention layers (text, U-Net at 8x8), 3 cross-attention layers
    assert len(checked) == 5 + 4 + 3 and all(checked), checked
    assert model.text_encoder.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.15)


def test_cat_unet_shapes_and_attention_maps_path():
    torch.manual_seed(0)
    model = cat.build_model(tiny_cat())
    for p in model.parameters():  # undo the zero-init, so that every layer matters
        p.data.add_(0.02 * torch.randn_like(p))
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 500, 999])
    tokens = cat.tokenize([cat.IN_DIST_PROMPTS[0], cat.IN_DIST_PROMPTS[8], ""], cat.MAX_LEN)
    store = []
    with torch.no_grad():
        eps = model(x, t, tokens)
        eps_w = model(x, t, tokens, attn_store=store)
    assert eps.shape == x.shape
    torch.testing.assert_close(eps_w, eps, atol=1e-5, rtol=1e-5)
    # cross-attention at 8x8 on the way down and up, and in the middle block (8x8)
    assert [w.shape for w in store] == [(3, 2, 64, cat.MAX_LEN)] * 3
    assert all((w[2, :, :, 1:] == 0).all() for w in store), "empty caption: only <start>"


def test_cat_text_encoder_ignores_padding():
    torch.manual_seed(0)
    encoder = cat.TextEncoder(len(cat.VOCAB), 32, 2, 2)
    tokens = cat.tokenize([cat.IN_DIST_PROMPTS[0], cat.IN_DIST_PROMPTS[8]], cat.MAX_LEN)
    mask = tokens != cat.PAD_ID
    out = encoder(tokens, mask)
    changed = tokens.masked_fill(~mask, cat.VOCAB.index("red"))  # pad slots now hold a word
    torch.testing.assert_close(encoder(changed, mask)[mask], out[mask])
    assert not torch.allclose(encoder(changed, changed != cat.PAD_ID)[mask], out[mask], atol=1e-3)


def test_cat_text_encoder_keeps_each_object_to_itself():
    """Each clause (the words between two "and"s) attends only to itself: changing the second
    object's words leaves the first object's token embeddings exactly as they were."""
    torch.manual_seed(0)
    encoder = cat.TextEncoder(len(cat.VOCAB), 32, 2, 2)
    tokens = cat.tokenize(["a red square at the top left and a blue circle at the bottom right",
                           "a red square at the top left and a green triangle at the top right"],
                          cat.MAX_LEN)  # fmt: skip
    out = encoder(tokens, tokens != cat.PAD_ID)
    torch.testing.assert_close(out[0, :8], out[1, :8])  # <start> + the first object's 7 words
    assert not torch.allclose(out[0, 8:], out[1, 8:], atol=1e-3)


def test_cat_tokenizer_grammar_and_held_out_split():
    null = cat.tokenize([cat.NULL_CAPTION], cat.MAX_LEN)[0]
    assert null[0] == cat.START_ID and (null[1:] == cat.PAD_ID).all()
    longest = cat.tokenize([cat.IN_DIST_PROMPTS[8]], cat.MAX_LEN)[0]
    assert (longest != cat.PAD_ID).all(), "MAX_LEN is exactly <start> + two objects"
    _, tokens = cat.get_batch(200, 16, seed=0, step=0)
    captions = [" ".join(cat.VOCAB[i] for i in row[1:] if i != cat.PAD_ID) for row in tokens]
    scenes = [cat.parse_caption(c) for c in captions]
    assert all(cat.scene_to_caption(s) == c for s, c in zip(scenes, captions))
    assert not any((c, s) in cat.HELD_OUT_PAIRS for scene in scenes for c, s, _ in scene)
    assert {len(s) for s in scenes} == {1, 2}
    in_dist = [cat.parse_caption(p) for p in cat.IN_DIST_PROMPTS]
    held_out = [cat.parse_caption(p) for p in cat.HELD_OUT_PROMPTS]
    assert not any((c, s) in cat.HELD_OUT_PAIRS for scene in in_dist for c, s, _ in scene)
    assert all(any((c, s) in cat.HELD_OUT_PAIRS for c, s, _ in scene) for scene in held_out)
    same, other = (cat.get_batch(8, 16, seed=0, step=k)[1] for k in (0, 1))
    assert torch.equal(same, tokens[:8]) and not torch.equal(same, other), "batch = f(seed, step)"


def test_cat_checker_accepts_ground_truth_and_rejects_wrong_captions():
    rng = cat.random.Random(0)
    all_pairs = cat.TRAIN_PAIRS + cat.HELD_OUT_PAIRS
    scenes = [cat.parse_caption(p) for p in cat.IN_DIST_PROMPTS + cat.HELD_OUT_PROMPTS]
    scenes += [cat.random_scene(rng, all_pairs) for _ in range(60)]
    images = cat.render(scenes, 16, rng)  # with random jitter inside the cells
    assert all(cat.check_image(img, s) for img, s in zip(images, scenes))
    for what in ["colour", "shape", "position"]:
        wrong = [change_first_object(s, what) for s in scenes]
        assert not any(cat.check_image(img, s) for img, s in zip(images, wrong)), what
    # an object the caption does not mention, an empty image, pure noise
    two = [s for s in scenes if len(s) == 2]
    assert not any(cat.check_image(img, s[:1]) for img, s in zip(cat.render(two, 16), two))
    assert not cat.check_image(cat.render([()], 16)[0], scenes[0])
    # a red circle painted over a green square: the named quadrant holds a colour not asked for
    square = cat.render([(("green", "square", "top left"),)], 16)[0]
    circle = cat.render([(("red", "circle", "top left"),)], 16)[0]
    painted = torch.where((circle != -1).any(0), circle, square)
    scene = (("red", "circle", "top left"),)
    assert cat.check_image(circle, scene) and not cat.check_image(painted, scene)
    # a third of a square (its top two rows): the right colour and shape, but IoU 14/49 < MIN_IOU
    partial = cat.render([(("red", "square", "top left"),)], 16)[0]
    partial[:, 2:8] = -1
    assert not cat.check_image(partial, (("red", "square", "top left"),))
    torch.manual_seed(0)
    assert not any(cat.check_image(torch.randn(3, 16, 16), s) for s in scenes[:20])


def test_cat_attribute_reader_reads_colour_and_shape_apart():
    scene = (("blue", "triangle", "top left"), ("red", "square", "bottom right"))
    assert cat.read_attributes(cat.render([scene], 16)[0], scene) == [(True, True)] * 2
    asked = scene[:1]
    for drawn, expected in [(("blue", "square", "top left"), (True, False)),
                            (("green", "triangle", "top left"), (False, True)),
                            (("green", "circle", "top left"), (False, False)),
                            (("blue", "triangle", "top right"), (False, False))]:  # fmt: skip
        assert cat.read_attributes(cat.render([(drawn,)], 16)[0], asked) == [expected], drawn


def test_cat_schedule_time_convention():
    abar = cat.cosine_alphas_cumprod(1000)
    assert abar.shape == (1000,) and (abar[1:] < abar[:-1]).all()
    assert abar[0] > 0.999 and abar[-1] < 1e-4, "t = 0 almost clean, t = T-1 pure noise"


def test_cat_loss_decreases_on_fixed_batch():
    args = tiny_cat("--lr", "3e-3")
    torch.manual_seed(0)
    model = cat.build_model(args)
    x0, tokens = cat.get_batch(16, 16, seed=0, step=0)
    null = cat.tokenize([cat.NULL_CAPTION], cat.MAX_LEN)
    abar = cat.cosine_alphas_cumprod(1000)
    loss_fn = partial(cat.diffusion_loss, null_tokens=null, alphas_cumprod=abar, p_uncond=0.1,
                      min_snr_gamma=5.0)  # fmt: skip
    x_eval, tokens_eval = x0.repeat(4, 1, 1, 1), tokens.repeat(4, 1)  # 4 noise draws per image

    def fixed_loss():  # plain eps MSE with the same t, noise and dropped captions every time
        torch.manual_seed(1)
        with torch.no_grad():
            return cat.diffusion_loss(model, x_eval, tokens_eval, null, abar, 0.1, 0.0).item()

    before = fixed_loss()  # trained below with the default Min-SNR weights
    train_on_fixed_batch(cat, model, x0, tokens, loss_fn, steps=10, lr=args.lr)
    after = fixed_loss()
    assert before > 0.9, "the zero-initialised output layer predicts eps = 0: loss ~ 1 at start"
    assert after < 0.75 * before, f"loss went from {before:.3f} to only {after:.3f}"


CAT_PROMPT = "a red square at the top left"


@pytest.fixture(scope="module")
def cat_run(tmp_path_factory):
    """One tiny run in-process with every figure, shared by the tests below: 5 steps in fp32
    (bf16 autocast is several times slower on a CPU; it has its own test), --timesteps 50,
    --ema-decay 0.75 (the EMA's cap, reached at step 3), --prompt, and a sweep at w = 0 and 1
    beside a table at w = 1. Returns (out_dir, the decays the loop passed to update_ema, stdout,
    {figure file name: its row labels})."""
    import contextlib
    import io

    out, decays, stdout = tmp_path_factory.mktemp("cat_run"), [], io.StringIO()
    real_update, real_plot, row_labels = cat.update_ema, cat.plot_grid, {}

    def spy(ema, model, decay):
        decays.append(decay)
        real_update(ema, model, decay)

    def plot_spy(path, *args, **kwargs):  # records the first word of each row label
        real_plot(path, *args, **kwargs)
        row_labels[os.path.basename(path)] = [s.split()[0] for s in kwargs.get("row_labels", ())]

    run = ["--max-steps", "5", "--ema-decay", "0.75", "--timesteps", "50"]
    run += ["--guidance-scales", "0,1", "--prompt", CAT_PROMPT, "--out-dir", str(out)]
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(cat, "update_ema", spy)
        mp.setattr(cat, "plot_grid", plot_spy)
        cat.main(TINY["cross_attention_toy"] + run)
    return out, decays, stdout.getvalue(), row_labels


def test_cat_end_to_end_then_sample_only(cat_run, capsys, monkeypatch):
    out, decays, stdout, row_labels = cat_run
    figures = ["samples.png", "guidance_sweep.png", "attention_maps.png", "prompt.png", "loss.png"]
    for name in figures:
        assert (out / name).stat().st_size > 1000, name
    assert f"--prompt '{CAT_PROMPT}': " in stdout and not (out / "ckpt.pt.tmp").exists()
    table = json.loads((out / "fidelity.json").read_text())
    rows = [(row["guidance_scale"], row["interval"]) for row in table["rows"]]
    assert rows == [(1.0, None), (2.0, None), (2.0, [0.0, 0.7])], "--eval-scales, the default w"
    assert row_labels["guidance_sweep.png"] == ["w=0", "w=1"], "--guidance-scales"
    assert all(0 <= row["in_dist"] <= 1 and row["n_held_out"] == 8 for row in table["rows"])
    assert set(table["rows"][0]["held_out_objects"]) == {"colour", "shape", "both"}
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["script"] == "cross_attention_toy" and ckpt["step"] == 5
    assert len(ckpt["losses"]) == 5 and ckpt["model_args"]["timesteps"] == 50
    # the EMA is the plain mean of the weights after steps 0..3, then decays at --ema-decay
    assert decays == [0, 1 / 2, 2 / 3, 0.75, 0.75]

    # --sample-only runs the same experiments (just shown to write every figure) on the EMA
    # weights from the checkpoint; here they are recorded instead of drawn, to stay fast
    calls = []
    monkeypatch.setattr(cat, "run_experiments", lambda ema, *rest: calls.append(ema.state_dict()))
    flags = TINY["cross_attention_toy"] + ["--sample-only", "--out-dir", str(out)]
    code, stdout, err = run_main(cat, flags, capsys)
    assert code == 0 and len(calls) == 1, err
    for key, value in ckpt["ema"].items():
        assert torch.equal(calls[0][key], value), key


def test_cat_sample_only_prompt_draws_it_at_once(cat_run, tmp_path, capsys, monkeypatch):
    """--sample-only --prompt draws that prompt (prompt.png, its attention maps) and nothing else:
    no fidelity table first."""
    out = cat_run[0]

    def no_table(*args, **kwargs):
        raise AssertionError("the fidelity table was computed")

    monkeypatch.setattr(cat, "fidelity_row", no_table)
    prompt = "a blue triangle at the top right"
    flags = ["--sample-only", "--ckpt", str(out / "ckpt.pt"), "--out-dir", str(tmp_path),
             "--device", "cpu", "--prompt", prompt]  # fmt: skip
    code, stdout, err = run_main(cat, flags, capsys)
    assert code == 0, err
    assert f"--prompt '{prompt}': " in stdout and "wrote attention_maps.png, prompt.png" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attention_maps.png", "prompt.png"]


def test_cat_checkpoint_conflicts_exit_2_before_data_or_model(cat_run, tmp_path, capsys,
                                                             monkeypatch):  # fmt: skip
    """A fresh run into a folder that holds a checkpoint, and --sample-steps beyond the
    checkpoint's --timesteps: one line, exit 2, nothing built."""
    out = cat_run[0]

    def untouchable(*args, **kwargs):
        raise AssertionError("data or model touched before the check")

    monkeypatch.setattr(cat, "get_batch", untouchable)
    monkeypatch.setattr(cat, "UNet", untouchable)
    ckpt = out / "ckpt.pt"
    occupied = (f"{ckpt} already holds a run: continue it with --resume, or train a new one with "
                "another --out-dir")  # fmt: skip
    cases = [
        (["--out-dir", str(out)], occupied),
        (["--out-dir", str(tmp_path), "--ckpt", str(ckpt)], occupied),
        (["--out-dir", str(out), "--sample-only", "--sample-steps", "60"],
         f"--sample-steps 60 exceeds --timesteps 50 of {ckpt}"),
        (["--out-dir", str(out), "--resume", "--sample-steps", "51"],
         f"--sample-steps 51 exceeds --timesteps 50 of {ckpt}"),
    ]  # fmt: skip
    for flags, message in cases:
        code, _, err = run_main(cat, TINY["cross_attention_toy"] + flags, capsys)
        assert code == 2 and err == f"cross_attention_toy.py: error: {message}\n", (flags, err)


def test_cat_resume_in_fp16_from_a_run_without_a_scaler(cat_run, tmp_path, capsys, monkeypatch):
    """A bf16 or fp32 run saves an empty GradScaler state (the scaler runs with fp16 only);
    --resume --dtype fp16 from it starts a fresh loss scale."""
    out = cat_run[0]
    skip_experiments(cat, monkeypatch)
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes((out / "ckpt.pt").read_bytes())
    assert torch.load(ckpt, weights_only=True)["scaler"] == {}, "no scaler state"
    flags = TINY["cross_attention_toy"] + ["--out-dir", str(tmp_path), "--resume", "--dtype",
                                           "fp16", "--max-steps", "6"]  # fmt: skip
    code, stdout, err = run_main(cat, flags, capsys)
    assert code == 0, err
    resumed = torch.load(ckpt, weights_only=True)
    assert resumed["step"] == 6 and resumed["scaler"]["scale"] > 0


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_cat_precision_by_compute_capability_and_true_fp32(monkeypatch):
    """auto: bf16 only from compute capability 8.0 (Ampere) on, fp16 with the loss scaler on
    older GPUs (T4 7.5, V100 7.0), fp32 on CPU and MPS; fp32 turns TF32 off in matmuls and cuDNN,
    and its context is a null one (torch < 2.5 refuses an autocast(enabled=False) on MPS)."""
    for capability, expected in [((6, 1), torch.float16), ((7, 0), torch.float16),
                                 ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                 ((8, 6), torch.bfloat16), ((9, 0), torch.bfloat16)]:  # fmt: skip
        monkeypatch.setattr(
            torch.cuda, "get_device_capability", lambda device=None, c=capability: c
        )
        dtype, ctx = cat.precision("auto", torch.device("cuda"))
        assert dtype == expected and isinstance(ctx, torch.autocast), capability
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    for device in ("cpu", "mps"):
        dtype, ctx = cat.precision("auto", torch.device(device))
        assert dtype == torch.float32 and type(ctx) is cat.contextlib.nullcontext, device
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    dtype, ctx = cat.precision("fp16", torch.device("cpu"))
    assert dtype == torch.float16 and isinstance(ctx, torch.autocast)
    cat.precision("fp32", torch.device("cpu"))  # as every CPU run leaves the flags


def test_cat_timed_synchronises_cuda_and_mps(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("cuda"))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("mps"))
    for device in ("cpu", "cuda", "mps"):
        seconds = cat.timed(lambda d=device: calls.append(f"work on {d}"), torch.device(device))
        assert seconds >= 0
    assert calls == ["work on cpu", "cuda", "work on cuda", "cuda", "mps", "work on mps", "mps"]


def test_cat_bf16_autocast_on_cpu_is_close_to_fp32():
    """The bf16 path really runs the convolutions in bf16, and its loss is finite and within a
    few percent of the fp32 one (the same weights and draws)."""
    torch.manual_seed(0)
    model = cat.build_model(tiny_cat())
    for p in model.parameters():  # undo the zero-init, so that every layer matters
        p.data.add_(0.05 * torch.randn_like(p))
    dtypes = []
    model.conv_in.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    x0, tokens = cat.get_batch(16, 16, seed=0, step=0)
    null, abar = cat.tokenize([""], cat.MAX_LEN), cat.cosine_alphas_cumprod(1000)
    losses = {}
    for name in ("fp32", "bf16"):
        _, ctx = cat.precision(name, torch.device("cpu"))
        cat.seed_step(0, 0)
        with ctx, torch.no_grad():
            losses[name] = cat.diffusion_loss(model, x0, tokens, null, abar, 0.1, 5.0).item()
    assert dtypes == [torch.float32, torch.bfloat16]
    assert math.isfinite(losses["bf16"]) and losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.03), losses


def test_cat_refuses_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out, err = run_main(cat, TINY["cross_attention_toy"], capsys)
    assert code == 2 and "start it with python, not torchrun" in err and err.count("\n") == 1


def test_cat_cosine_schedule_is_nichol_dhariwal_eq17():
    T, s = 1000, 0.008
    abar = cat.cosine_alphas_cumprod(T)

    def f(u):
        return math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2

    for t in (0, 1, 10, 250, 500, 750, 900):
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5), t


def test_cat_loss_target_and_min_snr_weights():
    """An oracle that recovers eps from x_t and adds 1 has a per-image MSE of exactly 1, so the
    loss is the mean Min-SNR weight min(SNR_t, gamma) / SNR_t of the drawn t (1 with gamma = 0)."""
    abar = cat.cosine_alphas_cumprod(1000)
    x0 = torch.rand(512, 3, 2, 2) * 2 - 1
    tokens, null = (
        cat.tokenize(["a red circle at the top left"] * 512, cat.MAX_LEN),
        cat.tokenize([""], cat.MAX_LEN),
    )
    seen = {}

    def oracle(x_t, t, tokens):
        a = abar[t].view(-1, 1, 1, 1)
        seen["t"] = t
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt() + 1

    torch.manual_seed(0)
    assert cat.diffusion_loss(oracle, x0, tokens, null, abar, 0.1, 0.0).item() == pytest.approx(
        1, abs=1e-4
    )
    loss = cat.diffusion_loss(oracle, x0, tokens, null, abar, 0.1, 5.0)
    snr = abar[seen["t"]] / (1 - abar[seen["t"]])
    assert loss.item() == pytest.approx((snr.clamp(max=5.0) / snr).mean().item(), rel=1e-4)
    assert loss < 0.9, "the weights are below 1 where SNR > gamma"


def test_cat_caption_dropout_rate():
    seen = []

    def spy(x_t, t, tokens):
        seen.append(tokens)
        return torch.zeros_like(x_t)

    captions = [cat.IN_DIST_PROMPTS[i % 16] for i in range(20000)]
    tokens, null = cat.tokenize(captions, cat.MAX_LEN), cat.tokenize([""], cat.MAX_LEN)
    x0, abar = torch.zeros(20000, 3, 1, 1), cat.cosine_alphas_cumprod(1000)
    torch.manual_seed(0)
    for p in (0.0, 0.1, 1.0):
        cat.diffusion_loss(spy, x0, tokens, null, abar, p, 0.0)
    none, some, every = seen
    assert torch.equal(none, tokens) and (every == null).all()
    dropped = (some == null).all(1)
    assert abs(dropped.float().mean() - 0.1) < 0.01
    assert torch.equal(some[~dropped], tokens[~dropped]), "kept captions stay unchanged"


def test_cat_step_seed_is_a_function_of_seed_and_step():
    """Each training step's draws (t, noise, caption dropout) depend on (seed, step) alone: the
    same pair repeats them (exact resume), another seed or step draws differently."""

    def draw(seed, step):
        cat.seed_step(seed, step)
        return torch.randn(8)

    assert torch.equal(draw(0, 5), draw(0, 5))
    for other in [(1, 5), (0, 6)]:
        assert not torch.equal(draw(0, 5), draw(*other)), other


class PointMassCaptions(torch.nn.Module):
    """The exact eps for data that is a point mass per caption: prompt i's data is points[i], the
    empty caption's is `null_point`. Records every x_t it sees."""

    def __init__(self, alphas_cumprod, prompts, points, null_point):
        super().__init__()
        self.alphas_cumprod, self.points, self.null_point, self.seen = (
            alphas_cumprod,
            points,
            null_point,
            [],
        )
        self.prompt_tokens = cat.tokenize(prompts, cat.MAX_LEN)  # (P, S)
        self.null_tokens = cat.tokenize([cat.NULL_CAPTION], cat.MAX_LEN)
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, tokens, attn_store=None):
        self.seen.append(x)
        is_prompt = (tokens[:, None] == self.prompt_tokens[None]).all(-1)  # (B, P)
        is_null = (tokens == self.null_tokens).all(-1)
        assert (is_prompt.sum(1) + is_null == 1).all(), "every row is a prompt or the empty caption"
        x0 = torch.where(
            is_null.view(-1, 1, 1, 1), self.null_point, self.points[is_prompt.int().argmax(1)]
        )
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
def test_cat_ddim_is_exact_for_point_masses(w):
    """The guided eps of two point masses is the exact eps of x_u + w (x_c - x_u); DDIM lands on
    that point, and at w = 1 every x_t it visits is exactly sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
    abar = cat.cosine_alphas_cumprod(1000)
    g = torch.Generator().manual_seed(0)
    prompts = list(cat.IN_DIST_PROMPTS[:3])
    points = 0.05 * torch.randn(3, 3, 16, 16, generator=g)
    null_point = 0.05 * torch.randn(3, 16, 16, generator=g)
    noise = torch.randn(3, 3, 16, 16, generator=g)
    model = PointMassCaptions(abar, prompts, points, null_point)
    tokens = cat.tokenize(prompts, cat.MAX_LEN)
    x = cat.ddim_sample(model, tokens, model.null_tokens, noise, w, abar, 6)
    torch.testing.assert_close(x, null_point + w * (points - null_point), rtol=0, atol=1e-4)
    assert len(model.seen) == 6, "one forward pass per step ([cond; uncond] batched for w > 1)"
    if w == 1.0:
        timesteps = torch.linspace(999, 0, 6).round().long()
        for x_t, t in zip(model.seen, timesteps):
            a = abar[t]
            torch.testing.assert_close(
                x_t[:3], a.sqrt() * points + (1 - a).sqrt() * noise, rtol=0, atol=3e-3
            )


def test_cat_ddim_clips_x0_to_the_data_range():
    """Data outside [-1, 1] (a point mass at 1.5): each step clips the predicted x0 to 1 and moves
    on with the noise consistent with the clipped x0, so the sample lands on 1, and every x_t it
    visits after the first is sqrt(a_t) * 1 + sqrt(1 - a_t) eps', eps' the first step's noise."""
    abar = cat.cosine_alphas_cumprod(1000)
    prompts = [cat.IN_DIST_PROMPTS[0]]
    model = PointMassCaptions(abar, prompts, torch.full((1, 3, 4, 4), 1.5), torch.zeros(3, 4, 4))
    noise = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x = cat.ddim_sample(model, cat.tokenize(prompts, cat.MAX_LEN), model.null_tokens, noise, 1.0,
                        abar, 4)  # fmt: skip
    torch.testing.assert_close(x, torch.ones_like(x), rtol=0, atol=1e-5)
    a = abar[torch.linspace(999, 0, 4).round().long()]
    eps = (noise - a[0].sqrt()) / (1 - a[0]).sqrt()
    for x_t, a_t in zip(model.seen[1:], a[1:]):
        torch.testing.assert_close(x_t, a_t.sqrt() + (1 - a_t).sqrt() * eps, rtol=0, atol=1e-4)


def test_cat_guidance_interval_is_read_in_t_over_T():
    """An interval that is not symmetric under t -> 1 - t: [0.5, 1] is the noisy half. DDIM's 4
    steps at t / T = 0.999, 0.666, 0.333, 0 guide (2B rows) the first two, not the last two."""
    model, B = CountingModel(), 3
    tokens, null = cat.tokenize([cat.IN_DIST_PROMPTS[0]] * B, cat.MAX_LEN), cat.tokenize([""], 16)
    abar, noise = cat.cosine_alphas_cumprod(1000), torch.randn(B, 3, 16, 16)
    cat.ddim_sample(model, tokens, null, noise, 3.0, abar, 4, interval=(0.5, 1.0))
    assert model.batch_sizes == [2 * B, 2 * B, B, B]


def test_cat_lr_warm_up_then_cosine_to_ten_percent():
    f = partial(cat.warmup_cosine, warmup_steps=10, total_steps=110)

    def cosine(progress):  # from 1 at the end of the warm-up to 0.1 at total_steps
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    expected = {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 60: 0.55, 85: cosine(0.75), 110: 0.1, 500: 0.1}
    for step, value in expected.items():
        assert f(step) == pytest.approx(value, abs=1e-12), step
    run = cat.setup(tiny_cat("--lr", "1e-3", "--warmup-steps", "2", "--max-steps", "6"),
                    torch.device("cpu"))  # fmt: skip
    lrs = []
    for _ in range(7):
        lrs.append(run.scheduler.get_last_lr()[0])
        run.optimizer.step()  # no gradients: nothing moves, but the scheduler wants this order
        run.scheduler.step()
    assert lrs == pytest.approx(
        [1e-3 * v for v in (0.5, 1, 1, cosine(0.25), 0.55, cosine(0.75), 0.1)]
    )


def test_cat_ema_is_the_plain_mean_until_its_cap_then_decays():
    """ema_decay_at: the update after step s uses s / (s + 1) (a running mean of the weights
    after steps 0..s) until that reaches the decay, at step 1 / (1 - decay) - 1."""
    model = torch.nn.Linear(1, 1, bias=False)
    ema = copy.deepcopy(model).requires_grad_(False)
    seen = []
    for step, weight in enumerate([3.0, 5.0, 1.0, 7.0, 2.0, 4.0]):
        model.weight.data.fill_(weight)
        cat.update_ema(ema, model, cat.ema_decay_at(step, 0.75))
        seen.append(ema.weight.item())
    # the means 3, 4, 3, 4 (steps 0-3), then 0.75 * 4 + 0.25 * 2 and 0.75 * 3.5 + 0.25 * 4
    assert seen == pytest.approx([3, 4, 3, 4, 3.5, 3.625])
    assert (
        cat.ema_decay_at(98, 0.99)
        < 0.99
        == cat.ema_decay_at(99, 0.99)
        == cat.ema_decay_at(10**6, 0.99)
    ), "the default 0.99 reaches its horizon of 100 steps at step 99"


def test_cat_compiled_sampler_is_the_ema_with_one_graph_for_every_batch_size(monkeypatch):
    """--compile: the sampler is the compiled EMA, with a dynamic batch size: the table's rows
    (guided 2B, conditional or unconditional B) and other prompt counts reuse one graph. (CPU
    only: a batch under 16 picks another convolution backend there, so it compiles again.)"""
    from torch._dynamo.testing import CompileCounter

    counter, real_compile = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", partial(real_compile, backend=counter))
    torch._dynamo.reset()
    args = tiny_cat("--compile", "--width", "8", "--ch-mult", "1", "--attn-res", "16",
                    "--self-attn-res", "16", "--text-dim", "8", "--sample-steps", "1")  # fmt: skip
    run = cat.setup(args, torch.device("cpu"))
    assert run.sampler._orig_mod is run.ema
    table = [(cat.IN_DIST_PROMPTS, 2, 3.0), (cat.HELD_OUT_PROMPTS, 2, 3.0),
             (cat.IN_DIST_PROMPTS, 1, 1.0), (cat.HELD_OUT_PROMPTS, 3, 0.0)]  # fmt: skip
    for prompts, n, w in table:  # (prompts, samples per prompt, w): the model sees 64, 32, 16, 24
        cat.generate(run.sampler, run.sample, prompts, n, w, seed=0)
    torch._dynamo.reset()
    assert counter.frame_count == 1, f"{counter.frame_count} compilations"


def test_cat_render_gives_images_in_minus_one_to_one():
    images = cat.render([(("white", "square", "top left"),), ()], 16)
    assert images.min() == -1 and images.max() == 1
    assert images[1].eq(-1).all(), "the background is black"


# -----------------------------------------------------------------------------
# Real datasets, with torchvision's classes replaced by fakes (the tests never download)


class FakeCIFAR10:
    def __init__(self, root, train, download):
        g = torch.Generator().manual_seed(0)  # the same images in every instance
        self.data = torch.randint(0, 256, (6, 32, 32, 3), generator=g, dtype=torch.uint8).numpy()
        self.targets = [0, 1, 2, 3, 4, 5]


class FakeMNIST:
    def __init__(self, root, train, download):
        self.data = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
        self.targets = torch.tensor([9, 8, 7, 6, 5])


class OfflineDataset:
    def __init__(self, root, train, download):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")


def test_real_dataset_loaders_give_uint8_nchw(monkeypatch):
    import torchvision

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    images, labels = ddpm.load_dataset("cifar10", "data", 0, 0)
    raw = FakeCIFAR10("data", True, True)
    assert images.shape == (6, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images[2, 1], torch.from_numpy(raw.data[2, :, :, 1]))
    assert labels.tolist() == raw.targets
    images, labels = ddpm.load_dataset("mnist", "data", 0, 0)
    assert images.shape == (5, 1, 32, 32) and labels.tolist() == [9, 8, 7, 6, 5]
    assert images[:, :, :2].eq(0).all() and images[:, :, 30:].eq(0).all(), "padded 28 -> 32"
    x, _ = ddpm.get_batch(images, labels, torch.arange(5), False, torch.contiguous_format)
    torch.testing.assert_close(x, images.float() / 127.5 - 1)
    images, labels = flow.load_dataset("mnist", "data", 0, 0)
    assert images.shape == (5, 1, 28, 28) and images.dtype == torch.uint8
    x = flow.to_model_range(images)
    torch.testing.assert_close(x, images.float() / 127.5 - 1)
    assert flow.to_model_range(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1, 1]


@pytest.mark.parametrize(
    "name,dataset", [("ddpm_cifar_cfg", "cifar10"), ("flow_dit_mnist_cfg", "mnist")]
)
def test_failed_download_exits_1_with_one_line(name, dataset, monkeypatch, capsys):
    import torchvision

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", OfflineDataset)
    monkeypatch.setattr(torchvision.datasets, "MNIST", OfflineDataset)
    with pytest.raises(SystemExit) as exit_info:
        MODULES[name].load_dataset(dataset, "nowhere", 0, 0)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1, err
    assert "pass --data-dir, or run offline with --dataset synthetic" in err


# -----------------------------------------------------------------------------
# Robustness, shared by the three scripts: resume, crash safety, interrupts, bad input


def skip_experiments(module, monkeypatch):
    """The figures after training are tested end to end above; the tests below are about training
    itself, so they leave the figures out to stay fast."""
    monkeypatch.setattr(module, "run_experiments", lambda *args, **kwargs: None)


@pytest.mark.parametrize("name", SCRIPTS)
def test_resume_is_exact(name, tmp_path, monkeypatch):
    module = MODULES[name]
    skip_experiments(module, monkeypatch)
    flags = TINY[name] + epochs(name, 2)
    one_go = module.main(flags + ["--max-steps", "8", "--out-dir", str(tmp_path / "a")])
    module.main(flags + ["--max-steps", "3", "--out-dir", str(tmp_path / "b")])
    resumed = module.main(flags + ["--max-steps", "8", "--out-dir", str(tmp_path / "b"),
                                   "--resume"])  # fmt: skip
    for (key, a), b in zip(one_go.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=key)
    ckpt_a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    ckpt_b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert ckpt_a["step"] == ckpt_b["step"] == 8
    for key, a in ckpt_a["ema"].items():
        torch.testing.assert_close(a, ckpt_b["ema"][key], rtol=0, atol=1e-6, msg=key)


def wait_for(path, timeout=90):
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def start_long_run(name, out_dir):
    """A training run that saves a checkpoint every few steps and would run for long; a watcher
    sends it Ctrl-C (SIGINT) as soon as its first checkpoint is on disk."""
    if name == "cross_attention_toy":
        length = ["--max-steps", "1000000", "--save-every", "2"]
    else:  # a checkpoint every epoch of two steps
        length = ["--synthetic-size", "16", "--epochs", "100000"]
    flags = TINY[name] + length + ["--out-dir", str(out_dir)]
    proc = start([sys.executable, str(HERE / f"{name}.py"), *flags], out_dir, cwd=HERE)

    def interrupt_when_saved():
        with contextlib.suppress(AssertionError):
            wait_for(out_dir / "ckpt.pt")
            proc.send_signal(signal.SIGINT)

    threading.Thread(target=interrupt_when_saved, daemon=True).start()
    return proc


def start(cmd, out_dir, cwd):
    """Popen with stdout and stderr in files of out_dir (read them with output()), in a session
    of its own, so that killing that session also ends torchrun's ranks."""
    with open(out_dir / "stdout.txt", "w") as out, open(out_dir / "stderr.txt", "w") as err:
        return subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=out, stderr=err, text=True,
                                start_new_session=True)  # fmt: skip


def output(out_dir):
    """(stdout, stderr) of an exited process from start()."""
    return (out_dir / "stdout.txt").read_text(), (out_dir / "stderr.txt").read_text()


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the scripts catches it."""


@pytest.mark.parametrize("name", SCRIPTS)
def test_death_during_a_save_keeps_the_previous_checkpoint(name, tmp_path, monkeypatch):
    module = MODULES[name]
    skip_experiments(module, monkeypatch)
    flags = TINY[name] + epochs(name, 2) + ["--out-dir", str(tmp_path)]
    module.main(flags + ["--max-steps", "2"])
    real_save = torch.save

    def dying_save(obj, path):  # the process dies halfway through writing the next checkpoint
        real_save(obj, path)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise Killed

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(Killed):
        module.main(flags + ["--max-steps", "4", "--resume"])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["script"] == name


@pytest.fixture(scope="session", autouse=True)
def background_runs(request, tmp_path_factory):
    """{(test name, script or None): future of (exited process, out_dir)}: the tests' subprocess
    runs (the real compile, Ctrl-C, torchrun), run one after another in the background from the
    start of the session, for the tests it will run. The in-process tests use one CPU core
    (torch.set_num_threads(1)); these runs take the other instead of waiting their turn."""
    starters = {
        "test_flow_real_compile_on_cpu_matches_eager": start_compile_check,
        "test_ctrl_c_saves_and_exits_cleanly": start_long_run,
        "test_torchrun_two_ranks_disjoint_shards_identical_weights_and_ema": start_torchrun,
    }
    if not HAS_CC:  # that test is skipped
        del starters["test_flow_real_compile_on_cpu_matches_eager"]
    wanted = [(item.originalname, getattr(item, "callspec", None)) for item in request.session.items
              if item.originalname in starters]  # fmt: skip
    wanted = [(test, params and params.params["name"]) for test, params in wanted]
    started = []

    def run(test, name, out_dir):
        started.append(starters[test](name, out_dir))
        started[-1].wait(timeout=180)
        return started[-1], out_dir

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # one run at a time
    out_dirs = {key: tmp_path_factory.mktemp(key[1] or "run") for key in wanted}
    yield {key: pool.submit(run, *key, out_dir) for key, out_dir in out_dirs.items()}
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.parametrize("name", SCRIPTS)
def test_ctrl_c_saves_and_exits_cleanly(name, background_runs):
    proc, out_dir = background_runs["test_ctrl_c_saves_and_exits_cleanly", name].result()
    out, err = output(out_dir)
    assert proc.returncode == 0, err
    step = torch.load(out_dir / "ckpt.pt", weights_only=True)["step"]
    assert f"interrupted at step {step}: saved {out_dir / 'ckpt.pt'}" in out


@pytest.mark.parametrize("name", SCRIPTS)
def test_nonfinite_loss_stops_without_overwriting(name, tmp_path, capsys, monkeypatch):
    module = MODULES[name]
    skip_experiments(module, monkeypatch)
    flags = TINY[name] + epochs(name, 3) + ["--out-dir", str(tmp_path)]
    module.main(flags + ["--max-steps", "6"])
    calls = []
    loss_fn = getattr(module, LOSS_FUNCTIONS[name])

    def exploding_loss(*a, **k):  # finite for two steps, then NaN
        calls.append(1)
        return loss_fn(*a, **k) * (float("nan") if len(calls) > 2 else 1.0)

    monkeypatch.setattr(module, LOSS_FUNCTIONS[name], exploding_loss)
    capsys.readouterr()
    code, out, err = run_main(module, flags + ["--resume"], capsys)
    assert code == 1
    assert "loss became non-finite at step 9; stopped without saving" in err
    assert f"{tmp_path / 'ckpt.pt'} still holds step 6" in err
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 6


BAD_FLAGS = {
    "ddpm_cifar_cfg": [
        (["--p-uncond", "1.5"], "argument --p-uncond: expected a probability in [0, 1], got '1.5'"),
        (["--p-uncond", "-0.1"], "argument --p-uncond: expected a probability in [0, 1]"),
        (["--ema-decay", "2"], "argument --ema-decay: expected a probability in [0, 1]"),
        (["--epochs", "0"], "argument --epochs: expected a positive integer, got '0'"),
        (["--epochs", "-3"], "argument --epochs: expected a positive integer"),
        (["--batch-size", "0"], "argument --batch-size: expected a positive integer"),
        (["--max-steps", "-1"], "argument --max-steps: expected a positive integer"),
        (["--timesteps", "0"], "argument --timesteps: expected a positive integer"),
        (["--sample-steps", "0"], "argument --sample-steps: expected a positive integer"),
        (["--base-ch", "abc"], "argument --base-ch: expected a positive integer, got 'abc'"),
        (["--base-ch", "15"], "--base-ch must be even"),
        (["--lr", "0"], "argument --lr: expected a positive number, got '0'"),
        (["--lr", "nan"], "argument --lr: expected a positive number, got 'nan'"),
        (["--schedule", "quadratic"], "argument --schedule: invalid choice: 'quadratic'"),
        (["--dataset", "imagenet"], "argument --dataset: invalid choice: 'imagenet'"),
        (["--guidance-scales", "1,two,4"], "argument --guidance-scales: expected numbers >= 0"),
        (["--guidance-scale", "-1"], "argument --guidance-scale: expected a number >= 0"),
        (["--interp-pairs", "3-12"], "argument --interp-pairs: expected pairs of class labels"),
        (["--interp-pairs", "3"], "argument --interp-pairs: expected pairs of class labels"),
        (["--ch-mult", "1,2,2,2,2,2,2"], "--ch-mult has too many levels"),
        (["--attn-res", "5"], "--attn-res 5 is not one of the U-Net resolutions"),
        (["--attn-heads", "3"], "--attn-heads 3 does not divide 256 channels at 8"),
        (["--sample-steps", "2000"], "--sample-steps 2000 exceeds --timesteps 1000"),
        (["--sample-only", "--resume"], "choose one of --resume, --bench and --sample-only/--eval"),
        (["--eval-per-class", "1"], "--eval-per-class must be at least 2"),
        (["--guidance-interval", "0.8,0.2"], "argument --guidance-interval: expected two numbers"),
        (["--eval-interval", "0.5"], "argument --eval-interval: expected two numbers LO,HI"),
        (["--eta", "2"], "argument --eta: expected a number in [0, 1], got '2'"),
        (["--eta", "-0.5"], "argument --eta: expected a number in [0, 1], got '-0.5'"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--train-size", "15"], "--train-size 15 must be divisible by 10 (a balanced set)"),
        (["--preset", "desktop"], "argument --preset: invalid choice: 'desktop'"),
        (["--eval-every", "-1"], "argument --eval-every: expected an integer >= 0, got '-1'"),
        (["--grid-per-class", "0"], "argument --grid-per-class: expected a positive integer"),
        (["--classifier-steps", "0"], "argument --classifier-steps: expected a positive integer"),
    ],
    "flow_dit_mnist_cfg": [
        (["--p-uncond", "1.5"], "argument --p-uncond: expected a probability in [0, 1], got '1.5'"),
        (["--ema-decay", "-1"], "argument --ema-decay: expected a probability in [0, 1]"),
        (["--epochs", "0"], "argument --epochs: expected a positive integer, got '0'"),
        (["--batch-size", "0"], "argument --batch-size: expected a positive integer"),
        (["--max-steps", "0"], "argument --max-steps: expected a positive integer"),
        (["--depth", "0"], "argument --depth: expected a positive integer"),
        (["--sample-steps", "-2"], "argument --sample-steps: expected a positive integer"),
        (["--lr", "-1"], "argument --lr: expected a positive number, got '-1'"),
        (["--patch-size", "5"], "--patch-size 5 must divide the image size 28"),
        (["--width", "30", "--heads", "4"], "--width 30 must be divisible by --heads 4"),
        (["--width", "18", "--heads", "2"], "--width 18 must be divisible by --heads 2 and by 4"),
        (["--solver", "rk4"], "argument --solver: invalid choice: 'rk4'"),
        (["--t-sampling", "beta"], "argument --t-sampling: invalid choice: 'beta'"),
        (["--dataset", "cifar10"], "argument --dataset: invalid choice: 'cifar10'"),
        (["--digit", "12"], "argument --digit: invalid choice: 12"),
        (["--eval-scales", "1,x"], "argument --eval-scales: expected numbers >= 0 like 0,1,4"),
        (["--eval-per-class", "1"], "--eval-per-class must be at least 2"),
        (["--resume", "--eval"], "choose one of --resume, --bench and --sample-only/--eval"),
        (["--guidance-interval", "0,1.5"], "argument --guidance-interval: expected two numbers"),
        (["--train-size", "45"], "--train-size 45 must be divisible by 10 (a balanced set)"),
        (["--preset", "gpu"], "argument --preset: invalid choice: 'gpu' (choose from 'laptop')"),
        (["--guidance-scales", "1,x"], "argument --guidance-scales: expected numbers >= 0"),
        (["--grid-per-class", "0"], "argument --grid-per-class: expected a positive integer"),
    ],
    "cross_attention_toy": [
        (["--p-uncond", "1.5"], "argument --p-uncond: expected a probability in [0, 1], got '1.5'"),
        (["--ema-decay", "2"], "argument --ema-decay: expected a probability in [0, 1]"),
        (["--max-steps", "0"], "argument --max-steps: expected a positive integer, got '0'"),
        (["--batch-size", "-8"], "argument --batch-size: expected a positive integer"),
        (["--lr", "-1"], "argument --lr: expected a positive number, got '-1'"),
        (["--guidance-scale", "-1"], "argument --guidance-scale: expected a number >= 0"),
        (["--guidance-scales", "1,x"], "argument --guidance-scales: expected numbers >= 0"),
        (["--ch-mult", "1,two"], "argument --ch-mult: expected positive integers like 1,2,2"),
        (["--image-size", "12"], "--image-size must be a multiple of 8, got 12"),
        (["--ch-mult", "1,2,2,2,2"], "--ch-mult has too many levels for 16x16 images"),
        (["--attn-res", "5"], "--attn-res 5 is not one of the U-Net resolutions [16, 8, 4]"),
        (["--self-attn-res", "2"], "--self-attn-res 2 is not one of the U-Net resolutions"),
        (["--width", "12"], "--width must be a multiple of 8 (GroupNorm groups), got 12"),
        (["--heads", "5"], "--heads 5 does not divide 24 channels"),
        (["--text-dim", "60"], "--text-dim 60 must be divisible by 2 * --heads"),
        (["--sample-steps", "2000"], "--sample-steps 2000 exceeds --timesteps 1000"),
        (
            ["--prompt", "a purple circle"],
            "argument --prompt: unknown word(s) ['purple']; the "
            "vocabulary is: a at the and top bottom left right red",
        ),
        (["--prompt", " ".join(["a"] * 16)], "argument --prompt: caption has 16 words, at most 15"),
        (["--prompt", ""], "argument --prompt: expected a caption, got an empty one"),
        (["--prompt", "   "], "argument --prompt: expected a caption, got an empty one"),
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
        (["--sample-only", "--bench"], "choose at most one of --sample-only, --resume and --bench"),
        (["--guidance-interval", "a,b"], "argument --guidance-interval: expected two numbers"),
    ],
}


@pytest.mark.parametrize(
    "name,flags,message", [(n, f, m) for n, cases in BAD_FLAGS.items() for f, m in cases]
)
def test_bad_flags_exit_2_with_one_line(name, flags, message, capsys):
    code, out, err = run_main(MODULES[name], flags, capsys)
    assert code == 2
    assert err.count("\n") == 1 and f"{name}.py: error: {message}" in err, err


@pytest.mark.parametrize("name", SCRIPTS)
def test_bad_checkpoints_exit_2_with_one_line(name, tmp_path, capsys, monkeypatch):
    module = MODULES[name]
    skip_experiments(module, monkeypatch)
    flags = TINY[name] + ["--out-dir", str(tmp_path)]
    module.main(flags + ["--max-steps", "1"])
    good = tmp_path / "ckpt.pt"
    truncated, foreign = tmp_path / "truncated.pt", tmp_path / "foreign.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    torch.save({"model": {}}, foreign)
    stale = tmp_path / "stale.pt"  # a parameter renamed, as by a change of the network
    ckpt = torch.load(good, weights_only=True)
    ckpt["model"]["renamed"] = ckpt["model"].popitem()[1]
    torch.save(ckpt, stale)
    width_flag, width = ("--base-ch", "12") if name == "ddpm_cifar_cfg" else ("--width", "48")
    cases = [
        (["--ckpt", str(tmp_path / "missing.pt")], f"no checkpoint at {tmp_path / 'missing.pt'}"),
        (["--ckpt", str(truncated)], f"{truncated} is not a readable checkpoint"),
        (["--ckpt", str(foreign)], f"{foreign} was not written by {name}.py"),
        (["--ckpt", str(stale)], f"{stale} holds the network of another version of {name}.py"),
        ([width_flag, width], f"was trained with {width_flag} "),
    ]
    for extra, message in cases:
        for mode in ("--sample-only", "--resume"):
            capsys.readouterr()
            code, out, err = run_main(module, flags + extra + [mode], capsys)
            assert code == 2 and err.count("\n") == 1 and message in err, (mode, err)
    assert f"pass {width_flag} " in err


@pytest.mark.parametrize("name", ["ddpm_cifar_cfg", "flow_dit_mnist_cfg"])  # the toy: cat_run
def test_training_loop_uses_the_ema_warm_up(name, tmp_path, monkeypatch):
    module = MODULES[name]
    skip_experiments(module, monkeypatch)
    decays, real_update = [], module.update_ema

    def spy(ema, model, decay):
        decays.append(decay)
        real_update(ema, model, decay)

    monkeypatch.setattr(module, "update_ema", spy)
    flags = ["--max-steps", "3", "--ema-decay", "0.6", "--out-dir", str(tmp_path)]
    module.main(TINY[name] + epochs(name, 1) + flags)
    assert decays == [0, 0.5, 0.6], "the running mean step / (step + 1), capped at --ema-decay"


def read_only_folder(tmp_path):
    """A folder this process cannot write to: chmod 555 (root ignores that, so /sys then)."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            (candidate / "probe").write_text("")
        except OSError:
            return candidate
    pytest.skip("no read-only folder on this machine")


@pytest.mark.parametrize("name", SCRIPTS)
def test_unwritable_outputs_exit_2_before_data_or_model(name, tmp_path, capsys, monkeypatch):
    module = MODULES[name]

    def untouchable(*args, **kwargs):
        raise AssertionError("data or model touched before the output paths were checked")

    monkeypatch.setattr(module, "build_model", untouchable)
    if hasattr(module, "load_dataset"):
        monkeypatch.setattr(module, "load_dataset", untouchable)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [
        (["--out-dir", str(a_file)], f"--out-dir {a_file} is a file, not a folder"),
        (["--out-dir", str(a_file / "sub")], f"cannot create --out-dir {a_file / 'sub'}"),
        (["--out-dir", str(tmp_path / "out"), "--ckpt", str(tmp_path / "missing" / "ckpt.pt")],
         f"the folder {tmp_path / 'missing'} does not exist"),
        (["--out-dir", str(read_only_folder(tmp_path))], "cannot write to"),
    ]  # fmt: skip
    for flags, message in cases:
        code, out, err = run_main(module, TINY[name] + flags, capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, (flags, err)


@pytest.mark.parametrize("name", ["ddpm_cifar_cfg", "flow_dit_mnist_cfg"])  # the toy: its section
def test_compile_also_compiles_the_sampling_model(name, tmp_path, monkeypatch, capsys):
    """With --compile, sampling (figures, --sample-only, --eval) runs a compiled EMA model."""
    module = MODULES[name]
    skip_experiments(module, monkeypatch)
    flags = TINY[name] + ["--max-steps", "1", "--out-dir", str(tmp_path)]
    module.main(flags)
    compiled, sampled = [], []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or m)
    monkeypatch.setattr(module, "run_experiments",
                        lambda *a, **k: sampled.extend(m for m in a if m in compiled))  # fmt: skip
    code, out, err = run_main(module, flags + ["--sample-only", "--compile"], capsys)
    assert code == 0, err
    ema = torch.load(tmp_path / "ckpt.pt", weights_only=True)["ema"]

    def is_ema(m):
        return all(torch.equal(value, ema[key]) for key, value in m.state_dict().items())

    assert any(is_ema(m) for m in sampled), "the experiments sample with the compiled EMA"


TORCHRUN_WRAPPER = """
import os, sys, torch
sys.path.insert(0, {here!r})
import {name} as module
shards, emas = [], []
real_batches, real_update = module.epoch_batches, module.update_ema

def recording_batches(*args, **kwargs):
    batches = real_batches(*args, **kwargs)
    shards.append(torch.cat(batches).tolist())
    return batches

def recording_update(ema, model, decay):
    emas[:] = [ema]
    real_update(ema, model, decay)

module.epoch_batches, module.update_ema = recording_batches, recording_update
model = module.main(sys.argv[1:])
torch.save({{"model": model.state_dict(), "ema": emas[0].state_dict(), "shards": shards}},
           os.path.join({out!r}, "rank" + os.environ["RANK"] + ".pt"))
"""


def start_torchrun(name, out_dir):
    """Two ranks (gloo on the CPU) of a tiny run, each saving its weights, EMA and shards."""
    wrapper = out_dir / "rank.py"
    wrapper.write_text(TORCHRUN_WRAPPER.format(here=str(HERE), name=name, out=str(out_dir)))
    flags = TINY[name] + ["--epochs", "2", "--synthetic-size", "32", "--max-steps", "5",
                          "--out-dir", str(out_dir / "out")]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(wrapper), *flags]  # fmt: skip
    return start(cmd, out_dir, cwd=out_dir)


@pytest.mark.parametrize("name", ["ddpm_cifar_cfg", "flow_dit_mnist_cfg"])
def test_torchrun_two_ranks_disjoint_shards_identical_weights_and_ema(name, background_runs):
    test = "test_torchrun_two_ranks_disjoint_shards_identical_weights_and_ema"
    proc, tmp_path = background_runs[test, name].result()
    stdout, stderr = output(tmp_path)
    assert proc.returncode == 0, stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    assert len(rank0["shards"]) == 2, "two epochs"
    for shard0, shard1 in zip(rank0["shards"], rank1["shards"], strict=True):
        assert len(shard0) == len(shard1) == 16 and not set(shard0) & set(shard1)
    assert any((v != 0).any() for v in rank0["model"].values())
    for part in ("model", "ema"):
        for key, value in rank0[part].items():
            assert torch.equal(value, rank1[part][key]), (part, key)
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 5
    for key, value in ckpt["ema"].items():
        assert torch.equal(value, rank0["ema"][key]), key
    assert stdout.count("done: 5 steps") == 1, "only rank 0 prints"


class CountingModel(torch.nn.Module):
    """Records the batch size of every call: 2B for a guided [cond; uncond] pass, B for a plain
    conditional one. Returns zeros (any eps or velocity will do)."""

    def __init__(self, in_channels=1):
        super().__init__()
        self.batch_sizes = []
        self.class_emb = torch.nn.Embedding(11, 4)  # the DDPM interface
        self.stem = torch.nn.Conv2d(in_channels, 1, 1)

    def forward(self, x, t, *args, **kwargs):
        self.batch_sizes.append(len(x))
        return torch.zeros_like(x)


@pytest.mark.parametrize("name", SCRIPTS)
def test_guidance_interval_guides_only_inside_it(name):
    """Guidance interval (Kynkaanniemi et al. 2024): guided passes only at noise levels inside
    [lo, hi]; plain conditional passes (half the batch) elsewhere; (0, 1) guides every step."""
    model, B = CountingModel(), 3
    if name == "flow_dit_mnist_cfg":  # Euler at t = 1, 0.75, 0.5, 0.25

        def run(interval):
            y, noise = torch.zeros(B, dtype=torch.long), torch.randn(B, 1, 28, 28)
            flow.generate(model, y, 3.0, noise, steps=4, interval=interval)

    elif name == "ddpm_cifar_cfg":  # DDIM at t / T = 0.999, 0.666, 0.333, 0

        def run(interval):
            a, emb = (
                ddpm.make_alphas_cumprod("cosine", 1000),
                model.class_emb(torch.zeros(B).long()),
            )
            ddpm.ddim_sample(model, emb, torch.randn(B, 1, 32, 32), 3.0, a, 4, interval=interval)

    else:

        def run(interval):
            tokens, null = (
                cat.tokenize(["a red circle at the top left"] * B, cat.MAX_LEN),
                cat.tokenize([""], cat.MAX_LEN),
            )
            abar, noise = cat.cosine_alphas_cumprod(1000), torch.randn(B, 3, 16, 16)
            cat.ddim_sample(model, tokens, null, noise, 3.0, abar, 4, interval=interval)

    run((0.3, 0.8))
    assert model.batch_sizes == [B, 2 * B, 2 * B, B]
    model.batch_sizes.clear()
    run((0.0, 1.0))
    assert model.batch_sizes == [2 * B] * 4


ARCH_FLAG_NAMES = {"ddpm_cifar_cfg": "--base-ch", "flow_dit_mnist_cfg": "--width",
                   "cross_attention_toy": "--width"}  # fmt: skip


@pytest.mark.parametrize("name", SCRIPTS)
def test_checkpoint_knows_its_architecture(name, tmp_path, monkeypatch, capsys):
    """--sample-only and --resume take the architecture flags from the checkpoint, as nanoGPT
    does with model_args: after training with tiny widths, no flag needs repeating."""
    module = MODULES[name]
    skip_experiments(module, monkeypatch)
    module.main(TINY[name] + ["--max-steps", "2", "--out-dir", str(tmp_path)])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    system = ["--device", "cpu", "--out-dir", str(tmp_path)]
    model = module.main(system + ["--sample-only"])  # no architecture flag given
    for key, value in ckpt["model"].items():
        assert torch.equal(model.state_dict()[key], value), key
    flag = ARCH_FLAG_NAMES[name]
    same = [flag, str(ckpt["model_args"][flag[2:].replace("-", "_")])]
    assert run_main(module, system + same + ["--sample-only"], capsys)[0] == 0, "agreeing: fine"
