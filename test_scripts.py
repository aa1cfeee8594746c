"""Tests for the three scripts: python -m pytest test_scripts.py

Everything runs on the CPU in about two minutes: models are shrunk through the scripts' own width
flags, data is the scripts' built-in synthetic data (nothing is downloaded), and the end-to-end
tests run the real command lines in subprocesses.
"""

import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch

import ddpm_cifar_cfg as ddpm

HERE = Path(__file__).resolve().parent

# Tiny models through each script's own flags: seconds per run on a CPU.
TINY = {
    "ddpm_cifar_cfg": [
        "--dataset", "synthetic", "--synthetic-size", "48", "--base-ch", "8", "--ch-mult", "1,2",
        "--num-res-blocks", "1", "--attn-res", "16", "--attn-heads", "2", "--cond-dim", "16",
        "--batch-size", "8", "--sample-steps", "2", "--grid-rows", "1", "--device", "cpu",
        "--log-every", "2",
    ],
}  # fmt: skip
MODULES = {"ddpm_cifar_cfg": ddpm}


def run_script(name, *flags, timeout=120):
    """Run a script as a user would, in a subprocess; returns the CompletedProcess."""
    cmd = [sys.executable, str(HERE / f"{name}.py"), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE)


def run_main(module, argv, capsys):
    """Run main(argv) in-process and return (exit code, stdout, stderr)."""
    try:
        module.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


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
    args = tiny_ddpm("--lr", "2e-3", "--dropout", "0")
    torch.manual_seed(0)
    model = ddpm.build_model(args)
    ema = ddpm.build_model(args).requires_grad_(False)
    images, labels = ddpm.make_synthetic(16, seed=0)
    x0, y = ddpm.get_batch(images, labels, torch.arange(16), False, torch.contiguous_format)
    ac = ddpm.make_alphas_cumprod("cosine", 1000)
    loss_fn = partial(ddpm.diffusion_loss, alphas_cumprod=ac, p_uncond=0.15)

    def fixed_loss():  # the same t, noise and dropped labels every time
        torch.manual_seed(123)
        with torch.no_grad():
            return loss_fn(model, x0, y).item()

    optimizer = ddpm.make_optimizer(model, args.lr, 0.0, torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before = fixed_loss()
    for _ in range(30):
        ddpm.train_step(model, ema, optimizer, scheduler, scaler, ddpm.contextlib.nullcontext(),
                        x0, y, 0.99, 1.0, loss_fn)  # fmt: skip
    after = fixed_loss()
    assert before > 0.9, "the zero-initialised output layer predicts eps = 0: loss ~ 1 at start"
    assert after < 0.6 * before, f"loss went from {before:.3f} to only {after:.3f}"


def test_ddpm_end_to_end_then_sample_only(tmp_path):
    out = tmp_path / "run"
    r = run_script("ddpm_cifar_cfg", *TINY["ddpm_cifar_cfg"], "--epochs", "1", "--max-steps", "3",
                   "--out-dir", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (out / "ckpt.pt").is_file() and (out / "loss.png").is_file()
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and len(ckpt["losses"]) == 3
    figures = ["class_grid.png", "guidance_sweep.png", "interpolation.png", "ema_vs_raw.png"]
    for name in figures:
        (out / name).unlink()
    r = run_script("ddpm_cifar_cfg", *TINY["ddpm_cifar_cfg"], "--sample-only", "--ckpt",
                   str(out / "ckpt.pt"), "--out-dir", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    for name in figures:
        assert (out / name).stat().st_size > 1000, name


def test_ddpm_bad_flag_subprocess():
    r = run_script("ddpm_cifar_cfg", "--p-uncond", "1.5")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "ddpm_cifar_cfg.py: error: argument --p-uncond: expected a probability in [0, 1], got '1.5'"
    )


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
        with ddpm.autocast_context(torch.device("cpu"), torch.float32):
            losses.append(ddpm.diffusion_loss(model, x0, y, ac, 0.15).item())
    assert losses[0] > 0
    assert abs(losses[0] - losses[1]) <= 1e-5 * losses[0], losses


def test_ddpm_epoch_batches_cover_every_index_once():
    batches = ddpm.epoch_batches(103, 10, epoch=3, seed=0)
    assert [len(b) for b in batches] == [10] * 10 + [3]
    assert torch.cat(batches).sort().values.tolist() == list(range(103))
    other = ddpm.epoch_batches(103, 10, epoch=4, seed=0)
    assert not torch.equal(torch.cat(batches), torch.cat(other)), "a new order each epoch"
    shards = [torch.cat(ddpm.epoch_batches(103, 5, 3, 0, rank, 2)) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 51
    assert not set(shards[0].tolist()) & set(shards[1].tolist()), "ranks see disjoint shards"


def test_ddpm_bench_prints_table(capsys):
    flags = TINY["ddpm_cifar_cfg"] + ["--bench", "--bench-steps", "1", "--bench-samples", "4"]
    code, out, err = run_main(ddpm, flags, capsys)
    assert code == 0, err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("variant"))
    fast, plain = lines[header + 2].split(), lines[header + 3].split()
    assert fast[0] == "fast" and plain[0] == "plain"
    assert all(float(v) > 0 for v in fast[1:7] + plain[1:7]), out
    assert "speed-up fast / plain: training" in out
    # on the CPU both variants run in fp32 (NHWC vs NCHW): the same loss to float rounding
    parity = out.split("mean relative difference ")[1]
    assert float(parity.split(",")[0]) < 1e-5 and float(parity.split("max ")[1]) < 1e-5, out


# -----------------------------------------------------------------------------
# Robustness, shared by the image scripts: resume, crash safety, interrupts, bad input


@pytest.mark.parametrize("name", ["ddpm_cifar_cfg"])
def test_resume_is_exact(name, tmp_path, capsys):
    module = MODULES[name]
    flags = TINY[name] + ["--epochs", "2"]
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
    """A training run that saves a checkpoint every epoch (a few steps) and would run for long."""
    flags = TINY[name] + ["--synthetic-size", "16", "--epochs", "100000", "--out-dir", str(out_dir)]
    return subprocess.Popen([sys.executable, str(HERE / f"{name}.py"), *flags], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.mark.parametrize("name", ["ddpm_cifar_cfg"])
def test_kill_during_saves_leaves_a_loadable_checkpoint(name, tmp_path):
    proc = start_long_run(name, tmp_path)
    try:
        wait_for(tmp_path / "ckpt.pt")
        time.sleep(1.5)  # several more saves: the kill lands during or between them
    finally:
        proc.kill()
        proc.communicate()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] > 0 and ckpt["script"] == name


@pytest.mark.parametrize("name", ["ddpm_cifar_cfg"])
def test_ctrl_c_saves_and_exits_cleanly(name, tmp_path):
    proc = start_long_run(name, tmp_path)
    try:
        wait_for(tmp_path / "ckpt.pt")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    step = torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"]
    assert f"interrupted at step {step}: saved {tmp_path / 'ckpt.pt'}" in out


@pytest.mark.parametrize("name", ["ddpm_cifar_cfg"])
def test_nonfinite_loss_stops_without_overwriting(name, tmp_path, capsys, monkeypatch):
    module = MODULES[name]
    flags = TINY[name] + ["--epochs", "3", "--out-dir", str(tmp_path)]
    module.main(flags + ["--max-steps", "6"])
    calls = []
    loss_fn = module.diffusion_loss if name == "ddpm_cifar_cfg" else module.flow_matching_loss

    def exploding_loss(*a, **k):  # finite for two steps, then NaN
        calls.append(1)
        return loss_fn(*a, **k) * (float("nan") if len(calls) > 2 else 1.0)

    monkeypatch.setattr(module, loss_fn.__name__, exploding_loss)
    capsys.readouterr()
    code, out, err = run_main(module, flags + ["--resume"], capsys)
    assert code == 1
    assert "loss became non-finite at step 9; stopped without saving" in err
    assert f"{tmp_path / 'ckpt.pt'} still holds step 6" in err
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 6


def test_torchrun_two_ranks_identical_weights(tmp_path):
    name = "ddpm_cifar_cfg"
    wrapper = tmp_path / "rank.py"
    wrapper.write_text(
        "import os, sys, torch\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        f"import {name}\n"
        f"model = {name}.main(sys.argv[1:])\n"
        f"torch.save(model.state_dict(), os.path.join({str(tmp_path)!r}, "
        "f\"rank{os.environ['RANK']}.pt\"))\n"
    )
    flags = TINY[name] + ["--max-steps", "3", "--out-dir", str(tmp_path / "out")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(wrapper), *flags]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    assert any((v != 0).any() for v in rank0.values())
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), key
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and len(ckpt["rng"]) == 2
    assert r.stdout.count("done: 3 steps") == 1, "only rank 0 prints"


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
        (["--sample-only", "--resume"], "choose at most one of --sample-only, --resume"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
}


@pytest.mark.parametrize(
    "name,flags,message", [(n, f, m) for n, cases in BAD_FLAGS.items() for f, m in cases]
)
def test_bad_flags_exit_2_with_one_line(name, flags, message, capsys):
    code, out, err = run_main(MODULES[name], flags, capsys)
    assert code == 2
    assert err.count("\n") == 1 and f"{name}.py: error: {message}" in err, err


@pytest.mark.parametrize("name", ["ddpm_cifar_cfg"])
def test_bad_checkpoints_exit_2_with_one_line(name, tmp_path, capsys):
    module = MODULES[name]
    flags = TINY[name] + ["--out-dir", str(tmp_path)]
    module.main(flags + ["--max-steps", "1"])
    good = tmp_path / "ckpt.pt"
    truncated, foreign = tmp_path / "truncated.pt", tmp_path / "foreign.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    torch.save({"model": {}}, foreign)
    width_flag, width = ("--base-ch", "12") if name == "ddpm_cifar_cfg" else ("--width", "48")
    cases = [
        (["--ckpt", str(tmp_path / "missing.pt")], f"no checkpoint at {tmp_path / 'missing.pt'}"),
        (["--ckpt", str(truncated)], f"{truncated} is not a readable checkpoint"),
        (["--ckpt", str(foreign)], f"{foreign} was not written by {name}.py"),
        ([width_flag, width], f"was trained with {width_flag} "),
    ]
    for extra, message in cases:
        for mode in ("--sample-only", "--resume"):
            capsys.readouterr()
            code, out, err = run_main(module, flags + extra + [mode], capsys)
            assert code == 2 and err.count("\n") == 1 and message in err, (mode, err)
    assert f"pass {width_flag} " in err
