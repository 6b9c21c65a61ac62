"""EvalCallback in a real (tiny) Lightning fit: raw and EMA metrics reach the CSV logger every N steps."""

from __future__ import annotations

import copy
import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from dcae_train.evaluation import EvaluationConfig
from dcae_train.models import build_model
from dcae_train.training.eval_callback import EvalCallback


class _TinyModule(L.LightningModule):
    """The two attributes the callback reads: `model` and `ema` (None or a module with encode/decode)."""

    def __init__(self, with_ema: bool, variant: str = "tiny") -> None:
        super().__init__()
        self.model = build_model(variant)
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if with_ema else None

    def training_step(self, batch, batch_idx):
        x = batch["image"]
        return (self.model(x) - x).abs().mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=1e-3)


def _loader(n: int = 8):
    images = torch.rand(n, 3, 32, 32) * 2 - 1
    return torch.utils.data.DataLoader([{"image": im} for im in images], batch_size=4)


def _rows(tmp_path):
    (path,) = tmp_path.rglob("metrics.csv")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_eval_callback_logs_raw_and_ema(tmp_path, with_ema=True):
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    cb = EvalCallback(EvaluationConfig(every=2, batch_size=4, lpips="random", fid="tiny"), images=images)
    trainer = L.Trainer(
        max_steps=4, accelerator="cpu", logger=CSVLogger(tmp_path), callbacks=[cb], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(_TinyModule(with_ema), _loader())
    rows = [r for r in _rows(tmp_path) if r.get("eval/psnr")]
    assert [int(r["step"]) for r in rows] == [2, 4]
    for key in ("eval/psnr", "eval/ssim", "eval/lpips", "eval/rfid", "eval/latent_rms"):
        assert all(float(r[key]) == float(r[key]) for r in rows), key  # present and not NaN
    assert ("eval_ema/psnr" in rows[0] and rows[0]["eval_ema/psnr"] != "") is with_ema
    assert set(cb.last_metrics) == {k for k in rows[-1] if k.startswith("eval") and rows[-1][k] != ""}

    module = trainer.lightning_module
    module.ema = None  # a run without EMA logs the raw keys only
    cb._last_step = -1
    cb._run(trainer, module)
    assert cb.last_metrics and not any(k.startswith("eval_ema/") for k in cb.last_metrics)


def test_eval_callback_logs_every_latent_prefix(tmp_path):
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    config = EvaluationConfig(every=2, batch_size=4, lpips="random", fid="tiny", latent_channels=[4, 8, 16])
    cb = EvalCallback(config, images=images)
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=CSVLogger(tmp_path), callbacks=[cb], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(_TinyModule(False, "tiny-1.5"), _loader())
    m = cb.last_metrics
    for c in (4, 8, 16):
        assert {f"eval/c{c}/{k}" for k in ("psnr", "ssim", "lpips", "rfid", "latent_rms")} <= set(m), sorted(m)
    assert m["eval/c16/psnr"] == pytest.approx(m["eval/psnr"], abs=1e-9)  # all 16 channels = the full latent
    assert m["eval/c4/latent_rms"] != m["eval/latent_rms"]


def test_eval_callback_fid_auto_is_off_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert EvalCallback(EvaluationConfig(every=1, lpips="off", fid="auto")).features is None
    with pytest.raises(FileNotFoundError, match="pt_inception"):
        EvalCallback(EvaluationConfig(every=1, lpips="off", fid="inception"))
    with pytest.raises(ValueError, match="every=-1: must be >= 0"):
        EvaluationConfig(every=-1, lpips="off", fid="off")
    with pytest.raises(ValueError, match="lpips='squeeze'"):
        EvaluationConfig(lpips="squeeze")
