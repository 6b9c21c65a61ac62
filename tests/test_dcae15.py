"""DC-AE 1.5: channel prefixes (encode, decode, gradients, tiling), DC-Gen and diffusers layouts, prefix sampling,
structured-latent training (resume, DDP, recipes), per-prefix evaluation and scaling files."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dcae_train import cli
from dcae_train.config import compose, recipe_names, to_config
from dcae_train.evaluate import main as evaluate_main
from dcae_train.latent_stats import run as latent_stats_main
from dcae_train.models import DCAE, build_model, variant_config
from dcae_train.training.config import LatentPrefixConfig
from dcae_train.training.prefixes import sample_prefixes
from dcae_train.weights import diffusers_to_original, export_diffusers, export_original, load_model

RECIPES_15 = [r for r in recipe_names() if "-1.5" in r or r == "dc-ae-f32c128-1.1"]


def random_15(name: str = "tiny-1.5", seed: int = 0) -> DCAE:
    torch.manual_seed(seed)
    config = variant_config(name) if name == "tiny-1.5" else variant_config(name).scaled(0.125, scale_latent=True)
    model = DCAE(config).eval()
    with torch.no_grad():  # away from the init, so that prefixes differ visibly from the full latent
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def images(b: int = 2, size: int = 64) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


# Prefixes ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-1.5", "dc-ae-f32c128-1.5"])
def test_prefix_encode_is_slicing_and_prefix_decode_is_zero_padding(name):
    model = random_15(name)
    x = images(size=64)
    c_lat = model.latent_channels
    with torch.no_grad():
        z = model.encode(x)
        for c in (1, c_lat // 4, c_lat // 2, c_lat):
            zc = model.encode(x, latent_channels=c)
            assert zc.shape[1] == c
            torch.testing.assert_close(zc, z[:, :c], atol=1e-6, rtol=0)
            padded = torch.cat([zc, zc.new_zeros(zc.shape[0], c_lat - c, *zc.shape[2:])], dim=1)
            torch.testing.assert_close(model.decode(zc), model.decode(padded), atol=1e-6, rtol=0)
        assert not torch.allclose(model.decode(z[:, :4]), model.decode(z), atol=1e-3)  # prefixes do differ


def test_a_list_of_prefixes_shares_one_encoder_body_pass(monkeypatch):
    model, calls = random_15(), []
    body = model.encoder.forward_body
    monkeypatch.setattr(model.encoder, "forward_body", lambda x: calls.append(1) or body(x))
    with torch.no_grad():
        zs = model.encode(images(), latent_channels=[4, 8, 16])
    assert [z.shape[1] for z in zs] == [4, 8, 16] and len(calls) == 1


def test_prefixes_need_a_variant_without_a_latent_shortcut():
    tiny, x = build_model("tiny"), images()
    with pytest.raises(ValueError, match="shortcut around the latent.*DC-AE 1.5"):
        tiny.encode(x, latent_channels=4)
    with pytest.raises(ValueError, match=r"expected latents \(B, 8, h, w\), got"):
        tiny.decode(torch.zeros(1, 4, 8, 8))
    model = random_15()
    for bad in (0, 17, [4, 32], 2.5):
        with pytest.raises(ValueError, match="each prefix must be an int in 1..16"):
            model.encode(x, latent_channels=bad)
    with pytest.raises(ValueError, match=r"or a prefix \(B, 1..16, h, w\)"):
        model.decode(torch.zeros(1, 17, 8, 8))


def test_gradients_reach_only_the_rows_and_columns_a_prefix_uses():
    model, c = random_15().train(), 5
    model.decode(model.encode(images(), latent_channels=c)).square().mean().backward()
    w_out, b_out = model.encoder.conv_out.weight.grad, model.encoder.conv_out.bias.grad
    w_in = model.decoder.conv_in.weight.grad
    assert w_out[c:].abs().sum() == 0 and b_out[c:].abs().sum() == 0 and w_out[:c].abs().sum() > 0
    assert w_in[:, c:].abs().sum() == 0 and w_in[:, :c].abs().sum() > 0
    assert model.decoder.conv_in.bias.grad.abs().sum() > 0  # the full bias: zero-padding keeps it


def test_tiled_encode_and_decode_take_prefixes():
    model, x = random_15(), images(1, 96)
    with torch.no_grad():
        full = model.tiled_encode(x, tile=64, overlap=16)
        z6 = model.tiled_encode(x, tile=64, overlap=16, latent_channels=6)
        torch.testing.assert_close(z6, full[:, :6], atol=1e-5, rtol=1e-5)  # tiles blend: a little more round-off
        padded = torch.cat([z6, torch.zeros(1, 10, *z6.shape[2:])], dim=1)
        torch.testing.assert_close(
            model.tiled_decode(z6, tile=64, overlap=16),
            model.tiled_decode(padded, tile=64, overlap=16),
            atol=1e-6,
            rtol=0,
        )


# Weights -----------------------------------------------------------------------------------------------------
def test_dcgen_layout_round_trips_bitwise(tmp_path):
    model = random_15("dc-ae-f32c128-1.5")
    original = {k: v.contiguous() for k, v in diffusers_to_original(model.state_dict(), model.config).items()}
    assert "encoder.project_out.op_list.0.conv.weight" in original and "decoder.project_in.conv.weight" in original
    path = tmp_path / "dcgen" / "model.safetensors"
    path.parent.mkdir()
    save_file(original, str(path))
    (path.parent / "config.json").write_text(json.dumps({"model_name": "dc-ae-f32c128-1.5"}))  # as DC-Gen's repos
    loaded = load_model(path)
    assert loaded.config == model.config and loaded.variant is None  # 1/8 width: the family, not the release
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    (path.parent / "config.json").unlink()  # without a name, the shapes decide (1.1 and 1.5 are the same network)
    assert load_model(path).config == model.config
    again = load_file(str(export_original(loaded, tmp_path / "back")))
    assert again.keys() == original.keys() and all(torch.equal(again[k], v) for k, v in original.items())


def test_diffusers_export_loads_and_gives_the_full_channel_outputs(tmp_path):
    from diffusers import AutoencoderDC

    model = random_15("dc-ae-f32c128-1.5")
    ref = AutoencoderDC.from_pretrained(export_diffusers(model, tmp_path / "d"), output_loading_info=True)
    ref, info = ref
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    x = images(1, 128)
    with torch.no_grad():
        z = ref.eval().encode(x).latent
        torch.testing.assert_close(z, model.encode(x), atol=1e-5, rtol=1e-5)  # latents reach |z| ~ 2 here
        torch.testing.assert_close(ref.decode(z).sample, model.decode(z), atol=1e-5, rtol=0)
        torch.testing.assert_close(ref(x).sample, model(x), atol=1e-5, rtol=0)
        # A prefix in diffusers: slice the latent after encode, zero-pad it before decode (docs/weights.md).
        padded = torch.cat([z[:, :4], torch.zeros_like(z[:, 4:])], dim=1)
        torch.testing.assert_close(ref.decode(padded).sample, model.decode(model.encode(x, latent_channels=4)),
                                   atol=1e-5, rtol=1e-5)  # fmt: skip


# Prefix sampling ---------------------------------------------------------------------------------------------
def test_prefix_draws_follow_dcgen_options_and_depend_only_on_seed_step_rank():
    c = [4, 8, 12, 16]
    assert sample_prefixes(LatentPrefixConfig(), seed=0, step=3, rank=0) is None
    one = LatentPrefixConfig(channels=c)
    draws = [sample_prefixes(one, seed=0, step=s, rank=0) for s in range(40)]
    assert all(len(d) == 1 and d[0] in c for d in draws) and len({d[0] for d in draws}) == 4
    assert draws == [sample_prefixes(one, seed=0, step=s, rank=0) for s in range(40)]  # a resume draws the same
    assert draws != [sample_prefixes(one, seed=0, step=s, rank=1) for s in range(40)]  # ranks draw differently
    full = sample_prefixes(LatentPrefixConfig(channels=c, samples=3, always_full=True), seed=1, step=0, rank=0)
    assert full[0] == 16 and len(full) == 3
    mm = sample_prefixes(LatentPrefixConfig(channels=c, samples=3, always_min_max=True), seed=1, step=0, rank=0)
    assert mm[:2] == [4, 16] and len(mm) == 3
    with pytest.raises(ValueError, match="always_full=True: needs .*samples >= 2"):
        LatentPrefixConfig(channels=c, always_full=True)


# Training ----------------------------------------------------------------------------------------------------
SMALL = ["data=demo", "data.num_workers=0", "validate_at_start=false", "logger=csv", "evaluation.every=0",
         "perceptual.allow_download=false"]  # fmt: skip
PHASE = ("resolution=64", "batch_size=2", "log_every=1", "val_every=100", "image_every=100")


def _train(runs: Path, *overrides: str) -> int:
    p1 = [f"phases.p1.{o}" for o in PHASE]
    return cli.main([f"runs_dir={runs}", "recipe=quickstart-1.5", *SMALL, *p1, *overrides])


def _losses(run: Path) -> dict[int, float]:
    with open(run / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["train/loss_total"]) for r in csv.DictReader(f) if r.get("train/loss_total")}


RESUME = ("phases.p1.max_steps=4", "phases.p1.ckpt_every=2", "data.epoch_batches=2", "trainer.deterministic=true")


def test_killed_and_resumed_run_draws_the_same_prefixes_and_reproduces_the_losses(tmp_path):
    # Killed after step 3, resumed from the step-2 checkpoint (an epoch boundary: mid-epoch data resume is issue 15's).
    assert _train(tmp_path / "ref", *RESUME) == 0
    env = {**os.environ, "WANDB_MODE": "disabled", "DCAE_TRAIN_FAULTS": "kill@3"}
    env.pop("DCAE_TRAIN_RESOLVED", None)
    p1 = [f"phases.p1.{o}" for o in PHASE]
    args = [sys.executable, "-m", "dcae_train", f"runs_dir={tmp_path / 'cut'}", "recipe=quickstart-1.5", *SMALL, *p1]
    killed = subprocess.run([*args, *RESUME], env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert _train(tmp_path / "cut", *RESUME, "resume=auto") == 0
    (ref,), (cut,) = ((tmp_path / r / "quickstart-1.5" / "phase1").iterdir() for r in ("ref", "cut"))
    want, got = _losses(ref), _losses(cut)
    assert {2, 3} <= set(got)  # (rows before a resume are not kept yet: issue 15)
    assert all(got[s] == pytest.approx(want[s], rel=1e-6) for s in (2, 3)), (want, got)


def test_prefix_training_with_checkpointing_and_bf16_autocast():
    model = random_15().train()
    x, prefixes = images(), [4, 16]
    losses = []
    for checkpointing in (False, True):
        model.set_gradient_checkpointing(checkpointing)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            zs, x_hats = model.reconstruct(x, prefixes)
        assert [z.shape[1] for z in zs] == prefixes
        loss = torch.stack([(x_hat.float() - x).abs().mean() for x_hat in x_hats]).mean()
        loss.backward()
        losses.append((loss.item(), model.encoder.conv_out.weight.grad.clone()))
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-3)
    torch.testing.assert_close(losses[0][1], losses[1][1], atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("recipe", RECIPES_15)
def test_every_15_recipe_composes_and_steps_with_tiny_15(tmp_path, recipe):
    for phase in (1, 2, 3):
        to_config(compose([f"recipe={recipe}", f"phase={phase}", "data=demo"]))
    tiny = ["model=tiny-1.5", "evaluation.latent_channels=[8,16]", "phases.p1.max_steps=1"]
    if recipe != "dc-ae-f32c128-1.1":
        tiny.append("phases.p1.latent_prefixes.channels=[4,8,16]")
    args = [f"runs_dir={tmp_path}", f"recipe={recipe}", "debug=smoke", *SMALL, *tiny]
    assert cli.main(args) == 0


def test_ddp_ranks_train_different_prefixes(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONHASHSEED": "0"}
    env.pop("DCAE_TRAIN_RESOLVED", None)
    ddp = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "phases.p1.max_steps=2"]
    p1 = [f"phases.p1.{o}" for o in PHASE]
    args = [sys.executable, "-m", "dcae_train", f"runs_dir={tmp_path}", "recipe=quickstart-1.5", *SMALL, *p1, *ddp]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "quickstart-1.5" / "phase1").iterdir()
    final = torch.load(run / "checkpoints" / "final.ckpt", weights_only=True, map_location="cpu")
    assert final["global_step"] == 2
    cfg = LatentPrefixConfig(channels=[4, 8, 12, 16], samples=2, always_full=True)
    draws = [[sample_prefixes(cfg, seed=0, step=s, rank=r) for s in (0, 1)] for r in (0, 1)]
    assert draws[0] != draws[1], "the two ranks trained on different prefixes"


# Evaluation --------------------------------------------------------------------------------------------------
EVAL_FLAGS = ["--lpips", "random", "--fid", "tiny", "--num-workers", "0", "--no-progress", "--resolution", "64"]


@pytest.fixture(scope="module")
def demo_val(tmp_path_factory):
    from dcae_train.data.demo import demo_shards

    return demo_shards(tmp_path_factory.mktemp("demo"))["val"]


def test_evaluate_reports_every_prefix(tmp_path, demo_val):
    out = tmp_path / "eval"
    flags = ["--model", "tiny-1.5", "--random-init", "--data", demo_val, "--batch-size", "8", "--num-images", "8"]
    evaluate_main(
        [*flags, *EVAL_FLAGS, "--latent-channels", "4,8,16", "--stats-cache", str(tmp_path), "--out", str(out)]
    )
    result = json.loads((out / "eval.json").read_text())
    assert [p["latent_channels"] for p in result["prefixes"]] == [4, 8, 16]
    assert result["prefixes"][-1]["psnr"] == pytest.approx(result["metrics"]["psnr"], abs=1e-6)  # 16 = all of them
    assert all(np.isfinite(p["rfid"]) for p in result["prefixes"])
    assert "| latent channels |" in (out / "eval.md").read_text() and (out / "prefixes.png").stat().st_size > 0
    assert (
        evaluate_main(["--model", "tiny", "--random-init", "--data", demo_val, *EVAL_FLAGS, "--latent-channels", "4"])
        == 2
    )


def test_latent_stats_per_prefix_and_the_per_channel_scaling_file(tmp_path, demo_val):
    scaling = tmp_path / "scaling.npy"
    flags = ["--model", "tiny-1.5", "--random-init", "--data", demo_val, "--resolution", "64", "--num-workers", "0"]
    stats = latent_stats_main([*flags, "--no-progress", "--out", str(tmp_path / "s.json"), "--latent-channels",
                               "4,16", "--scaling-file", str(scaling)])  # fmt: skip
    rms = np.asarray(stats["per_channel_rms"])
    assert np.allclose(np.load(scaling), 1 / rms, rtol=1e-6) and np.load(scaling).dtype == np.float32
    factors = stats["prefix_scaling_factors"]
    assert factors["16"] == pytest.approx(stats["scaling_factor"], rel=1e-9)
    assert factors["4"] == pytest.approx(1 / np.sqrt((rms[:4] ** 2).mean()), rel=1e-9)
