"""Weights in and out: key conversion, load_model from every source, exports, and clear errors."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from _helpers_weights import diffusers_twin, max_output_diff, random_model, small_config
from safetensors.torch import load_file, save_file

from dcae_train.models import DCAE, variant_config
from dcae_train.weights import (
    WeightsError,
    diffusers_to_original,
    export_diffusers,
    export_original,
    load_model,
    original_to_diffusers,
)
from dcae_train.weights.checkpoint import CheckpointMeta

DIFFUSERS_CONVERTIBLE = ["tiny", "tiny-in", "dc-ae-f32c32-sana-1.1", "dc-ae-f32c32-in-1.0", "dc-ae-f64c128-in-1.0"]


# Key conversion ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "n_diffusers", "n_original"),
    [
        ("dc-ae-f32c32-sana-1.1", 375, 339),
        ("dc-ae-lite-f32c32", 293, 275),
        ("dc-ae-f32c32-in-1.0", 362, 338),
        ("dc-ae-f64c128-in-1.0", 418, 386),
        ("dc-ae-f128c512-mix-1.0", 474, 434),
    ],
)
def test_full_size_key_counts_and_round_trip(name, n_diffusers, n_original):
    """Counts from architecture.md section 1; meta tensors, so full size costs nothing."""
    config = variant_config(name)
    with torch.device("meta"):
        sd = DCAE(config).state_dict()
    original = diffusers_to_original(sd, config)
    assert (len(sd), len(original)) == (n_diffusers, n_original)
    back = original_to_diffusers(original, config)
    assert set(back) == set(sd)
    assert all(back[k].shape == v.shape for k, v in sd.items())


@pytest.mark.parametrize("name", DIFFUSERS_CONVERTIBLE)
def test_conversion_agrees_with_diffusers_single_file_converter(name):
    from diffusers.loaders.single_file_utils import convert_autoencoder_dc_checkpoint_to_diffusers

    config = small_config(name)
    sd = random_model(config).state_dict()
    original = diffusers_to_original(sd, config)
    theirs = convert_autoencoder_dc_checkpoint_to_diffusers(dict(original))
    ours = original_to_diffusers(original, config)
    assert set(ours) == set(theirs) == set(sd)
    for k, v in sd.items():
        assert torch.equal(ours[k], v), k
        assert torch.equal(theirs[k].reshape(v.shape), v), k


def test_lite_conversion_is_right_where_diffusers_converter_is_not():
    """Lite: plain encoder stem + empty decoder stage 0. diffusers' converter mis-names the decoder head."""
    from diffusers.loaders.single_file_utils import convert_autoencoder_dc_checkpoint_to_diffusers

    config = small_config("dc-ae-lite-f32c32")
    sd = random_model(config).state_dict()
    original = diffusers_to_original(sd, config)
    assert "decoder.project_out.op_list.2.conv.conv.weight" in original
    assert "decoder.conv_out.weight" in convert_autoencoder_dc_checkpoint_to_diffusers(dict(original))  # wrong
    ours = original_to_diffusers(original, config)
    assert set(ours) == set(sd) and all(torch.equal(ours[k], v) for k, v in sd.items())


def test_qkv_split_is_consecutive_thirds_and_every_multiscale_index_maps():
    config = variant_config("tiny").replace(
        encoder_qkv_multiscales=((), (), (3, 5), (5,)), decoder_qkv_multiscales=((), (), (5,), (3, 5))
    )
    sd = random_model(config).state_dict()
    original = diffusers_to_original(sd, config)
    qkv = original["encoder.stages.2.op_list.0.context_module.main.qkv.conv.weight"]
    assert qkv.shape[-2:] == (1, 1)
    c = qkv.shape[1]
    assert torch.equal(qkv[c : 2 * c, :, 0, 0], sd["encoder.down_blocks.2.0.attn.to_k.weight"])
    assert "encoder.stages.2.op_list.0.context_module.main.aggreg.1.0.weight" in original
    back = original_to_diffusers(original, config)
    assert set(back) == set(sd) and all(torch.equal(back[k], v) for k, v in sd.items())


