"""Model zoo: key-for-key and numeric parity with diffusers `AutoencoderDC`, config round trips, input checks,
gradient checkpointing, channels_last, bf16 autocast and torch.compile."""

from __future__ import annotations

import fnmatch
import io

import pytest
import torch
from _helpers_models import FAMILY_WIDTHS, PUBLISHED_PARAMS, diffusers_model, randomise_batchnorm, rel_err, twin_pair

from dcae_train.config import compose, to_config
from dcae_train.models import DCAE, RELEASED_VARIANTS, VARIANTS, DCAEConfig, ModelConfig, build_model, variant_config
from dcae_train.models.blocks import _linear_attention, _quadratic_attention

TOL = 1e-5  # fp32, relative to the output scale


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The CI box has 2 cores shared by several jobs: with 2 OpenMP threads each conv spins on a busy core and
    # this file ran ~10x slower than with 1 thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def family_config(name: str) -> DCAEConfig:
    return variant_config(name).scaled(FAMILY_WIDTHS[name], scale_latent=True)


# Registry and keys ------------------------------------------------------------------------------------------
def test_registry_names():
    assert set(RELEASED_VARIANTS) == set(PUBLISHED_PARAMS)
    assert set(VARIANTS) == set(RELEASED_VARIANTS) | {"tiny", "tiny-in", "tiny-1.5"}
    assert variant_config("dc-ae-lite-f32c32-sana-1.1") == variant_config("dc-ae-lite-f32c32")  # DC-Gen's names
    assert variant_config("dc-ae-f32c32-in-1.0-256px") == variant_config("dc-ae-f32c32-in-1.0")
    with pytest.raises(ValueError, match="unknown DC-AE variant 'sana'.*dc-ae-f32c32-sana-1.1"):
        variant_config("sana")
    assert variant_config("f32c32-in-1.0") == variant_config("dc-ae-f32c32-in-1.0")


@pytest.mark.parametrize("name", VARIANTS)
def test_keys_and_shapes_equal_diffusers_on_meta(name):
    config = variant_config(name)
    with torch.device("meta"):
        ours, ref = DCAE(config), diffusers_model(config)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert list(ours_shapes) == list(ref_shapes)  # same keys, same order
    assert ours_shapes == ref_shapes
    n_params = sum(p.numel() for p in ours.parameters())
    assert n_params == sum(p.numel() for p in ref.parameters())
    if name in PUBLISHED_PARAMS:
        assert n_params == PUBLISHED_PARAMS[name]
    else:
        assert n_params < 3_000_000  # debug variants stay tiny


@pytest.mark.parametrize("name", VARIANTS)
def test_phase_globs_select_the_documented_modules(name):
    with torch.device("meta"):
        names = [n for n, _ in DCAE(variant_config(name)).named_parameters()]
    phase2 = [n for n in names if fnmatch.fnmatch(n, "encoder.conv_out.*") or fnmatch.fnmatch(n, "decoder.conv_in.*")]
    phase3 = [n for n in names if fnmatch.fnmatch(n, "decoder.norm_out.*") or fnmatch.fnmatch(n, "decoder.conv_out.*")]
    assert phase2 == [f"{m}.{p}" for m in ("encoder.conv_out", "decoder.conv_in") for p in ("weight", "bias")]
    assert phase3[:2] == ["decoder.norm_out.weight", "decoder.norm_out.bias"]
    assert len(phase3) == 4


# Numeric parity ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["to_ours", "to_diffusers"])
@pytest.mark.parametrize("name", list(FAMILY_WIDTHS))
def test_numeric_parity_with_diffusers(name, direction):
    config = family_config(name)
    ref, ours = twin_pair(config, direction)
    f = config.spatial_compression_ratio
    # 64 px: quadratic attention everywhere at f32; 256 px: linear attention; plus a non-square input.
    sizes = [(64, 64), (256, 256), (2 * f, 3 * f) if f >= 64 else (64, 96)]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for h, w in sizes:
            x = torch.rand(1, 3, max(h, f), max(w, f), generator=g) * 2 - 1
            z_ref = ref.encode(x).latent
            z = ours.encode(x)
            assert z.shape == z_ref.shape
            assert rel_err(z, z_ref) < TOL, (h, w)
            y_ref = ref.decode(z_ref).sample
            assert rel_err(ours.decode(z_ref), y_ref) < TOL, (h, w)


def test_batchnorm_is_randomised_in_in_style_decoders():
    ref, _ = twin_pair(family_config("dc-ae-f32c32-in-1.0"))
    assert randomise_batchnorm(ref) == 15  # the 15 BN layers of decoder stages 1-2


