"""Loading every real checkpoint layout, held to diffusers' AutoencoderKLWan on the same weights."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import streamvae.weights as weights
from helpers import (
    build_hub_cache,
    diffusers_reference,
    loading_memory,
    random_video,
    random_wan_state_dict,
    record_reads,
    rel_err,
    to_model_video,
    wan21_keys,
)
from streamvae import LIGHTVAE, WAN21, WAN22, CheckpointError, WanEncoder, load_encoder, narrow

TOLERANCE = 1e-5
MEAN = torch.tensor(WAN21.latents_mean).view(1, -1, 1, 1, 1)
STD = torch.tensor(WAN21.latents_std).view(1, -1, 1, 1, 1)


def narrow_keys(base_dim: int = 8) -> list[tuple[str, tuple[int, ...]]]:
    """The real 194 names with every width that is a multiple of 96 scaled to ``base_dim``."""
    return [
        (name, tuple(d * base_dim // 96 if d % 96 == 0 else d for d in shape))
        for name, shape in wan21_keys()
    ]


def write_layouts(state: dict[str, torch.Tensor], config, folder) -> dict[str, object]:
    """The same weights as Wan .pth, ComfyUI .safetensors, a diffusers folder and its file."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    reference = diffusers_reference(config)
    reference.load_state_dict(convert_wan_vae_to_diffusers(dict(state)), strict=True)
    torch.save(state, folder / "Wan2.1_VAE.pth")
    save_file(state, folder / "wan_2.1_vae.safetensors")
    reference.save_pretrained(folder / "diffusers")
    return {
        "wan-pth": folder / "Wan2.1_VAE.pth",
        "comfyui-safetensors": folder / "wan_2.1_vae.safetensors",
        "diffusers-folder": folder / "diffusers",
        "diffusers-file": folder / "diffusers" / "diffusion_pytorch_model.safetensors",
        "reference": reference,
    }


@pytest.fixture(scope="module")
def full_layouts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan21")
    return write_layouts(random_wan_state_dict(seed=11), WAN21, folder)


@pytest.fixture(scope="module")
def narrow_layouts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("narrow")
    state = random_wan_state_dict(seed=12, keys=narrow_keys())
    layouts = write_layouts(state, narrow(8), folder)
    layouts["state"] = state
    return layouts


