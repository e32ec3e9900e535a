"""Loading the rest of the Wan VAE family: Wan 2.2 (every layout and hub id), LightVAE and
Qwen-Image, each held to an independent oracle that reads the same file or weights itself:
Wan's vae2_2.py / vae2_1.py (strict loading of Wan's names), diffusers' from_pretrained of its
own folder, diffusers' converter for Wan 2.1-style single files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import streamvae.weights as weights
from helpers import (
    OfficialVAE,
    build_hub_cache,
    diffusers_reference,
    diffusers_twin,
    loading_memory,
    random_tensor,
    random_video,
    random_wan_state_dict,
    record_reads,
    rel_err,
    scaled_keys,
    to_model_video,
    wan21_keys,
    wan22_keys,
)
from streamvae import (
    LIGHTVAE,
    QWEN_IMAGE,
    WAN22,
    CheckpointError,
    StreamEncoder,
    load_encoder,
    narrow,
)

TOLERANCE = 1e-5
NARROW22 = narrow(8, WAN22)
LAYOUTS22 = ["wan-pth", "comfyui-bf16", "diffusers-folder", "diffusers-file"]
DECODER_PREFIXES = ("decoder.", "conv2.", "post_quant_conv.")


def randomized(model, seed: int):
    """``model`` with well-scaled random values in every parameter (by its own names)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(random_tensor(name, tuple(param.shape), generator))
    return model.eval()


def narrow22_keys():
    """Wan2.2_VAE.pth's 196 names, encoder widths 160 -> 8 and decoder widths 256 -> 8."""
    return scaled_keys(wan22_keys(), 160, 256, 8, 8)


@pytest.fixture(scope="module")
def layouts22(tmp_path_factory):
    """One set of random weights as Wan's .pth and ComfyUI's 16-bit file (Wan's names), and a
    diffusers folder written by diffusers from its own random model."""
    folder = tmp_path_factory.mktemp("wan22")
    state = random_wan_state_dict(seed=21, keys=narrow22_keys())
    torch.save(state, folder / "Wan2.2_VAE.pth")
    half = {k: v.to(torch.bfloat16) for k, v in state.items()}
    save_file(half, folder / "wan2.2_vae.safetensors")
    reference = randomized(diffusers_reference(NARROW22, decoder_base_dim=8), seed=22)
    reference.save_pretrained(folder / "diffusers")
    from diffusers import AutoencoderKLWan

    return {
        "wan-pth": folder / "Wan2.2_VAE.pth",
        "comfyui-bf16": folder / "wan2.2_vae.safetensors",
        "diffusers-folder": folder / "diffusers",
        "diffusers-file": folder / "diffusers" / "diffusion_pytorch_model.safetensors",
        "state": state,
        "half": half,
        "oracles": {
            "wan-pth": OfficialVAE(NARROW22, state),
            "comfyui-bf16": OfficialVAE(NARROW22, {k: v.float() for k, v in half.items()}),
            # diffusers reads its own folder: no name mapping of ours is involved.
            "diffusers": AutoencoderKLWan.from_pretrained(folder / "diffusers").eval(),
        },
    }


def oracle_mean(layouts, layout: str, video: torch.Tensor) -> torch.Tensor:
    oracles = layouts["oracles"]
    if layout.startswith("diffusers"):
        with torch.no_grad():
            return oracles["diffusers"].encode(video).latent_dist.mean
    return oracles[layout].encode(video)


# -- Wan 2.2 ----


