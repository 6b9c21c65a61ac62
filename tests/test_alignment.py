"""Alignment with a foundation model: the DINOv2 wrapper (frozen, eval, no graph, weights through the registry),
VA-VAE's VF loss (zero where it should be, gradients where they should go, adaptive weight), and the VF recipe."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from dcae_train import cli
from dcae_train.losses import AutoencoderLoss, LossConfig
from dcae_train.losses.alignment import VFLoss, vf_terms
from dcae_train.losses.config import FoundationConfig, VFConfig
from dcae_train.losses.foundation import FoundationModel
from dcae_train.models import build_model
from dcae_train.pretrained import DINOV2, resolve_unpinned
from dcae_train.schema import ConfigError

SMOKE = ["debug=smoke", "data=demo", "data.num_workers=0"]
RECIPE = "dc-ae-f32c32-sana-1.1-vf"


@pytest.fixture(scope="module")
def vf_loss() -> AutoencoderLoss:
    """An L1 + VF loss on a random ViT-S (built once: ~2 s)."""
    cfg = LossConfig(lpips=0.0, vf=VFConfig(weight=0.1))
    return AutoencoderLoss(
        cfg, foundation=FoundationConfig(model="dinov2-vits14"), latent_channels=8, foundation_pretrained=False
    )


def _images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size) * 2 - 1


# The foundation model ----------------------------------------------------------------------------------
def test_foundation_stays_frozen_in_eval_and_builds_no_graph(vf_loss):
    f = vf_loss.foundation
    vf_loss.train()
    f.train(True).requires_grad_(True)
    assert not f.training and not any(m.training for m in f.modules())
    assert not any(p.requires_grad for p in f.parameters())
    x = _images().requires_grad_(True)
    feats = f(x, (4, 4))
    assert feats.shape == (2, 384, 4, 4) and feats.dtype == torch.float32
    assert not feats.requires_grad and feats.grad_fn is None  # no autograd graph through it


def test_foundation_grid_resize_and_pooling(vf_loss):
    f = vf_loss.foundation
    assert f(_images(1), (3, 5)).shape == (1, 384, 3, 5)  # resized to 42 x 70 px: the token grid is the latent grid
    f.input_size = 56  # 4 x 4 tokens, pooled to 2 x 2
    try:
        assert f(_images(1), (2, 2)).shape == (1, 384, 2, 2)
    finally:
        f.input_size = None
    with pytest.raises(ValueError, match="RGB"):
        f(torch.zeros(1, 4, 8, 8), (1, 1))


def test_missing_weights_name_the_file_and_folders(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError) as err:
        FoundationModel("dinov2-vitl14-reg")  # fails before any network build
    msg = str(err.value)
    assert "dinov2_vitl14_reg4_pretrain.pth" in msg and str(tmp_path / "torch") in msg and str(tmp_path / "hf") in msg
    assert "timm/vit_large_patch14_reg4_dinov2.lvd142m" in msg and "foundation.require_pretrained=false" in msg


def test_hf_cache_blob_is_checked_against_its_content_address(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    spec = DINOV2["dinov2-vits14"]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    repo = tmp_path / "hf" / f"models--{spec.hf_repo.replace('/', '--')}"
    data = b"weights"
    digest = hashlib.sha256(data).hexdigest()
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "blobs" / digest).write_bytes(data)
    os.symlink(repo / "blobs" / digest, repo / "snapshots" / "abc123" / spec.hf_file)
    path, got = resolve_unpinned(spec)
    assert got == digest and path.name == spec.hf_file
    with pytest.raises(ValueError, match="not the pinned"):
        resolve_unpinned(spec, sha256_pin="deadbeef")
    (repo / "blobs" / digest).write_bytes(b"corrupt")
    with pytest.raises(ValueError, match="corrupt"):
        resolve_unpinned(spec)


def test_meta_checkpoint_loads_through_the_registry(tmp_path, vf_loss):
    """Meta's layout (a `mask_token` key) is converted by timm; the file's digest is recorded and a pin checked."""
    state = {k: torch.randn_like(v) for k, v in vf_loss.foundation.vit.state_dict().items()}
    file = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save({**state, "mask_token": torch.zeros(1, 384)}, file)
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    f = FoundationModel("dinov2-vits14", path=file, sha256=digest[:8])
    assert f.pretrained and f.digest == digest
    assert all(torch.equal(v, state[k]) for k, v in f.vit.state_dict().items())
    with pytest.raises(ValueError, match="pinned"):
        FoundationModel("dinov2-vits14", path=file, sha256="00000000")


# The VF loss --------------------------------------------------------------------------------------------
def _naive_vf(zp: torch.Tensor, f: torch.Tensor, m1: float, m2: float) -> tuple[float, float]:
    """The VF terms by loops over positions (the direct reading of VA-VAE's definition)."""
    b, _, h, w = zp.shape
    zs, fs = zp.flatten(2), f.flatten(2)
    cos = torch.nn.functional.cosine_similarity
    dist, cosv, n = 0.0, 0.0, h * w
    for k in range(b):
        for i in range(n):
            cosv += max(0.0, 1 - m1 - float(cos(zs[k, :, i], fs[k, :, i], dim=0)))
            for j in range(n):
                d = abs(float(cos(zs[k, :, i], zs[k, :, j], dim=0)) - float(cos(fs[k, :, i], fs[k, :, j], dim=0)))
                dist += max(0.0, d - m2)
    return dist / (b * n * n), cosv / (b * n)


def test_vf_terms_match_a_direct_computation_and_vanish_for_identical_features():
    zp, f = torch.randn(2, 6, 3, 3), torch.randn(2, 6, 3, 3)
    for m1, m2 in ((0.0, 0.0), (0.5, 0.25)):
        distmat, cos = vf_terms(zp, f, m1, m2)
        ref = _naive_vf(zp, f, m1, m2)
        assert torch.allclose(torch.stack([distmat, cos]), torch.tensor(ref), atol=1e-5)
    assert vf_terms(f, f, 0.0, 0.0)[0].abs() < 1e-6 and vf_terms(f, f, 0.0, 0.0)[1].abs() < 1e-6
    # Within the margins a different latent costs nothing: a small perturbation of f, and 3 f (cosines are scale-free)
    assert vf_terms(f + 0.01 * torch.randn_like(f), f, 0.5, 0.25) == (0.0, 0.0)
    assert vf_terms(3 * f, f, 0.0, 0.0)[1].abs() < 1e-6


def test_vf_loss_is_zero_when_the_projection_equals_the_features():
    vf = VFLoss(VFConfig(weight=1.0, cos_margin=0.0, distmat_margin=0.0), latent_channels=4, feature_dim=4)
    with torch.no_grad():
        vf.projector.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
    z = torch.randn(2, 4, 4, 4)
    loss, logs = vf(z, z.clone())
    assert loss.abs() < 1e-6 and logs["loss_vf_cos"].abs() < 1e-6
    assert vf(z, torch.randn(2, 4, 4, 4))[0] > 0.1


def test_vf_gradient_reaches_encoder_and_projector_only(vf_loss):
    model = build_model("tiny")
    x = _images()
    z = model.encode(x)
    loss, _ = vf_loss.vf(z, vf_loss.foundation_features(x, tuple(z.shape[-2:])))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.conv_out.parameters())
    assert vf_loss.vf.projector.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.decoder.parameters())  # the decoder gets nothing from L_VF
    assert all(p.grad is None for p in vf_loss.foundation.parameters())
    vf_loss.vf.projector.weight.grad = None


