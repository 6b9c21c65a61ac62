"""LPIPS (the loss and the metric): frozen, deterministic, fp32 under bf16, parity with lpips, the trunk policy.

The trunk-policy tests point TORCH_HOME at a temporary folder and replace torch.hub's downloader, so nothing here
touches the network or the user's cache.
"""

from __future__ import annotations

import hashlib
import types
import urllib.error
import warnings
from pathlib import Path

import lpips
import pytest
import torch
import torchvision

from dcae_train.losses import LPIPS, LossConfig, unit_normalize
from dcae_train.losses import perceptual as perceptual_mod
from dcae_train.pretrained import WeightFile, hub_dir


def images(b: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def vgg() -> LPIPS:
    return LPIPS("vgg", pretrained=False)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch.hub cache under tmp_path and a downloader that fails like an offline machine."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(perceptual_mod, "_warned_random_trunk", set())
    attempts = []

    def offline(url, dst, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return types.SimpleNamespace(checkpoints=tmp_path / "torch" / "hub" / "checkpoints", attempts=attempts)


# Behaviour ---------------------------------------------------------------------------------------------


def test_frozen_and_eval_forever(vgg):
    assert not any(p.requires_grad for p in vgg.parameters())
    vgg.train()
    vgg.requires_grad_(True)
    assert not vgg.training and not any(m.training for m in vgg.modules())
    assert not any(p.requires_grad for p in vgg.parameters())
    assert all(not m.training for m in vgg.modules() if isinstance(m, torch.nn.Dropout))  # inert dropout


def test_linear_heads_are_the_shipped_weights(vgg):
    # lpips stores the heads as lin*.model.1.weight and loads them with strict=False: with use_dropout=False
    # the keys do not match and the heads stay random (negative LPIPS values were the symptom).
    import lpips as lpips_pkg

    shipped = torch.load(
        Path(lpips_pkg.__file__).parent / "weights" / "v0.1" / "vgg.pth", map_location="cpu", weights_only=True
    )
    ours = vgg.lpips.state_dict()
    for key, value in shipped.items():
        assert torch.equal(ours[key], value), key
    x, y = images(seed=3), images(seed=4)
    assert (vgg.distance(x, y) > 0).all()


def test_deterministic_under_train_and_zero_on_identical_images(vgg):
    x, y = images(seed=1), images(seed=2)
    vgg.train()
    a, b = vgg(x, y), vgg(x, y)
    assert a.ndim == 0 and a.dtype == torch.float32 and a > 0
    assert torch.equal(a, b)
    assert vgg(x, x).item() == pytest.approx(0.0, abs=1e-7)
    assert vgg.distance(x, y).shape == (2,)
    assert torch.allclose(vgg(x, y), vgg.distance(x, y).mean())


def test_random_trunk_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = LPIPS("alex", pretrained=False)
    after = torch.rand(1)
    b = LPIPS("alex", pretrained=False)
    assert torch.equal(before, after)  # building the loss does not shift the model's init randomness
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))  # same on all ranks


def test_matches_the_lpips_package(vgg):
    x, y = images(seed=1), images(seed=2)
    ours = vgg.distance(x, y)
    with torch.no_grad():
        theirs = vgg.lpips(x, y).flatten()  # the package's own forward on the same weights
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-6)


def test_gradients_finite_and_eps_inside_sqrt(vgg):
    x, y = images(seed=1), images(seed=2).requires_grad_(True)
    vgg(y, x).backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    # An all-zero feature vector (a dead ReLU column): lpips' normalisation has an infinite gradient there.
    feat = torch.zeros(1, 4, 2, 2, requires_grad=True)
    unit_normalize(feat).sum().backward()
    assert torch.isfinite(feat.grad).all()
    feat2 = torch.zeros(1, 4, 2, 2, requires_grad=True)
    lpips.normalize_tensor(feat2).pow(2).sum().sqrt().backward()
    assert not torch.isfinite(feat2.grad).all()  # the bug we avoid