def reference_latents(reference, video: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (reference.encode(video).latent_dist.mean - MEAN) / STD


LAYOUTS = ["wan-pth", "comfyui-safetensors", "diffusers-folder", "diffusers-file"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_matches_diffusers_full_config(full_layouts, layout, record_property):
    encoder = load_encoder(full_layouts[layout])
    assert encoder.config.dims == WAN21.dims
    video = to_model_video(random_video(5, 32, 32, seed=1))
    error = rel_err(encoder.encode(video), reference_latents(full_layouts["reference"], video))
    record_property("rel_err", error)
    print(f"{layout}: max relative error {error:.2e}")
    assert error <= TOLERANCE


@pytest.mark.parametrize(
    "frames, size", [(1, (32, 32)), (9, (32, 32)), (5, (48, 80)), (9, (24, 40))]
)
def test_full_config_over_lengths_and_sizes(full_layouts, frames, size):
    encoder = load_encoder(full_layouts["wan-pth"])
    video = to_model_video(random_video(frames, *size, seed=frames))
    expected = reference_latents(full_layouts["reference"], video)
    got = encoder.encode(video)
    assert got.shape == expected.shape == (1, 16, 1 + (frames - 1) // 4, size[0] // 8, size[1] // 8)
    assert rel_err(got, expected) <= TOLERANCE


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_the_same_values(narrow_layouts, layout):
    reference = load_encoder(narrow_layouts["wan-pth"]).state_dict()
    loaded = load_encoder(narrow_layouts[layout]).state_dict()
    assert loaded.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(loaded[name], tensor), name


def test_narrow_layout_matches_diffusers(narrow_layouts):
    encoder = load_encoder(narrow_layouts["comfyui-safetensors"])
    assert encoder.config.dims == narrow(8).dims
    for frames in (3, 7, 10):
        video = to_model_video(random_video(frames, 16, 24, seed=frames))
        assert (
            rel_err(encoder.encode(video), reference_latents(narrow_layouts["reference"], video))
            <= TOLERANCE
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_is_honoured(narrow_layouts, dtype):
    encoder = load_encoder(narrow_layouts["wan-pth"], dtype=dtype, device="cpu")
    assert {p.dtype for p in encoder.parameters()} == {dtype}
    assert {p.device.type for p in encoder.parameters()} == {"cpu"}
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.training


@pytest.mark.parametrize("layout", ["wan-pth", "comfyui-safetensors", "diffusers-folder"])
def test_only_encoder_tensors_are_read(narrow_layouts, layout, monkeypatch):
    read = record_reads(monkeypatch)
    encoder = load_encoder(narrow_layouts[layout])
    assert len(read) == len(encoder.state_dict()) == 86
    assert not [n for n in read if n.startswith(("decoder.", "conv2.", "post_quant_conv."))]


# -- broken inputs ----


def test_nonexistent_path():
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_encoder("/nonexistent/Wan2.1_VAE.pth")


def test_unknown_file_type(tmp_path):
    path = tmp_path / "weights.onnx"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"unknown checkpoint type '.onnx'"):
        load_encoder(path)


@pytest.mark.parametrize("name", ["Wan2.1_VAE.pth", "wan_2.1_vae.safetensors"])
def test_truncated_file(narrow_layouts, tmp_path, name):
    source = narrow_layouts["wan-pth" if name.endswith(".pth") else "comfyui-safetensors"]
    data = source.read_bytes()
    truncated = tmp_path / name
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_encoder(truncated)


def test_decoder_only_file(narrow_layouts, tmp_path):
    state = {
        k: v for k, v in narrow_layouts["state"].items() if k.startswith(("decoder.", "conv2."))
    }
    path = tmp_path / "decoder.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError, match="only decoder tensors"):
        load_encoder(path)


def test_wrong_shapes_missing_and_unexpected_are_listed_together(narrow_layouts, tmp_path):
    state = dict(narrow_layouts["state"])
    state["encoder.downsamples.0.residual.2.weight"] = torch.zeros(8, 8, 3, 3, 1)
    del state["encoder.head.2.bias"]
    del state["conv1.weight"]
    state["encoder.middle.3.extra"] = torch.zeros(2)
    path = tmp_path / "broken.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError) as info:
        load_encoder(path)
    message = str(info.value)
    assert "layout detected: wan" in message
    assert "2 missing" in message and "encoder.head.2.bias" in message and "conv1.weight" in message
    assert "1 unexpected" in message and "encoder.middle.3.extra" in message
    assert "1 mis-shaped" in message
    assert (
        "encoder.downsamples.0.residual.2.weight: [8, 8, 3, 3, 1], expected [8, 8, 3, 3, 3]"
        in message
    )


def test_not_a_vae_at_all(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"model.layer.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=r"not a Wan VAE checkpoint"):
        load_encoder(path)


class CodePayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_a_code_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"encoder.conv1.weight": torch.zeros(1), "payload": CodePayload(marker)}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_encoder(path)
    assert not marker.exists()


def test_folder_without_config(narrow_layouts, tmp_path):
    folder = tmp_path / "vae"
    folder.mkdir()
    shutil.copy(narrow_layouts["diffusers-file"], folder)
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_encoder(folder)


def test_wan21_weights_under_a_wan22_config_are_refused(narrow_layouts, tmp_path):
    folder = tmp_path / "vae"
    shutil.copytree(narrow_layouts["diffusers-folder"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(is_residual=True, patch_size=2, in_channels=12)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"does not fit the wan2\.2-narrow8 encoder") as info:
        load_encoder(folder)
    assert "encoder.down_blocks.0.resnets.0.conv1.weight" in str(info.value)  # missing


# -- hub, offline against a locally built cache ----


def test_hub_wan_repo_from_cache(narrow_layouts, tmp_path, offline_hub):
    build_hub_cache(
        tmp_path, "Wan-AI/Wan2.1-T2V-1.3B", {"Wan2.1_VAE.pth": narrow_layouts["wan-pth"]}
    )
    encoder = load_encoder("Wan-AI/Wan2.1-T2V-1.3B", cache_dir=tmp_path)
    expected = load_encoder(narrow_layouts["wan-pth"]).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in encoder.state_dict().items())


def test_hub_diffusers_repo_from_cache(narrow_layouts, tmp_path, offline_hub):
    folder = narrow_layouts["diffusers-folder"]
    build_hub_cache(
        tmp_path,
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        {
            "vae/config.json": folder / "config.json",
            "vae/diffusion_pytorch_model.safetensors": folder
            / "diffusion_pytorch_model.safetensors",
        },
    )
    encoder = load_encoder("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", cache_dir=tmp_path)
    expected = load_encoder(folder).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in encoder.state_dict().items())


def test_hub_repo_not_in_cache(tmp_path, offline_hub):
    with pytest.raises(CheckpointError, match="none of"):
        load_encoder("Wan-AI/Not-There", cache_dir=tmp_path)


def test_name_maps_invert_each_other():
    encoder_names = [n for n, _ in wan21_keys() if weights.wan_to_streamvae_name(n) is not None]
    assert len(encoder_names) == 86
    ours = [weights.wan_to_streamvae_name(n) for n in encoder_names]
    assert sorted(ours) == sorted(WanEncoder(narrow(8)).state_dict())
    assert [weights.streamvae_to_wan_name(n) for n in ours] == encoder_names
    for name in ours:
        assert (
            weights.diffusers_to_streamvae_name(weights.streamvae_to_diffusers_name(name)) == name
        )


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["wan-pth", "comfyui-safetensors"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_never_holds_the_weights_twice(full_layouts, layout, dtype):
    """Anonymous memory while loading the full 508 MB VAE stays near the encoder's own size."""
    figures = loading_memory(full_layouts[layout], dtype)
    print(layout, dtype, figures)
    # One copy of the encoder (205 MiB in float32) plus transients of one tensor at a time.
    assert figures["peak_growth"] < 1.25 * figures["params"] + 64 * 2**20


@pytest.mark.parametrize(
    "config",
    [WAN21, narrow(8), WAN22, narrow(8, WAN22), LIGHTVAE],
    ids=["wan2.1", "narrow8", "wan2.2", "wan2.2-narrow8", "lightvae"],
)
def test_diffusers_config_round_trips(tmp_path, config):
    """The keyword arguments streamvae gives AutoencoderKLWan read back as the same topology."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(weights.diffusers_config(config)))
    read = weights.config_from_diffusers(path)
    assert dataclasses.replace(read, name=config.name) == config