def test_train_mode_batchnorm_matches_diffusers():
    """Training uses batch statistics and updates the running ones, exactly as diffusers does."""
    ref, ours = twin_pair(variant_config("tiny-in"))
    ref.train(), ours.train()
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    y_ref, y = ref(x).sample, ours(x)
    assert rel_err(y, y_ref) < TOL
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_linear_and_quadratic_attention_agree():
    q, k, v = (torch.rand(2, 3, 32, 20, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(_linear_attention(q, k, v, 1e-15), _quadratic_attention(q, k, v, 1e-15))


# Config -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", VARIANTS)
def test_config_round_trips(name):
    config = variant_config(name)
    d = config.to_diffusers_config()
    assert len(d) == 19
    hub = {"_class_name": "AutoencoderDC", "_diffusers_version": "0.40.0", **d}
    assert DCAEConfig.from_diffusers_config(hub) == config
    assert DCAEConfig.from_dict(config.to_dict()) == config
    buf = io.BytesIO()
    torch.save({"config": config.to_dict()}, buf)  # our checkpoints store plain types
    buf.seek(0)
    assert DCAEConfig.from_dict(torch.load(buf, weights_only=True)["config"]) == config


def test_config_reads_diffusers_spellings():
    hub_sana = variant_config("dc-ae-f32c32-sana-1.0").to_diffusers_config()
    hub_sana.update(downsample_block_type="Conv", decoder_act_fns="swish")  # as on the Hub / aliases
    for k in ("encoder_out_shortcut", "decoder_in_shortcut", "decoder_conv_act_fn"):
        hub_sana.pop(k)  # configs before diffusers 0.35 lack them
    assert DCAEConfig.from_diffusers_config(hub_sana) == variant_config("dc-ae-f32c32-sana-1.0")
    assert DCAEConfig() == DCAEConfig.from_diffusers_config({})  # diffusers defaults


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"unknown_key": 1}, "unknown_key: not an AutoencoderDC config key"),
        ({"_class_name": "AutoencoderKL"}, "not an AutoencoderDC config"),
        ({"encoder_block_types": "Transformer"}, "encoder_block_types: 'Transformer' is not supported"),
        ({"decoder_norm_types": "layer_norm"}, "decoder_norm_types: 'layer_norm' is not supported"),
        ({"decoder_act_fns": "relu6"}, "decoder_act_fns: 'relu6' is not supported"),
        ({"encoder_layers_per_block": [2, 2]}, "encoder_layers_per_block has 2 entries"),
        ({"latent_channels": 48}, "not a multiple of latent_channels=48"),
        ({"encoder_layers_per_block": [2, 0, 2, 3, 3, 3]}, "only the first stage may be empty"),
    ],
)
def test_config_errors_name_the_key(changes, match):
    d = {**variant_config("dc-ae-f32c32-sana-1.0").to_diffusers_config(), **changes}
    with pytest.raises(ValueError, match=match):
        DCAEConfig.from_diffusers_config(d)


def test_scaled_multiplies_every_width():
    c = variant_config("dc-ae-f32c32-sana-1.1").scaled(0.25)
    assert c.encoder_block_out_channels == c.decoder_block_out_channels == (32, 64, 128, 128, 256, 256)
    assert c.latent_channels == 32 and c.scaling_factor == 0.41407
    with pytest.raises(ValueError, match="multiple of attention_head_dim"):
        variant_config("tiny").scaled(0.25)  # attention stages at 16 channels
    with pytest.raises(ValueError, match="do not scale to whole numbers"):
        variant_config("dc-ae-f32c32-sana-1.1").scaled(0.1)
    small = variant_config("dc-ae-f128c512-in-1.0").scaled(0.125, scale_latent=True)
    assert small.latent_channels == 64 and small.encoder_block_out_channels[-1] == 256
    with pytest.raises(ValueError, match="width must be > 0"):
        c.scaled(0)


def test_model_config_selects_every_variant():
    assert to_config(compose(["model=tiny-in"])).model == ModelConfig(variant="tiny-in")  # = model.variant=tiny-in
    for name in VARIANTS:
        assert ModelConfig(variant=name).spatial_compression == variant_config(name).spatial_compression_ratio
    with pytest.raises(ValueError, match="model.variant='sana': use one of"):
        to_config(compose(["model=sana"]))


