"""Fast paths give the plain path's outputs: compiled == eager (tiny model), build_model's compile option."""
from __future__ import annotations

import os

import pytest
import torch

from opensora_vae import build_model

from helpers import tiny_model_cfg, tiny_pipeline


def test_build_model_compile_option_compiles_the_four_networks_in_place():
    torch.manual_seed(0)
    plain = build_model(tiny_model_cfg())
    torch.manual_seed(0)
    compiled = build_model(dict(tiny_model_cfg(), compile=dict(mode="default")))
    # same weights and state_dict names (nn.Module.compile wraps the call, not the module)
    assert list(plain.state_dict()) == list(compiled.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), compiled.state_dict().values()))
    assert all(net._compiled_call_impl is not None for net in compiled._compiled_parts())
    assert all(net._compiled_call_impl is None for net in plain._compiled_parts())
    with pytest.raises(TypeError, match="enable_compile"):
        build_model(dict(tiny_model_cfg()["vae_temporal"], compile=True))
    one = build_model(dict(tiny_model_cfg(), compile=dict(parts="temporal")))
    assert all(net._compiled_call_impl is not None for net in one._compiled_parts("temporal"))
    assert all(net._compiled_call_impl is None for net in one._compiled_parts("spatial"))
    with pytest.raises(ValueError, match="spatial"):
        build_model(dict(tiny_model_cfg(), compile=dict(parts="everything")))


@pytest.mark.skipif(os.environ.get("OPENSORA_VAE_TEST_COMPILE") != "1",
                    reason="inductor compiles four C++ graphs: minutes on 2 shared cores; set OPENSORA_VAE_TEST_COMPILE=1")
def test_compiled_pipeline_matches_eager():
    # One clip shape and micro_batch_size=None: one graph per network.
    model = tiny_pipeline()
    x = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model.spatial_vae.micro_batch_size = None  # one spatial shape -> one graph per network
    with torch.inference_mode():
        z = model.encode(x, sample_posterior=False)
        want = model.decode(z, num_frames=9)
        model.enable_compile()
        z_c = model.encode(x, sample_posterior=False)
        got = model.decode(z_c, num_frames=9)
    assert torch.allclose(z_c, z, atol=1e-5, rtol=1e-5)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_lpips_and_flolpips_batched_equal_one_frame_per_call():
    from opensora_vae.metrics import flolpips, lpips
    from opensora_vae.metrics.flolpips import flolpips_pairs, get_flow_model
    from opensora_vae.perceptual import build_lpips, lpips_distance

    torch.manual_seed(0)
    model = build_lpips("alex", random_backbone=True)
    flow = get_flow_model(None, "cpu", random_init=True)
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 3, 3, 64, 64, generator=g)
    b = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    x, y = a.flatten(0, 1), b.flatten(0, 1)
    with torch.no_grad():
        one = torch.cat([lpips_distance(model, x[i:i + 1] * 2 - 1, y[i:i + 1] * 2 - 1) for i in range(len(x))])
        pairs = torch.cat([flolpips_pairs(a[i, t:t + 1], a[i, t + 1:t + 2], b[i, t:t + 1], b[i, t + 1:t + 2], model, flow)
                           for i in range(2) for t in range(2)])
    assert torch.allclose(lpips(a, b, model=model).flatten(), one, rtol=1e-5, atol=1e-7)
    got = flolpips(a, b, lpips_model=model, flow_model=flow)[:, :-1].flatten()
    assert torch.allclose(got, pairs, rtol=1e-4, atol=1e-7)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")
@pytest.mark.parametrize("batch", [1, 2])
def test_temporal_vae_onednn_path_equals_pytorchs_conv3d(batch):
    # Latents of a 64x64 clip: PyTorch's own heuristic would take its native conv3d here. Batch 2: the weight
    # gradient sums over the batch (it runs as a convolution with batch and channels swapped).
    torch.manual_seed(0)
    vae = build_model(tiny_model_cfg()["vae_temporal"])
    x = torch.randn(batch, 4, 9, 8, 8)

    def run():
        vae.zero_grad(set_to_none=True)
        out = vae.decode(vae.encode(x).mode(), num_frames=9)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in vae.parameters()]

    fast, fast_grads = run()
    with torch.backends.mkldnn.flags(enabled=False):
        plain, plain_grads = run()
    # Two kernels' rounding (oneDNN's and PyTorch's native conv3d, each as the CPU gets it): relative to the output's
    # scale (measured 1.9e-6 of it; outputs up to 2.6), as the gradient test below does.
    torch.testing.assert_close(fast, plain, atol=1e-5 * float(plain.abs().max()), rtol=1e-5)
    for a, b in zip(fast_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")
@pytest.mark.parametrize("stride", [(1, 1, 1), (2, 1, 1), (2, 2, 2), (3, 1, 2)])
@pytest.mark.parametrize("shape", [(2, 5, 9, 7, 6), (1, 4, 10, 5, 5)])
@pytest.mark.parametrize("padding", [(0, 1, 1), (1, 1, 1)])
def test_onednn_conv3d_gradients_equal_pytorchs(stride, shape, padding):
    """Input, weight and bias gradients of the oneDNN path (strides that leave input rows unused included)."""
    from opensora_vae.models.speed import onednn

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(shape[1], 6, 3, stride=stride, padding=padding)
    x = torch.randn(shape, requires_grad=True)
    y = onednn.forward(conv, x)
    g = torch.randn_like(y)
    fast = torch.autograd.grad(y, [x, conv.weight, conv.bias], g)
    with torch.backends.mkldnn.flags(enabled=False):
        plain = torch.autograd.grad(conv(x), [x, conv.weight, conv.bias], g)
    for a, b in zip(fast, plain):  # sums of hundreds of products: rounding relative to their scale
        torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-5)
