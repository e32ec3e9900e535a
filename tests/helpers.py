"""Shared test helpers: random weights with real names, the diffusers and Wan oracles, error measures."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest
import torch

from streamvae import WanConfig, WanEncoder
from streamvae.weights import diffusers_config, diffusers_to_streamvae_name, streamvae_to_wan_name

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_ENV = "STREAMVAE_SHARED"
"""The environment variable naming the ``shared`` folder (``data/Megamind.avi``, ...), for a
checkout that is not beside it."""
MEGAMIND = Path("data") / "Megamind.avi"


def in_ci() -> bool:
    """Whether the tests run in CI (``.ci/run`` and CI services set ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(name: str) -> ModuleType:
    """Import a test dependency: where it is missing, skip, except in CI, where that is a
    failure (a broken install must not turn whole files of tests into skips). Use it for test
    dependencies only: a missing GPU stays a skip (the ``cuda`` marker)."""
    if not in_ci():
        return pytest.importorskip(name)
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        pytest.fail(
            f"CI: the test dependency {name!r} does not import ({exc}); scripts/install.sh "
            "installs it",
            pytrace=False,
        )


def _git(*args: str) -> Path | None:
    """A path ``git`` prints for the checkout the tests are in (``None`` without git)."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = done.stdout.strip()
    return (Path(__file__).parent / text).resolve() if done.returncode == 0 and text else None


def shared_candidates() -> list[Path]:
    """Where the ``shared`` folder may be, in order: ``$STREAMVAE_SHARED``; ``shared`` beside
    the tests folder or any folder above it; beside the git checkout (``git rev-parse
    --show-toplevel``/..); beside the main checkout of a git worktree (``--git-common-dir``)."""
    places = [Path(os.environ[SHARED_ENV])] if os.environ.get(SHARED_ENV) else []
    places += [folder / "shared" for folder in Path(__file__).resolve().parents]
    top = _git("rev-parse", "--show-toplevel")
    if top is not None:
        places.append(top.parent / "shared")
    common = _git("rev-parse", "--git-common-dir")  # a worktree's: the main checkout's .git
    if common is not None:
        places.append(common.parent.parent / "shared")
    return list(dict.fromkeys(places))


def shared_file(relative: Path | str) -> Path:
    """A file of the ``shared`` folder (see :func:`shared_candidates`). Where it is nowhere:
    skip, except in CI, where that is a failure (a test on real data must not turn into a skip
    because the checkout moved)."""
    places = shared_candidates()
    for place in places:
        if (place / relative).is_file():
            return place / relative
    looked = ", ".join(str(place / relative) for place in places)
    message = f"{relative} is not in any shared folder (looked at {looked}; set ${SHARED_ENV})"
    if in_ci():
        pytest.fail(f"CI: {message}", pytrace=False)
    pytest.skip(message)


def wan21_keys() -> list[tuple[str, tuple[int, ...]]]:
    """All 194 tensor names and shapes of the real Wan2.1_VAE.pth (a copy of shared/fixtures)."""
    data = json.loads((FIXTURES / "wan21_vae_keys.json").read_text())
    return [(name, tuple(shape)) for name, shape in data["keys"]]


def wan22_keys() -> list[tuple[str, tuple[int, ...]]]:
    """All 196 tensor names and shapes of Wan2.2_VAE.pth (from Wan's vae2_2.py, see the file)."""
    data = json.loads((FIXTURES / "wan22_vae_keys.json").read_text())
    return [(name, tuple(shape)) for name, shape in data["keys"]]


def scaled_keys(keys, encoder_width: int, decoder_width: int, base_dim: int, decoder_dim: int):
    """Real names with every width that is a multiple of the encoder's (decoder's) base width
    scaled to ``base_dim`` (``decoder_dim``): the same topology, narrow."""

    def scale(name: str, d: int) -> int:
        width, to = (
            (decoder_width, decoder_dim)
            if name.startswith(("decoder.", "conv2."))
            else (encoder_width, base_dim)
        )
        return d * to // width if d % width == 0 else d

    return [(name, tuple(scale(name, d) for d in shape)) for name, shape in keys]


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Values that keep activations O(1) through the network: gammas near 1, small weights."""
    if name.endswith("gamma"):
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    if name.endswith("bias"):
        return 0.02 * torch.randn(shape, generator=generator)
    fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
    return torch.randn(shape, generator=generator) * (1.0 / fan_in) ** 0.5


def random_wan_state_dict(seed: int = 0, keys=None) -> dict[str, torch.Tensor]:
    """A random state dict with Wan's real names and shapes (all 194 tensors by default)."""
    generator = torch.Generator().manual_seed(seed)
    return {name: random_tensor(name, shape, generator) for name, shape in (keys or wan21_keys())}


def random_encoder(config: WanConfig, seed: int = 0, dtype=torch.float32) -> WanEncoder:
    """A streamvae encoder of ``config`` with random, well-scaled weights."""
    encoder = WanEncoder(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            param.copy_(random_tensor(name, tuple(param.shape), generator))
    return encoder.to(dtype).eval().requires_grad_(False)


def diffusers_reference(config: WanConfig, decoder_base_dim: int | None = None):
    """diffusers' AutoencoderKLWan with ``config``'s hyper-parameters (random init)."""
    from diffusers import AutoencoderKLWan

    kwargs = diffusers_config(config, decoder_base_dim=decoder_base_dim)
    return AutoencoderKLWan(**kwargs).eval()


def diffusers_twin(encoder: WanEncoder, decoder_base_dim: int | None = 8):
    """diffusers' model holding exactly ``encoder``'s weights (its decoder keeps random init)."""
    reference = diffusers_reference(encoder.config, decoder_base_dim)
    ours = encoder.state_dict()
    theirs = reference.state_dict()
    mapped = 0
    for name in theirs:
        target = diffusers_to_streamvae_name(name)
        if target is not None:
            theirs[name] = ours[target].float().clone()
            mapped += 1
    assert mapped == len(ours)
    reference.load_state_dict(theirs, strict=True)
    return reference


@cache
def official_module(version: str) -> ModuleType:
    """Wan's own ``wan/modules/vae2_1.py`` or ``vae2_2.py``, loaded by file path (they need only
    torch and einops; ``import wan`` would pull in the whole of Wan). From the PyPI package
    ``wan22`` 2.2.11, which scripts/install.sh installs with ``--no-deps``."""
    try:
        dist = importlib.metadata.distribution("wan22")
    except importlib.metadata.PackageNotFoundError:
        why = "Wan's official VAE code is not installed: pip install --no-deps wan22==2.2.11"
        if in_ci():
            pytest.fail(f"CI: {why} (scripts/install.sh installs it)", pytrace=False)
        pytest.skip(why)
    path = Path(str(dist.locate_file(f"wan/modules/vae{version}.py")))
    spec = importlib.util.spec_from_file_location(f"wan_official_vae{version}", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class OfficialVAE:
    """Wan's ``WanVAE_`` (vae2_1.py or vae2_2.py) built for ``config``, with ``encode`` as Wan's."""

    def __init__(self, config: WanConfig, state: dict[str, torch.Tensor], decoder_dim: int = 8):
        version = "2_2" if config.residual else "2_1"
        module = official_module(version)
        shared = ("z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample")
        diffusers = diffusers_config(config)
        kwargs = {"dim": config.base_dim, "dropout": 0.0, **{k: diffusers[k] for k in shared}}
        if config.residual:
            kwargs["dec_dim"] = decoder_dim
        self.model = module.WanVAE_(**kwargs).eval()
        theirs = self.model.state_dict()
        encoder_names = [k for k in theirs if k.startswith(("encoder.", "conv1."))]
        missing = [k for k in encoder_names if k not in state]
        assert not missing, missing[:5]
        # Strict for the encoder: every encoder tensor of Wan's model comes from ``state``.
        self.model.load_state_dict({**theirs, **{k: state[k].float() for k in encoder_names}})
        self.config = config

    @classmethod
    def twin(cls, encoder: WanEncoder) -> OfficialVAE:
        """Wan's model holding ``encoder``'s weights (named by streamvae's map to Wan's names)."""
        state = {
            streamvae_to_wan_name(name, encoder.config): tensor
            for name, tensor in encoder.state_dict().items()
        }
        return cls(encoder.config, state)

    def encode(self, video: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
        scale = [0.0, 1.0]
        if normalize:
            mean = torch.tensor(self.config.latents_mean)
            scale = [mean, 1.0 / torch.tensor(self.config.latents_std)]
        with torch.no_grad():
            return self.model.encode(video.float(), scale)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the project's exactness measure."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def channel_rel_err(a: torch.Tensor, b: torch.Tensor, dim: int = 1) -> float:
    """The worst channel's ``max |a_c - b_c| / max |b_c|`` (channels along ``dim``): unlike
    :func:`rel_err`, a large error in a channel of small values cannot hide behind the largest
    channel's range."""
    a, b = a.float().movedim(dim, 0).flatten(1), b.float().movedim(dim, 0).flatten(1)
    scale = b.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    return float(((a - b).abs().amax(dim=1) / scale).max())


BF16_BOUND = 3e-2
"""bfloat16 against float32: :func:`rel_err` bound."""
BF16_CHANNEL_BOUND = 5e-2
"""... and :func:`channel_rel_err` bound (measured worst channels: narrow8 3.4e-2, Wan 2.1
2.4e-2 on the CPU paths)."""


def assert_bf16_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """A bfloat16 result against float32: overall and in every latent channel (dim 1)."""
    error, worst = rel_err(got, expected), channel_rel_err(got, expected)
    assert error <= BF16_BOUND and worst <= BF16_CHANNEL_BOUND, (error, worst)


def random_video(t: int, h: int, w: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """uint8 frames ``[B, T, H, W, 3]`` (as a camera delivers them)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, t, h, w, 3), generator=generator, dtype=torch.uint8)


def to_model_video(frames: torch.Tensor) -> torch.Tensor:
    """``[B, T, H, W, 3]`` uint8 -> ``[B, 3, T, H, W]`` float in [-1, 1], as the stream converts."""
    return frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def build_hub_cache(cache, repo_id: str, files: dict[str, object]) -> None:
    """The layout huggingface_hub uses: models--org--name/{refs/main, snapshots/<sha>/...}."""
    import shutil

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    for name, source in files.items():
        target = repo / "snapshots" / revision / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)


MEMORY_PROBE = r"""
import json, sys, threading, time
import torch, streamvae

def anon_kib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

peak = [0]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon_kib())
        time.sleep(0.002)

baseline = anon_kib()
thread = threading.Thread(target=sample); thread.start()
encoder = streamvae.load_encoder(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
done.set(); thread.join()
peak[0] = max(peak[0], anon_kib())
params = sum(p.numel() * p.element_size() for p in encoder.parameters())
print(json.dumps({"peak_growth": (peak[0] - baseline) * 1024, "params": params}))
"""


def loading_memory(path, dtype: str) -> dict[str, int]:
    """Peak growth of anonymous memory while a fresh process loads ``path`` (and the encoder's
    parameter bytes): a copy held twice, or a decoder read, shows up in it."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(path), dtype],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def record_reads(monkeypatch) -> list[str]:
    """The names of the tensors ``load_encoder`` reads from now on (in reading order)."""
    from contextlib import contextmanager

    import streamvae.weights as weights

    read: list[str] = []
    original = weights.open_tensors

    @contextmanager
    def recording(path):
        with original(path) as source:
            inner = source.read

            def read_one(name):
                read.append(name)
                return inner(name)

            source.read = read_one
            yield source

    monkeypatch.setattr(weights, "open_tensors", recording)
    return read


def stream_all(stream, frames: torch.Tensor, bursts=None) -> list:
    """Push ``[T, H, W, 3]`` uint8 frames (one by one, or in bursts of the given sizes), flush."""
    latents = []
    if bursts is None:
        for frame in frames:
            latents += stream.push(frame.numpy())
    else:
        start = 0
        for size in bursts:
            latents += stream.push_many([f.numpy() for f in frames[start : start + size]])
            start += size
    return latents + stream.flush()


def stacked(latents) -> torch.Tensor:
    """Latents of one stream as ``[1, z, t, h, w]``."""
    return torch.stack([latent.data for latent in latents], dim=1)[None]