# Original checkpoints -> ours -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "tiny",
        "tiny-in",
        "dc-ae-f32c32-sana-1.1",
        "dc-ae-lite-f32c32",
        "dc-ae-f32c32-in-1.0",
        "dc-ae-f32c32-mix-1.0",
        "dc-ae-f64c128-in-1.0",
        "dc-ae-f128c512-mix-1.0",
    ],
)
def test_original_file_gives_the_outputs_of_the_diffusers_model(tmp_path, name):
    config = small_config(name)
    ref = random_model(config)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_to_original(ref.state_dict(), config).items()}, str(path))
    if name.startswith("dc-ae"):  # reduced width: a config.json naming the family is enough (scaled to the file)
        (tmp_path / "config.json").write_text(json.dumps({"model_name": name}))
        named = load_model(path)
        assert named.config == config and named.variant is None  # the family's architecture, not the release
    model = load_model(path)
    assert model.config == config
    size = max(64, 2 * config.spatial_compression_ratio)  # a 2x2 latent at least (f128: 256 px)
    assert max_output_diff(model, diffusers_twin(config, ref.state_dict()), size) < 1e-5


def test_original_variant_is_inferred_from_shapes_and_in_mix_is_refused(tmp_path):
    tiny = random_model(small_config("tiny-in"))
    path = tmp_path / "a.safetensors"
    save_file(diffusers_to_original(tiny.state_dict(), tiny.config), str(path))  # no metadata, no config.json
    assert load_model(path).variant == "tiny-in"
    (tmp_path / "config.json").write_text(json.dumps({"model_name": "dc-ae-some-future-release"}))
    assert load_model(path).variant == "tiny-in"  # unknown name: the shapes still decide
    (tmp_path / "config.json").unlink()

    config = small_config("dc-ae-f32c32-in-1.0")
    sd = diffusers_to_original(random_model(config).state_dict(), config)
    path = tmp_path / "b.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightsError, match=r"differ only in scaling_factor.*variant="):
        load_model(path)


def test_export_original_round_trip_with_metadata(tmp_path):
    model = random_model(small_config("dc-ae-f64c128-in-1.0"))
    folder = tmp_path / "orig"
    export_original(model, folder)
    assert json.loads((folder / "config.json").read_text())["model_name"] is None  # reduced width: no release
    back = load_model(folder)
    assert back.config == model.config
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    single = export_original(model, tmp_path / "x.safetensors", dtype="bf16")
    assert load_file(str(single))["decoder.project_out.op_list.0.weight"].dtype == torch.bfloat16


# Diffusers folders ------------------------------------------------------------------------------------------
def _diffusers_dir(tmp_path: Path, name: str = "tiny-in", **save_kwargs):
    config = small_config(name)
    ref = diffusers_twin(config, random_model(config).state_dict())
    out = tmp_path / "hf"
    ref.save_pretrained(out, safe_serialization=True, **save_kwargs)
    return ref, out


@pytest.mark.parametrize("shards", [False, True])
def test_diffusers_dir_round_trip_is_bitwise(tmp_path, shards):
    ref, folder = _diffusers_dir(tmp_path, max_shard_size="300KB" if shards else "10GB")
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file() == shards
    model = load_model(folder)
    out = export_diffusers(model, tmp_path / "again")
    original = ref.state_dict()
    exported = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert set(exported) == set(original)
    for k, v in original.items():
        assert exported[k].dtype == v.dtype and torch.equal(exported[k], v), k
    assert max_output_diff(model, ref, 64) < 1e-5


def test_bf16_variant_folder_loads_and_exports(tmp_path):
    from diffusers import AutoencoderDC

    ref, folder = _diffusers_dir(tmp_path, variant="bf16")
    assert (folder / "diffusion_pytorch_model.bf16.safetensors").is_file()
    model = load_model(folder)
    assert next(model.parameters()).dtype == torch.float32
    out = export_diffusers(model, tmp_path / "bf16", dtype="bf16")
    stored = load_file(str(out / "diffusion_pytorch_model.bf16.safetensors"))
    assert stored["decoder.norm_out.weight"].dtype == torch.bfloat16
    loaded = AutoencoderDC.from_pretrained(out, variant="bf16", torch_dtype=torch.bfloat16)
    assert next(loaded.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["tiny", "tiny-in"])
def test_ours_to_diffusers_from_pretrained_matches(tmp_path, name):
    from diffusers import AutoencoderDC

    model = random_model(small_config(name))
    out = export_diffusers(model, tmp_path / "d", scaling_factor=0.1234)
    theirs, info = AutoencoderDC.from_pretrained(out, output_loading_info=True)
    assert all(not v for v in info.values()), info  # no missing / unexpected / mismatched keys
    assert theirs.config.scaling_factor == pytest.approx(0.1234)
    assert max_output_diff(model, theirs.eval(), 64) < 1e-5
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt*"))  # safetensors only
    assert load_model(out).scaling_factor == pytest.approx(0.1234)


