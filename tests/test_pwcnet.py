"""PWC-Net: the plain-PyTorch cost volume, warping, the sniklaus layer layout and offline weight loading."""
from __future__ import annotations

import pytest
import torch

from opensora_vae.metrics.pwcnet import (
    WEIGHTS_ENV,
    WEIGHTS_FILENAME,
    PWCNet,
    backwarp,
    correlation,
    load_pwcnet,
)
from opensora_vae.perceptual import MissingWeightsError


def test_correlation_matches_naive_loops():
    g = torch.Generator().manual_seed(0)
    f1 = torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64)
    f2 = torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64)
    out = correlation(f1, f2)
    assert out.shape == (2, 81, 6, 7)
    want = torch.zeros_like(out)
    _, c, h, w = f1.shape
    for dy in range(-4, 5):
        for dx in range(-4, 5):
            k = (dy + 4) * 9 + (dx + 4)
            for y in range(h):
                for x in range(w):
                    if 0 <= y + dy < h and 0 <= x + dx < w:
                        want[:, k, y, x] = (f1[:, :, y, x] * f2[:, :, y + dy, x + dx]).sum(dim=1) / c
    assert torch.allclose(out, want, atol=1e-12)


def test_correlation_peaks_at_the_true_displacement():
    # second = first moved by (dy, dx) = (1, -2): the matching channel is (1 + 4) * 9 + (-2 + 4) = 47
    f1 = torch.randn(1, 8, 20, 20, generator=torch.Generator().manual_seed(1))
    f1 = f1 / f1.norm(dim=1, keepdim=True)  # unit vectors: a pixel correlates most with itself
    f2 = torch.roll(f1, shifts=(1, -2), dims=(2, 3))
    out = correlation(f1, f2)[0, :, 6:14, 6:14]
    assert (out.argmax(dim=0) == 47).all()


def test_backwarp_zero_and_integer_flow():
    x = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(2))
    zero = torch.zeros(2, 2, 5, 6)
    assert torch.allclose(backwarp(x, zero), x, atol=1e-6)
    flow = zero.clone()
    # the reference scales flow by 2 / (W - 1) on an align_corners=False grid, so (W - 1) / W moves one pixel
    flow[:, 0] = 5.0 / 6.0
    out = backwarp(x, flow)
    assert torch.allclose(out[..., :-1], x[..., 1:], atol=1e-5)
    assert out[..., -1].abs().max().item() == 0.0  # footprint leaves the frame: masked


def test_layout_matches_sniklaus_state_dict():
    sd = PWCNet().state_dict()
    assert len(sd) == 126
    assert sum(v.numel() for v in sd.values()) == 9_374_274
    shapes = {
        "netExtractor.netOne.0.weight": (16, 3, 3, 3),
        "netExtractor.netSix.4.weight": (196, 196, 3, 3),
        "netSix.netOne.0.weight": (128, 81, 3, 3),
        "netFiv.netUpflow.weight": (2, 2, 4, 4),
        "netFiv.netUpfeat.weight": (81 + 448, 2, 4, 4),
        "netTwo.netOne.0.weight": (128, 81 + 32 + 4, 3, 3),
        "netTwo.netSix.0.weight": (2, 81 + 32 + 4 + 448, 3, 3),
        "netRefiner.netMain.0.weight": (128, 81 + 32 + 4 + 448, 3, 3),
        "netRefiner.netMain.12.weight": (2, 32, 3, 3),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("netSix.netUp") for k in sd)  # the coarsest level has no upsampling


def test_random_init_forward_shape():
    net = load_pwcnet(random_init=True)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(2, 3, 40, 72, generator=g), torch.rand(2, 3, 40, 72, generator=g)
    with torch.no_grad():
        flow = net(a, b)
    assert flow.shape == (2, 2, 40, 72) and torch.isfinite(flow).all()


def test_loads_published_key_names_strictly(tmp_path):
    torch.manual_seed(4)
    src = PWCNet()
    # the published file uses the pre-rename 'module' attribute names
    published = {k.replace("net", "module"): v for k, v in src.state_dict().items()}
    path = tmp_path / WEIGHTS_FILENAME
    torch.save(published, path)
    net = load_pwcnet(path)
    for k, v in src.state_dict().items():
        assert torch.equal(net.state_dict()[k], v)
    del published["moduleRefiner.moduleMain.12.bias"]
    torch.save(published, path)
    with pytest.raises(RuntimeError, match="netRefiner.netMain.12.bias"):
        load_pwcnet(path)


def test_weights_from_env_var(tmp_path, monkeypatch):
    path = tmp_path / "pwc.pt"
    torch.save(PWCNet().state_dict(), path)
    monkeypatch.setenv(WEIGHTS_ENV, str(path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    assert isinstance(load_pwcnet(), PWCNet)


def test_missing_weights_error_names_file_and_places(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(MissingWeightsError) as err:
        load_pwcnet()
    msg = str(err.value)
    assert WEIGHTS_FILENAME in msg and WEIGHTS_ENV in msg and str(tmp_path / "torch_home") in msg
    assert err.value.searched == [str(tmp_path / "torch_home" / "hub" / "checkpoints" / WEIGHTS_FILENAME)]
    with pytest.raises(MissingWeightsError, match="nope.pytorch"):
        load_pwcnet(tmp_path / "nope.pytorch")
