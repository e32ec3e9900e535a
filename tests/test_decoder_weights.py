"""load_decoder / random_decoder: every real checkpoint layout, held to Wan's official decode."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from decoder_helpers import official_vae, random_latents
from helpers import (
    build_hub_cache,
    random_tensor,
    random_wan_state_dict,
    record_reads,
    rel_err,
    require,
    scaled_keys,
    wan21_keys,
    wan22_keys,
)
from streamvae import (
    LIGHTVAE,
    WAN22,
    CheckpointError,
    WanDecoder,
    load_decoder,
    load_encoder,
    narrow,
)
from streamvae.weights import random_decoder

BOUND = 1e-5
CONFIGS = {"wan2.1": narrow(8), "wan2.2": narrow(8, WAN22)}


def official(config, state: dict[str, torch.Tensor]):
    """Wan's WanVAE_ for ``config`` holding ``state`` (strict: the real names, every tensor)."""
    model = official_vae(config)
    model.load_state_dict(state, strict=True)
    return model


def official_decode(model, config, latents: torch.Tensor) -> torch.Tensor:
    scale = [torch.tensor(config.latents_mean), 1.0 / torch.tensor(config.latents_std)]
    with torch.no_grad():
        return model.decode(latents, scale).float().clamp_(-1, 1)


@pytest.fixture(scope="module", params=list(CONFIGS))
def files(request, tmp_path_factory):
    """A narrow checkpoint with the real names (both halves), as Wan's .pth and ComfyUI's file."""
    config = CONFIGS[request.param]
    if config.residual:
        keys = scaled_keys(wan22_keys(), 160, 256, 8, config.decoder_base_dim)
    else:
        keys = scaled_keys(wan21_keys(), 96, 96, 8, 8)
    state = random_wan_state_dict(seed=21, keys=keys)
    folder = tmp_path_factory.mktemp(request.param)
    torch.save(state, folder / "vae.pth")
    save_file(state, folder / "vae.safetensors")
    latents = random_latents(config, 3, 2, 2, seed=22)
    expected = official_decode(official(config, state), config, latents)
    return {
        "config": config,
        "state": state,
        "pth": folder / "vae.pth",
        "safetensors": folder / "vae.safetensors",
        "latents": latents,
        "expected": expected,
    }


@pytest.mark.parametrize("layout", ["pth", "safetensors"])
def test_wan_and_comfyui_files_decode_as_wan(files, layout):
    decoder = load_decoder(files[layout])
    assert isinstance(decoder, WanDecoder)
    assert decoder.config == files["config"]
    got = decoder.decode(files["latents"])
    assert rel_err(got, files["expected"]) <= BOUND


def test_only_decoder_tensors_are_read(files, monkeypatch):
    read = record_reads(monkeypatch)
    decoder = load_decoder(files["pth"])
    assert read and not [name for name in read if name.startswith(("encoder.", "conv1."))]
    assert not [name for name in decoder.state_dict() if name.startswith("encoder")]
    # And the encoder from the same file reads no decoder tensor.
    read.clear()
    load_encoder(files["pth"])
    assert not [name for name in read if name.startswith(("decoder.", "conv2."))]


@pytest.fixture
def diffusers():
    """diffusers, imported before ``offline_hub`` patches huggingface_hub's constants."""
    return require("diffusers")


def test_diffusers_folder_file_and_hub(files, tmp_path, diffusers, offline_hub):
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from streamvae.weights import diffusers_config

    config = files["config"]
    if config.residual:
        pytest.skip("diffusers' single-file converter is checked on the Wan 2.1 layout")
    reference = AutoencoderKLWan(**diffusers_config(config)).eval()
    reference.load_state_dict(convert_wan_vae_to_diffusers(dict(files["state"])), strict=True)
    reference.save_pretrained(tmp_path / "vae")
    folder = tmp_path / "vae"
    weights = folder / "diffusion_pytorch_model.safetensors"
    build_hub_cache(
        tmp_path / "hub",
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        {"vae/config.json": folder / "config.json", "vae/" + weights.name: weights},
    )
    for source, kwargs in (
        (folder, {}),
        (weights, {}),
        ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", {"cache_dir": tmp_path / "hub"}),
    ):
        decoder = load_decoder(source, **kwargs)
        assert rel_err(decoder.decode(files["latents"]), files["expected"]) <= BOUND, source


def test_dtype_and_device(files):
    decoder = load_decoder(files["pth"], dtype=torch.float16)
    assert {p.dtype for p in decoder.parameters()} == {torch.float16}
    assert decoder.device == torch.device("cpu")
    got = decoder.decode(files["latents"])
    assert got.dtype == torch.float32 and rel_err(got, files["expected"]) < 1e-2


def test_encoder_only_file_is_refused(files, tmp_path):
    encoder_half = {k: v for k, v in files["state"].items() if k.startswith(("encoder.", "conv1."))}
    path = tmp_path / "encoder.safetensors"
    save_file(encoder_half, path)
    with pytest.raises(CheckpointError, match="holds only encoder tensors"):
        load_decoder(path)


def test_missing_and_misshaped_decoder_tensors_are_listed(files, tmp_path):
    state = dict(files["state"])
    del state["decoder.head.2.bias"]
    state["conv2.weight"] = torch.zeros(1, 1, 1, 1, 1)
    path = tmp_path / "broken.safetensors"
    save_file(state, path)
    with pytest.raises(
        CheckpointError, match=r"(?s)decoder .*missing.*conv_out.bias.*mis-shaped"
    ) as info:
        load_decoder(path)
    assert "conv2.weight" in str(info.value)


def test_random_decoder_is_seeded():
    a, b = random_decoder(narrow(8), seed=1), random_decoder(narrow(8), seed=1)
    c = random_decoder(narrow(8), seed=2)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.conv_in.weight, c.conv_in.weight)
    assert not a.training and not any(p.requires_grad for p in a.parameters())


def test_lightvae_widths_decode_as_wan(tmp_path):
    """LightVAE's topology (Wan 2.1 at 24 channels) from Wan's layout: told by the shapes."""
    state = random_wan_state_dict(seed=23, keys=scaled_keys(wan21_keys(), 96, 96, 24, 24))
    save_file(state, tmp_path / "lightvae.safetensors")
    decoder = load_decoder(tmp_path / "lightvae.safetensors")
    assert decoder.config == LIGHTVAE
    latents = random_latents(LIGHTVAE, 2, 1, 2, seed=24)
    expected = official_decode(official(LIGHTVAE, state), LIGHTVAE, latents)
    assert rel_err(decoder.decode(latents), expected) <= BOUND


def test_qwen_image_folder_decodes_as_diffusers(tmp_path, diffusers):
    from diffusers import AutoencoderKLQwenImage

    model = AutoencoderKLQwenImage(base_dim=8)
    generator = torch.Generator().manual_seed(25)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(random_tensor(name, tuple(param.shape), generator))
    model.eval().save_pretrained(tmp_path / "vae")
    decoder = load_decoder(tmp_path / "vae")
    assert decoder.config.name == "qwen-image-narrow8"
    latents = random_latents(decoder.config, 2, 2, 2, seed=26)
    with torch.no_grad():
        expected = model.decode(decoder.denormalize(latents)).sample
    assert rel_err(decoder.decode(latents), expected) <= BOUND