def test_adaptive_vf_weight_matches_the_gradient_ratio(vf_loss):
    model = build_model("tiny")
    x = _images()
    z = model.encode(x)
    x_hat = model.decode(z)
    w = model.encoder_last_layer()
    loss, logs = vf_loss.generator_loss(x, x_hat, step=0, z=z, encoder_last_layer=w)
    rec = (x_hat - x).abs().mean()
    vf, _ = vf_loss.vf(z, vf_loss.foundation_features(x, tuple(z.shape[-2:])))
    (g_rec,) = torch.autograd.grad(rec, w, retain_graph=True)
    (g_vf,) = torch.autograd.grad(vf, w, retain_graph=True)
    lam = g_rec.norm() / (g_vf.norm() + 1e-4)
    assert torch.allclose(logs["vf_weight"], 0.1 * lam, rtol=1e-4)
    assert torch.allclose(loss, rec + 0.1 * lam * vf, rtol=1e-5)
    with pytest.raises(ValueError, match="encoder_last_layer"):
        vf_loss.generator_loss(x, model.decode(model.encode(x)), step=0, z=model.encode(x))


def test_vf_config_rules():
    with pytest.raises(ConfigError, match="weight"):
        VFConfig(weight=-1.0)
    with pytest.raises(ConfigError, match="model"):
        FoundationConfig(model="dinov3")
    with pytest.raises(ConfigError, match="sha256"):
        FoundationConfig(sha256="xyz")


# The recipe -------------------------------------------------------------------------------------------
def _run(tmp_path: Path, *overrides: str) -> int:
    return cli.main([f"runs_dir={tmp_path / 'runs'}", *SMOKE, f"recipe={RECIPE}", *overrides])