# API --------------------------------------------------------------------------------------------------------
def test_api_shapes_and_scaling():
    model = build_model("tiny").eval()
    assert model.spatial_compression_ratio == 8 and model.latent_channels == 8
    x = torch.rand(2, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        z = model.encode(x)
        assert z.shape == (2, 8, 8, 6)
        assert model.decode(z).shape == x.shape
        torch.testing.assert_close(model(x), model.decode(z))
    assert variant_config("dc-ae-f32c32-sana-1.1").scaling_factor == 0.41407
    model = DCAE(model.config.replace(scaling_factor=0.41407)).eval()
    assert model.scaling_factor == 0.41407
    with torch.no_grad():
        torch.testing.assert_close(model.encode_scaled(x), model.encode(x) * 0.41407)
        z = torch.randn(1, 8, 2, 3)
        torch.testing.assert_close(model.decode_scaled(z), model.decode(z / 0.41407))


def test_bad_input_sizes_name_the_nearest_valid_sizes():
    model = build_model("tiny")
    with pytest.raises(ValueError, match="height 100 is not a multiple of .* 8; nearest valid sizes: 96 or 104"):
        model.encode(torch.zeros(1, 3, 100, 64))
    with pytest.raises(ValueError, match="width 5 .* nearest valid sizes: 8"):
        model.encode(torch.zeros(1, 3, 64, 5))
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\), got shape \(3, 64, 64\)"):
        model.encode(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match=r"expected latents \(B, 8, h, w\)"):
        model.decode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="expected a variant name or a DCAEConfig"):
        build_model({"latent_channels": 32})


# Training features ------------------------------------------------------------------------------------------
def _grads_and_buffers(model: DCAE, x: torch.Tensor) -> tuple[dict, dict]:
    model.zero_grad()
    loss = (model(x) - x).square().mean() + model.encode(x).square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return grads, {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("name", ["tiny", "tiny-in"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    model = build_model(name).train()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    grads_off, bufs_off = _grads_and_buffers(model, x)
    model.load_state_dict(start)
    model.set_gradient_checkpointing(True)
    assert model.config.gradient_checkpointing
    grads_on, bufs_on = _grads_and_buffers(model, x)
    for n, g in grads_off.items():
        torch.testing.assert_close(grads_on[n], g, rtol=1e-5, atol=1e-7, msg=n)
    for n, b in bufs_off.items():  # BatchNorm statistics move once per forward, not twice
        torch.testing.assert_close(bufs_on[n], b, msg=n)


def test_gradient_checkpointing_from_config_and_frozen_parts():
    model = DCAE(variant_config("tiny").replace(gradient_checkpointing=True)).train()
    assert all(s.gradient_checkpointing for s in model.encoder.down_blocks)
    model.encoder.requires_grad_(False)  # phase-2/3 style: frozen encoder, input without grad
    loss = model(torch.rand(1, 3, 32, 32) * 2 - 1).mean()
    loss.backward()
    assert model.decoder.conv_out.weight.grad is not None
    assert model.encoder.conv_out.weight.grad is None


def test_channels_last_matches_contiguous():
    model = build_model("tiny-in").eval()
    randomise_batchnorm(model)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        y = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        y_cl = model_cl(x.contiguous(memory_format=torch.channels_last))
    assert rel_err(y_cl, y) < TOL


@pytest.mark.parametrize("size", [32, 64])  # latent 4x4 (quadratic attention) and 8x8 (linear)
def test_channels_last_rms_norm_path_matches_and_stays_channels_last(size):
    """RMSNorm and the attention projections take the NHWC path on channels_last inputs: same outputs and
    gradients as NCHW, and every EfficientViT block's output stays channels_last (no layout round trips)."""
    torch.manual_seed(0)
    model = build_model("tiny").train()
    twin = DCAE(model.config).train()
    twin.load_state_dict(model.state_dict())
    twin = twin.to(memory_format=torch.channels_last)
    layouts = []
    for m in twin.modules():
        if type(m).__name__ in ("EfficientViTBlock", "RMSNorm2d"):
            m.register_forward_hook(
                lambda _m, _i, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last))
            )
    x = torch.rand(2, 3, size, size) * 2 - 1
    y = model(x)
    y_cl = twin(x.contiguous(memory_format=torch.channels_last))
    assert rel_err(y_cl, y) < TOL
    assert layouts and all(layouts)
    y.square().mean().backward()
    y_cl.square().mean().backward()
    # The q-gradient of ReLU linear attention is ill-conditioned where a token's q . sum(k) is near 0 (it goes as
    # 1 / den^2), so fp32 summation-order differences between layouts reach ~5e-4 relative there on some inputs;
    # elsewhere the gradients agree to ~1e-6.
    grads = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        assert rel_err(grads[name].grad, p.grad) < 5e-3, name


@pytest.mark.parametrize("name", ["tiny", "tiny-in"])
def test_bf16_autocast_trains(name):
    model = build_model(name).train()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        y32 = model.eval()(x)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        loss = (y.float() - x).abs().mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = model.eval()(x)
    assert rel_err(y16, y32) < 0.1  # bf16 has ~3 significant digits


@pytest.mark.slow
def test_compile_in_place_keeps_keys_and_outputs():
    model = build_model("tiny").eval()
    keys = list(model.state_dict())
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        y = model(x)
        model.encoder.compile()
        model.decoder.compile()
        y_compiled = model(x)
    assert list(model.state_dict()) == keys
    assert rel_err(y_compiled, y) < 1e-4
