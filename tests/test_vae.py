"""qwennb.vae: the VAE's causal 3D convolutions as 2D ones on single images, exact up to the order of float sums,
and diffusers' own path for anything else (several frames, cached frames)."""

import copy
import pickle

import pytest
import torch

from qwennb.vae import image_convolutions, use_image_convolutions


@pytest.fixture(scope="module")
def toy_vae():
    from diffusers import AutoencoderKLQwenImage

    from qwennb.models import TOY_MODEL_DIR

    return AutoencoderKLQwenImage.from_pretrained(f"{TOY_MODEL_DIR}/vae").eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def test_one_image_decodes_and_encodes_as_before(toy_vae):
    exact = toy_vae
    fast = copy.deepcopy(toy_vae)
    n = use_image_convolutions(fast)
    assert n > 10 and image_convolutions(fast) == n and image_convolutions(exact) == 0
    assert use_image_convolutions(fast) == n  # again: nothing more changes
    assert fast.state_dict().keys() == exact.state_dict().keys()
    assert image_convolutions(pickle.loads(pickle.dumps(fast))) == n  # a copy sent to a worker keeps it
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 16, 1, 24, 40, generator=g)  # not square: height and width kept apart
    want, got = exact.decode(z).sample, fast.decode(z).sample
    assert got.shape == want.shape == (1, 3, 1, 192, 320)
    assert rel(got, want) < 1e-5
    image = torch.rand(1, 3, 1, 128, 96, generator=g) * 2 - 1
    want, got = exact.encode(image).latent_dist.mean, fast.encode(image).latent_dist.mean
    assert rel(got, want) < 1e-5


@torch.no_grad()
def test_one_image_never_takes_diffusers_3d_path(toy_vae, monkeypatch):
    """The 2D path really runs for a lone frame: diffusers' own forward is not called once in a decode or an
    encode (a condition that never holds would leave the outputs equal and only the speed gone)."""
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

    fast = copy.deepcopy(toy_vae)
    use_image_convolutions(fast)
    calls = []
    real = QwenImageCausalConv3d.forward
    monkeypatch.setattr(
        QwenImageCausalConv3d, "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
    )
    fast.decode(torch.randn(1, 16, 1, 8, 8))
    fast.encode(torch.rand(1, 3, 1, 64, 64) * 2 - 1)
    assert calls == []
    toy_vae.decode(torch.randn(1, 16, 1, 8, 8))  # and the spy does see diffusers' path where it runs
    assert calls


@torch.no_grad()
def test_several_frames_take_diffusers_own_path(toy_vae):
    """A second frame sees the first through the convolutions' cache: the 2D path must not run there."""
    fast = copy.deepcopy(toy_vae)
    use_image_convolutions(fast)
    z = torch.randn(1, 16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    want, got = toy_vae.decode(z).sample, fast.decode(z).sample
    assert got.shape == want.shape and rel(got, want) < 1e-5
    # and the later frames do depend on the earlier ones (so this checks the cache is used)
    alone = toy_vae.decode(z[:, :, 2:3]).sample
    assert alone.shape == want[:, :, -1:].shape and rel(want[:, :, -1:], alone) > 1e-3


def test_the_cpu_plan_applies_it_and_says_so():
    from qwennb.pipeline import build, validate_optimization
    from qwennb.plan import describe_machine, make_plan

    pipe = build(make_plan(describe_machine(host_ram_gb=8), "tiny"))
    assert validate_optimization(pipe)["vae_image_convolutions"] > 0


def test_it_is_applied_where_it_was_measured_only():
    """CPUs and CUDA GPUs (benchmarks/results/vae2d-nvidia-h200: 1.5x, at bf16's rounding floor); not MPS."""
    from qwennb.plan import describe_machine, make_plan
    from qwennb.vae import image_convolutions_measured

    gpu_plan = make_plan(describe_machine(gpu_memory_gb=80, host_ram_gb=128), "qwen-image")
    cpu_plan = make_plan(describe_machine(host_ram_gb=8), "tiny")
    assert gpu_plan.device == "cuda" and image_convolutions_measured(gpu_plan.device)
    assert cpu_plan.device == "cpu" and image_convolutions_measured(cpu_plan.device)
    assert image_convolutions_measured("cuda:1") and not image_convolutions_measured("mps")


def test_a_gpu_plan_takes_it_too():
    """The plan's VAE options are one step for CPUs and CUDA alike (it once sat in the CPU branch only): with a GPU
    plan the 2D path goes on untiled, not tiled. The VAE stays where it is (nothing moves to a GPU here)."""
    from qwennb.pipeline import _apply_vae_plan, build
    from qwennb.plan import describe_machine, make_plan
    from qwennb.vae import image_convolutions

    gpu = describe_machine(gpu_memory_gb=80, host_ram_gb=128)
    for tiling, want in ((False, True), (True, False)):
        pipe = build(
            make_plan(describe_machine(host_ram_gb=8), "tiny", overrides={"enable_vae_tiling": True})
        )
        assert image_convolutions(pipe.vae) == 0  # tiled on the CPU: diffusers' path
        plan = make_plan(gpu, "tiny", overrides={"enable_vae_tiling": tiling})
        assert plan.device == "cuda" and plan.vae_tiling == tiling
        _apply_vae_plan(pipe, plan)
        assert (image_convolutions(pipe.vae) > 0) is want


def test_a_tiled_vae_keeps_diffusers_own_path():
    """Tiled, the 2D path measured slower on an H200 (vae2d-nvidia-h200: 0.64x at 1328x1328): a plan that tiles the
    VAE leaves it alone."""
    from qwennb.pipeline import build, validate_optimization
    from qwennb.plan import describe_machine, make_plan

    plan = make_plan(describe_machine(host_ram_gb=8), "tiny", overrides={"enable_vae_tiling": True})
    assert plan.vae_tiling
    report = validate_optimization(build(plan))
    assert report["vae_tiling"] and report["vae_image_convolutions"] == 0


@torch.no_grad()
def test_uneven_padding_takes_the_2d_path_exactly_too():
    """diffusers pads symmetrically (conv2d then pads itself, width and height apart); a convolution padded
    unevenly is padded first."""
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

    from qwennb.vae import ImageCausalConv3d

    torch.manual_seed(0)
    stock = QwenImageCausalConv3d(4, 6, 3, padding=1)
    fast = copy.deepcopy(stock)
    fast.__class__ = ImageCausalConv3d
    x = torch.randn(1, 4, 1, 9, 7)
    for pad in ((1, 1, 1, 1, 2, 0), (2, 2, 1, 1, 2, 0), (2, 0, 1, 0, 2, 0)):
        stock._padding = fast._padding = pad
        want, got = stock(x), fast(x)
        assert got.shape == want.shape and rel(got, want) < 1e-6, pad