def test_fp32_under_bf16_autocast(vgg):
    x, y = images(1, seed=1), images(1, seed=2)
    ref = vgg(y, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vgg(y.bfloat16(), x.bfloat16())
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert out.item() == pytest.approx(ref.item(), rel=2e-2)  # only the bf16 rounding of the inputs differs


def test_stays_fp32_when_a_trainer_casts_modules():
    loss = LPIPS("alex", pretrained=False).to(torch.bfloat16)
    assert all(t.dtype == torch.float32 for t in (*loss.parameters(), *loss.buffers()))
    assert loss(images().bfloat16(), images(seed=3).bfloat16()).dtype == torch.float32


def test_bad_inputs(vgg):
    with pytest.raises(ValueError, match="lpips_net='resnet'"):
        LossConfig(lpips_net="resnet")  # the rule lives in the config
    with pytest.raises(ValueError, match="same shape"):
        vgg(images(size=32), images(size=16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vgg(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32))


# Trunk policy ------------------------------------------------------------------------------------------


def test_trunk_file_follows_torch_home(offline_hub):
    assert hub_dir() == offline_hub.checkpoints
    assert perceptual_mod.TRUNKS["vgg"].names == ("vgg16-397923af.pth",)
    assert perceptual_mod.TRUNKS["alex"].names == ("alexnet-owt-7be5be79.pth",)


def test_pretrained_false_never_touches_the_network(offline_hub):
    loss = LPIPS("alex", pretrained=False)
    assert loss.pretrained is False and offline_hub.attempts == []


def test_wrong_hash_is_an_error(offline_hub):
    offline_hub.checkpoints.mkdir(parents=True)
    torch.save({"features.0.weight": torch.randn(64, 3, 3, 3)}, offline_hub.checkpoints / "vgg16-397923af.pth")
    with pytest.raises(ValueError, match=r"vgg16-397923af.pth is not the .* SHA-256 .* expected 397923af") as err:
        LPIPS("vgg", require_pretrained=False, allow_download=False)
    assert "download.pytorch.org/models/vgg16-397923af.pth" in str(err.value)
    assert offline_hub.attempts == []


def test_absent_and_download_disabled_is_an_error_naming_file_and_folder(offline_hub):
    with pytest.raises(FileNotFoundError) as err:
        LPIPS("vgg", require_pretrained=True, allow_download=False)
    msg = str(err.value)
    assert "vgg16-397923af.pth" in msg and str(offline_hub.checkpoints) in msg
    assert "downloading is disabled" in msg and "perceptual.require_pretrained=false" in msg
    assert offline_hub.attempts == []


def test_absent_and_offline_is_an_error(offline_hub):
    with pytest.raises(FileNotFoundError, match=r"vgg16-397923af.pth are not in .*URLError"):
        LPIPS("vgg", require_pretrained=True, allow_download=True)
    assert offline_hub.attempts == ["https://download.pytorch.org/models/vgg16-397923af.pth"]


def test_absent_not_required_warns_once_and_uses_a_random_trunk(offline_hub, caplog):
    with pytest.warns(RuntimeWarning, match="RANDOM alex trunk"):
        first = LPIPS("alex", require_pretrained=False, allow_download=True)
    assert first.pretrained is False
    assert "RANDOM alex trunk" in caplog.text
    caplog.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        second = LPIPS("alex", require_pretrained=False, allow_download=False)
    assert second.pretrained is False and caplog.text == ""


def _fake_alexnet_file(folder) -> tuple[str, dict[str, torch.Tensor], Path]:
    """A random torchvision-layout AlexNet `features` state_dict saved under a name carrying its own hash."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(7)
    state = {k: v for k, v in torchvision.models.alexnet().state_dict().items() if k.startswith("features.")}
    state["classifier.1.weight"] = torch.zeros(2, 2)  # non-trunk keys are ignored
    tmp = folder / "tmp.pth"
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    name = f"alexnet-owt-{digest[:8]}.pth"
    return name, state, tmp


def _point_alex_at(monkeypatch, name: str) -> None:
    url = f"https://download.pytorch.org/models/{name}"
    fake = WeightFile((name,), name.split("-")[-1][:8], url, "test AlexNet")
    monkeypatch.setitem(perceptual_mod.TRUNKS, "alex", fake)


def test_present_and_valid_trunk_is_loaded(offline_hub, monkeypatch):
    name, state, tmp = _fake_alexnet_file(offline_hub.checkpoints)
    tmp.rename(offline_hub.checkpoints / name)
    _point_alex_at(monkeypatch, name)
    loss = LPIPS("alex", require_pretrained=True, allow_download=False)
    assert loss.pretrained is True and offline_hub.attempts == []
    assert torch.equal(getattr(loss.lpips.net.slice1, "0").weight, state["features.0.weight"])
    assert torch.equal(getattr(loss.lpips.net.slice5, "10").bias, state["features.10.bias"])


def test_successful_download_is_loaded(offline_hub, monkeypatch, tmp_path):
    name, state, tmp = _fake_alexnet_file(tmp_path / "server")
    _point_alex_at(monkeypatch, name)
    calls = []

    def download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)
        tmp.replace(dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    loss = LPIPS("alex", require_pretrained=True, allow_download=True)
    assert loss.pretrained is True
    assert calls == [(f"https://download.pytorch.org/models/{name}", name.split("-")[-1][:8])]
    assert torch.equal(getattr(loss.lpips.net.slice3, "6").weight, state["features.6.weight"])