def test_vf_recipe_saves_the_projector_and_exports_without_it(tmp_path):
    from dcae_train.weights import export_diffusers, load_model

    assert _run(tmp_path, "phase=1", "phases.p1.max_steps=1", "phases.p1.loss.lpips_net=alex") == 0
    (p1,) = (tmp_path / "runs" / RECIPE / "phase1").iterdir()
    ckpt = torch.load(p1 / "checkpoints" / "final.ckpt", weights_only=True, map_location="cpu")
    keys = ckpt["state_dict"].keys()
    assert "loss.vf.projector.weight" in keys and not any(k.startswith("loss.foundation.") for k in keys)
    assert ckpt["dcae"]["foundation"]["model"] == "dinov2-vits14" and not ckpt["dcae"]["foundation"]["pretrained"]
    assert json.loads((p1 / "run.json").read_text())["foundation"]["pretrained"] is False
    out = export_diffusers(load_model(str(p1 / "checkpoints" / "final.ckpt")), tmp_path / "export")
    from safetensors import safe_open

    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        assert not any("projector" in k or k.startswith("loss.") for k in f.keys())  # noqa: SIM118


@pytest.mark.slow
def test_vf_recipe_chains_all_three_phases(tmp_path):
    for phase in (1, 2, 3):  # phases 2 and 3 start from the previous phase (init_from=auto)
        assert _run(tmp_path, f"phase={phase}") == 0


def test_vf_in_a_phase_with_a_frozen_encoder_fails_clearly(tmp_path):
    from dcae_train.config import compose
    from dcae_train.training.run import build_run

    cfg = compose(
        [f"runs_dir={tmp_path / 'runs'}", *SMOKE, "phase=3", "init_from=tiny", "phases.p3.loss.vf.weight=0.1"]
    )
    with pytest.raises(ValueError, match="encoder's last layer"):
        build_run(cfg)


# REPA-style alignment -----------------------------------------------------------------------------------
def test_repa_loss_is_zero_for_aligned_features_and_two_for_opposite():
    from dcae_train.losses.alignment import repa_loss

    f = torch.randn(2, 6, 3, 3)
    assert repa_loss(2 * f, f).abs() < 1e-6  # cosine: scale-free
    assert repa_loss(-f, f).item() == pytest.approx(2.0)


def test_repa_gradient_reaches_the_encoder_up_to_its_stage_and_the_projector_only(vf_loss):
    from dcae_train.losses.alignment import RepaLoss
    from dcae_train.losses.config import RepaConfig

    model = build_model("tiny")
    seen = []
    model.feature_module("encoder", 1).register_forward_hook(lambda m, i, out: seen.append(out))
    x = _images()
    z = model.encode(x)
    repa = RepaLoss(RepaConfig(weight=0.5, stage=1, hidden=16), model.feature_channels("encoder", 1), 384)
    assert seen[0].shape[1] == model.feature_channels("encoder", 1)
    loss, logs = repa(seen[0], vf_loss.foundation_features(x, tuple(z.shape[-2:])))
    loss.backward()
    assert logs["loss_repa"] > 0 and all(p.grad is not None for p in repa.parameters())
    assert model.encoder.conv_in.weight.grad is not None  # before the aligned stage
    assert all(p.grad is None for p in model.encoder.conv_out.parameters())  # after it
    assert all(p.grad is None for p in model.decoder.parameters())
    assert all(p.grad is None for p in vf_loss.foundation.parameters())
    with pytest.raises(ValueError, match="stages 0.."):
        model.feature_module("decoder", 9)


def test_repa_recipe_trains_the_projector_and_a_frozen_stage_fails_clearly(tmp_path):
    overrides = ["recipe=dc-ae-f32c32-sana-1.1-repa", "phases.p1.max_steps=1", "phases.p1.loss.lpips_net=alex"]
    assert cli.main([f"runs_dir={tmp_path / 'runs'}", *SMOKE, *overrides]) == 0
    (p1,) = (tmp_path / "runs" / "dc-ae-f32c32-sana-1.1-repa" / "phase1").iterdir()
    keys = torch.load(p1 / "checkpoints" / "final.ckpt", weights_only=True, map_location="cpu")["state_dict"].keys()
    assert any(k.startswith("loss.repa.projector.") for k in keys)
    from dcae_train.config import compose
    from dcae_train.training.run import build_run

    cfg = compose([f"runs_dir={tmp_path / 'runs'}", *SMOKE, *overrides, "phases.p1.trainable=[decoder.*]"])
    with pytest.raises(ValueError, match="does not train in this phase"):
        build_run(cfg)
    with pytest.raises(ConfigError, match="phases.p1.loss.repa.stage=9"):
        build_run(compose([f"runs_dir={tmp_path / 'runs'}", *SMOKE, *overrides, "phases.p1.loss.repa.stage=9"]))