# Our training checkpoints -----------------------------------------------------------------------------------
def _training_checkpoint(path: Path, ema: bool = True) -> tuple[DCAE, DCAE]:
    raw, avg = random_model(small_config("tiny"), 0), random_model(small_config("tiny"), 1)
    state = {f"model.{k}": v for k, v in raw.state_dict().items()}
    if ema:
        state |= {f"ema.{k}": v for k, v in avg.state_dict().items()}
    state["loss.discriminator.conv.weight"] = torch.zeros(1)
    meta = CheckpointMeta(raw.config.to_dict(), "tiny", 0.77, phase=2, recipe="quickstart", parent=None,
                          lpips_pretrained=True)  # fmt: skip
    torch.save({"state_dict": state, "dcae": meta.to_dict(), "global_step": 5}, path)
    return raw, avg


@pytest.mark.parametrize("ema", [True, False])
def test_training_checkpoint_raw_or_ema(tmp_path, ema):
    raw, avg = _training_checkpoint(tmp_path / "last.ckpt")
    model = load_model(tmp_path / "last.ckpt", ema=ema)
    want = avg if ema else raw
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in want.state_dict().items())
    assert model.scaling_factor == pytest.approx(0.77) and model.variant == "tiny"


def test_training_checkpoint_without_ema_falls_back_to_raw(tmp_path):
    raw, _ = _training_checkpoint(tmp_path / "last.ckpt", ema=False)
    model = load_model(tmp_path / "last.ckpt", ema=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in raw.state_dict().items())


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_that_runs_code_on_unpickling_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload works with a plain unpickler ...
    assert marker.exists()
    marker.unlink()
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "dcae": {}, "x": _Payload(marker)}, evil)
    with pytest.raises(WeightsError, match=r"evil\.ckpt.*weights_only=True"):
        load_model(evil)
    assert not marker.exists()  # ... and never ran here


def test_no_torch_load_without_weights_only():
    root = Path(__file__).resolve().parents[1]
    for path in [*(root / "dcae_train").rglob("*.py"), *(root / "scripts").rglob("*.py")]:
        for call in re.findall(r"torch\.load\((.*?)\)\s*$", path.read_text(), flags=re.M | re.S):
            assert "weights_only=True" in call, f"{path}: torch.load without weights_only=True"


# Hugging Face ids -------------------------------------------------------------------------------------------
def _fake_hub_cache(cache: Path, repo: str, files: dict[str, bytes]) -> None:
    commit = "0" * 40
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)


def test_hub_repo_id_uses_the_cache_offline_and_errors_without_it(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    _, folder = _diffusers_dir(tmp_path)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    cache = tmp_path / "cache"
    _fake_hub_cache(cache, "someone/dc-ae-tiny-diffusers", files)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    model = load_model("someone/dc-ae-tiny-diffusers")
    assert model.config == small_config("tiny-in")
    with pytest.raises(WeightsError, match="no cached copy"):
        load_model("someone/not-downloaded")


# Errors -----------------------------------------------------------------------------------------------------
def test_truncated_or_corrupt_safetensors_names_the_file(tmp_path):
    _, folder = _diffusers_dir(tmp_path)
    weights = folder / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model\.safetensors.*corrupt, truncated"):
        load_model(folder)
    weights.write_bytes(b"\x00" * 100)
    with pytest.raises(WeightsError, match="diffusion_pytorch_model.safetensors"):
        load_model(folder)


def test_unknown_architecture_config_names_the_file(tmp_path):
    _, folder = _diffusers_dir(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"decoder_block_types": "MambaBlock"}))
    with pytest.raises(WeightsError, match=r"config\.json.*MambaBlock"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps(cfg | {"_class_name": "AutoencoderKL"}))
    with pytest.raises(WeightsError, match=r"config\.json.*AutoencoderKL"):
        load_model(folder)


def test_missing_key_names_the_file_and_loads_nothing(tmp_path):
    _, folder = _diffusers_dir(tmp_path)
    weights = folder / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(weights))
    del sd["decoder.norm_out.bias"]
    save_file(sd, str(weights))
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model\.safetensors.*missing.*decoder\.norm_out\.bias"):
        load_model(folder)


def test_bad_sources(tmp_path):
    with pytest.raises(WeightsError, match="not an existing file or folder, a variant name"):
        load_model("no-such-thing")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(WeightsError, match="pickle"):
        load_model(tmp_path / "w.bin")
    with pytest.raises(WeightsError, match="nothing to load"):
        load_model(tmp_path)
    assert load_model("tiny").variant == "tiny"