@pytest.mark.parametrize("layout", LAYOUTS22)
@pytest.mark.parametrize("frames", [1, 5, 9])
def test_wan22_every_layout_matches_its_oracle(layouts22, layout, frames, record_property):
    encoder = load_encoder(layouts22[layout])
    assert encoder.config == NARROW22
    video = to_model_video(random_video(frames, 32, 48, seed=frames))
    expected = oracle_mean(layouts22, layout, video)
    got = encoder.encode(video, normalize=False)
    assert got.shape == expected.shape == (1, 48, 1 + (frames - 1) // 4, 2, 3)
    error = rel_err(got, expected)
    record_property("rel_err", error)
    print(f"wan2.2 {layout}, {frames} frames: max relative error {error:.2e}")
    assert error <= TOLERANCE


def test_wan22_pth_also_matches_diffusers(layouts22):
    """The second oracle for Wan's names: diffusers holding the same weights."""
    encoder = load_encoder(layouts22["wan-pth"])
    video = to_model_video(random_video(9, 32, 32, seed=3))
    with torch.no_grad():
        expected = diffusers_twin(encoder).encode(video).latent_dist.mean
    assert rel_err(encoder.encode(video, normalize=False), expected) <= TOLERANCE


def test_wan22_16bit_file_loads_its_values_exactly(layouts22):
    as_bf16 = load_encoder(layouts22["comfyui-bf16"], dtype=torch.bfloat16)
    as_fp32 = load_encoder(layouts22["comfyui-bf16"])
    names = {ours: theirs for theirs in layouts22["half"] if (ours := _ours(theirs))}
    for ours, tensor in as_bf16.state_dict().items():
        assert torch.equal(tensor, layouts22["half"][names[ours]]), ours
        assert torch.equal(as_fp32.state_dict()[ours], tensor.float()), ours


def _ours(name: str) -> str | None:
    return weights.wan_to_streamvae_name(name)


@pytest.mark.parametrize("layout", ["wan-pth", "comfyui-bf16", "diffusers-folder"])
def test_wan22_only_encoder_tensors_are_read(layouts22, layout, monkeypatch):
    read = record_reads(monkeypatch)
    encoder = load_encoder(layouts22[layout])
    assert len(read) == len(encoder.state_dict()) == 86
    assert not [name for name in read if name.startswith(DECODER_PREFIXES)]


def test_hub_wan22_repo_from_cache(layouts22, tmp_path, offline_hub):
    build_hub_cache(tmp_path, "Wan-AI/Wan2.2-TI2V-5B", {"Wan2.2_VAE.pth": layouts22["wan-pth"]})
    encoder = load_encoder("Wan-AI/Wan2.2-TI2V-5B", cache_dir=tmp_path)
    expected = load_encoder(layouts22["wan-pth"]).state_dict()
    assert encoder.config == NARROW22
    assert all(torch.equal(v, expected[k]) for k, v in encoder.state_dict().items())


def test_hub_wan22_diffusers_repo_from_cache(layouts22, tmp_path, offline_hub):
    folder = layouts22["diffusers-folder"]
    build_hub_cache(
        tmp_path,
        "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
        {
            "vae/config.json": folder / "config.json",
            "vae/diffusion_pytorch_model.safetensors": layouts22["diffusers-file"],
        },
    )
    encoder = load_encoder("Wan-AI/Wan2.2-TI2V-5B-Diffusers", cache_dir=tmp_path)
    expected = load_encoder(folder).state_dict()
    assert encoder.config == NARROW22
    assert all(torch.equal(v, expected[k]) for k, v in encoder.state_dict().items())


def test_wan22_missing_and_misshaped_are_named_in_wans_names(layouts22, tmp_path):
    state = dict(layouts22["state"])
    del state["encoder.downsamples.1.downsamples.2.time_conv.bias"]
    state["encoder.downsamples.2.downsamples.0.shortcut.weight"] = torch.zeros(32, 8, 1, 1, 1)
    path = tmp_path / "broken.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError) as info:
        load_encoder(path)
    message = str(info.value)
    assert "does not fit the wan2.2-narrow8 encoder (layout detected: wan" in message
    assert "1 missing: encoder.downsamples.1.downsamples.2.time_conv.bias [16]" in message
    assert (
        "encoder.downsamples.2.downsamples.0.shortcut.weight: [32, 8, 1, 1, 1], "
        "expected [32, 16, 1, 1, 1]" in message
    )


def test_wan22_decoder_only_file_gets_the_decoder_only_error(layouts22, tmp_path):
    state = {k: v for k, v in layouts22["state"].items() if k.startswith(("decoder.", "conv2."))}
    path = tmp_path / "decoder.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError, match="only decoder tensors"):
        load_encoder(path)


def test_wan21_and_wan22_files_are_told_apart(layouts22, tmp_path):
    wan21 = tmp_path / "wan21.safetensors"
    save_file(random_wan_state_dict(seed=3, keys=scaled_keys(wan21_keys(), 96, 96, 8, 8)), wan21)
    assert load_encoder(wan21).config == narrow(8)
    assert load_encoder(layouts22["comfyui-bf16"]).config == NARROW22


@pytest.fixture(scope="module")
def full22_files(tmp_path_factory):
    """The real Wan2.2_VAE.pth shapes (704.7 M values): float32 .pth and ComfyUI's bf16 file."""
    folder = tmp_path_factory.mktemp("wan22full")
    generator = torch.Generator().manual_seed(0)
    half = {
        name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        for name, shape in wan22_keys()
    }
    save_file(half, folder / "wan2.2_vae.safetensors")
    full = {name: tensor.float() for name, tensor in half.items()}
    del half
    torch.save(full, folder / "Wan2.2_VAE.pth")
    del full
    return {"wan-pth": folder / "Wan2.2_VAE.pth", "comfyui-bf16": folder / "wan2.2_vae.safetensors"}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["wan-pth", "comfyui-bf16"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_wan22_loading_never_holds_the_weights_twice_nor_the_decoder(full22_files, layout, dtype):
    """Loading the full 2.8 GB Wan 2.2 VAE (2.2 GB of it decoder) grows anonymous memory by
    about the encoder's 0.6 GB: the decoder is never read, the encoder never held twice."""
    figures = loading_memory(full22_files[layout], dtype)
    print("wan2.2", layout, dtype, figures)
    assert figures["params"] == 149_637_088 * (4 if dtype == "float32" else 2)
    assert figures["peak_growth"] < 1.25 * figures["params"] + 64 * 2**20


# -- LightVAE ----


@pytest.fixture(scope="module")
def lightvae_files(tmp_path_factory):
    """LightVAE-shaped random weights: Wan 2.1's names, 75% of the widths pruned (96 -> 24)."""
    folder = tmp_path_factory.mktemp("lightvae")
    state = random_wan_state_dict(seed=31, keys=scaled_keys(wan21_keys(), 96, 96, 24, 24))
    torch.save(state, folder / "lightvaew2_1.pth")
    save_file(state, folder / "lightvaew2_1.safetensors")
    return {
        "pth": folder / "lightvaew2_1.pth",
        "safetensors": folder / "lightvaew2_1.safetensors",
    }, state


@pytest.mark.parametrize("layout", ["pth", "safetensors"])
def test_lightvae_is_recognised_and_matches_diffusers_and_wan(lightvae_files, layout):
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    files, state = lightvae_files
    encoder = load_encoder(files[layout])
    assert encoder.config == LIGHTVAE and encoder.config.dims == (24, 24, 48, 96, 96)
    reference = diffusers_reference(LIGHTVAE)
    reference.load_state_dict(convert_wan_vae_to_diffusers(dict(state)), strict=True)
    official = OfficialVAE(LIGHTVAE, state)
    for frames in (1, 5, 9):
        video = to_model_video(random_video(frames, 32, 24, seed=frames))
        got = encoder.encode(video, normalize=False)
        with torch.no_grad():
            to_diffusers = rel_err(got, reference.encode(video).latent_dist.mean)
        to_wan = rel_err(got, official.encode(video))
        print(
            f"lightvae {layout}, {frames} frames: vs diffusers {to_diffusers:.2e}, wan {to_wan:.2e}"
        )
        assert max(to_diffusers, to_wan) <= TOLERANCE


# -- Qwen-Image ----


def qwen_folder(folder, seed: int, **kwargs):
    from diffusers import AutoencoderKLQwenImage

    model = randomized(AutoencoderKLQwenImage(**kwargs), seed)
    model.save_pretrained(folder)
    return model


def test_qwen_image_folder_loads_and_matches_diffusers(tmp_path, record_property):
    """The real widths (Qwen-Image's VAE is Wan 2.1's): images (T = 1) and a clip."""
    reference = qwen_folder(tmp_path / "vae", seed=41)
    encoder = load_encoder(tmp_path / "vae")
    assert encoder.config == QWEN_IMAGE
    for frames, size in [(1, (32, 32)), (1, (24, 40)), (5, (16, 24))]:
        video = to_model_video(random_video(frames, *size, seed=frames))
        with torch.no_grad():
            expected = reference.encode(video).latent_dist.mean
        error = rel_err(encoder.encode(video, normalize=False), expected)
        record_property(f"rel_err_{frames}x{size}", error)
        print(f"qwen-image diffusers-folder, {frames} frames {size}: vs diffusers {error:.2e}")
        assert error <= TOLERANCE


def test_hub_qwen_image_repo_from_cache(tmp_path, offline_hub):
    folder = tmp_path / "vae"
    qwen_folder(folder, seed=42, base_dim=8)
    files = {f"vae/{p.name}": p for p in folder.iterdir()}
    build_hub_cache(tmp_path / "cache", "Qwen/Qwen-Image", files)
    encoder = load_encoder("Qwen/Qwen-Image", cache_dir=tmp_path / "cache")
    assert encoder.config == narrow(8, QWEN_IMAGE)


def test_qwen_image_layered_takes_rgba(tmp_path):
    """Qwen-Image-Layered's VAE reads 4 channels: encode takes them, streams (RGB) refuse."""
    reference = qwen_folder(tmp_path / "vae", seed=43, base_dim=8, input_channels=4)
    encoder = load_encoder(tmp_path / "vae")
    assert encoder.config.in_channels == 4 and encoder.config.name == "qwen-image-narrow8"
    video = torch.rand(1, 4, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = reference.encode(video).latent_dist.mean
    assert rel_err(encoder.encode(video, normalize=False), expected) <= TOLERANCE
    with pytest.raises(ValueError, match="4 channels"):
        StreamEncoder(encoder)


# -- configs ----


@pytest.mark.parametrize(
    "cls", ["AutoencoderKLQwenImage21", "AutoencoderKLHunyuanVideo15", "AutoencoderKL"]
)
def test_other_vae_classes_are_refused_by_name(tmp_path, cls):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"_class_name": cls, "base_dim": 96}))
    with pytest.raises(CheckpointError, match=f"describes a {cls}; streamvae encodes with"):
        weights.config_from_diffusers(path)


def test_hub_style_wan22_config_maps_to_the_preset(tmp_path):
    """The TI2V-5B-Diffusers vae/config.json (as its converter writes it; stale keys ignored)."""
    raw = {
        "_class_name": "AutoencoderKLWan",
        "_diffusers_version": "0.35.0.dev0",
        "attn_scales": [],
        "base_dim": 160,
        "clip_output": False,
        "decoder_base_dim": 256,
        "dim_mult": [1, 2, 4, 4],
        "dropout": 0.0,
        "in_channels": 12,
        "is_residual": True,
        "latents_mean": list(WAN22.latents_mean),
        "latents_std": list(WAN22.latents_std),
        "num_res_blocks": 2,
        "out_channels": 12,
        "patch_size": 2,
        "scale_factor_spatial": 16,
        "scale_factor_temporal": 4,
        "temperal_downsample": [False, True, True],
        "z_dim": 48,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    assert weights.config_from_diffusers(path) == WAN22
