import logging
import os

import lpips
import pytest
import torch
from torchvision import models as tv_models

from opensora_vae.perceptual import (
    MissingWeightsError,
    backbone_filename,
    build_lpips,
    default_backbone_path,
    lpips_distance,
)

TV_BUILDERS = {"vgg": tv_models.vgg16, "alex": tv_models.alexnet, "squeeze": tv_models.squeezenet1_1}


def _save_tv_backbone(net, path):
    """A randomly initialised torchvision model saved like the real checkpoint (torchvision key names)."""
    torch.manual_seed(0)
    tv = TV_BUILDERS[net](weights=None)
    state = tv.state_dict()
    # The classifier is irrelevant to LPIPS; keep one small non-feature key to show such keys are ignored.
    extra = [k for k in state if not k.startswith("features.")][-1]
    saved = {k: v for k, v in state.items() if k.startswith("features.") or k == extra}
    torch.save(saved, path)
    return tv


pytestmark = pytest.mark.usefixtures("empty_hub")


@pytest.fixture(scope="module")
def vgg_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "vgg16-random.pth"
    tv = _save_tv_backbone("vgg", path)
    return tv, path


@pytest.fixture(scope="module")
def vgg_model(vgg_pair):
    return build_lpips("vgg", backbone_path=vgg_pair[1])


@pytest.mark.parametrize("net", ["vgg", "alex", "squeeze"])
def test_backbone_weights_map_onto_lpips_slices(net, tmp_path):
    path = tmp_path / f"{net}.pth"
    tv = _save_tv_backbone(net, path)
    model = build_lpips(net, backbone_path=path)
    tv_params = dict(tv.features.named_parameters())
    lp_params = dict(model.net.named_parameters())
    assert len(lp_params) > 0
    checked = 0
    for name, p in lp_params.items():
        # lpips name: slice<k>.<torchvision features index>.<param>
        _, idx, rest = name.split(".", 2)
        torch.testing.assert_close(p, tv_params[f"{idx}.{rest}"], rtol=0, atol=0)
        checked += 1
    assert checked == len(lp_params)


def test_lpips_features_equal_torchvision_features(vgg_pair, vgg_model):
    tv, model = vgg_pair[0], vgg_model
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        relu5_3 = model.net(x).relu5_3
        expected = tv.features[:30](x)  # lpips's last slice ends at torchvision features[29]
    torch.testing.assert_close(relu5_3, expected)


def test_linear_layers_come_from_package_and_model_is_frozen(vgg_model):
    model = vgg_model
    shipped = torch.load(
        os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth"), map_location="cpu"
    )
    for k in range(5):
        torch.testing.assert_close(model.state_dict()[f"lin{k}.model.1.weight"], shipped[f"lin{k}.model.1.weight"])
    assert not model.training
    assert all(not m.training for m in model.modules())
    assert all(not p.requires_grad for p in model.parameters())


def test_construction_prints_nothing(capsys):
    build_lpips("alex", random_backbone=True)
    captured = capsys.readouterr()
    assert captured.out == ""


def test_missing_backbone_names_file_and_places(empty_hub):
    with pytest.raises(MissingWeightsError) as info:
        build_lpips("vgg")
    msg = str(info.value)
    expected = empty_hub / "checkpoints" / "vgg16-397923af.pth"
    assert default_backbone_path("vgg") == expected
    assert "vgg16-397923af.pth" in msg and str(expected) in msg
    assert "lpips_backbone_path" in msg
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.searched == [str(expected)]


def test_missing_explicit_path_is_reported(tmp_path):
    missing = tmp_path / "nowhere" / "alex.pth"
    with pytest.raises(MissingWeightsError, match="alexnet-owt-7be5be79.pth") as info:
        build_lpips("alex", backbone_path=missing)
    assert str(missing) in str(info.value)


def test_hub_cache_file_is_used_by_default(empty_hub):
    target = empty_hub / "checkpoints" / backbone_filename("alex")
    target.parent.mkdir(parents=True)
    tv = _save_tv_backbone("alex", target)
    model = build_lpips("alex")
    torch.testing.assert_close(model.net.slice1[0].weight, tv.features[0].weight)


def test_wrong_architecture_file_is_rejected(tmp_path):
    path = tmp_path / "squeeze.pth"
    _save_tv_backbone("squeeze", path)
    with pytest.raises(ValueError, match="torchvision state dict"):
        build_lpips("alex", backbone_path=path)


def test_unknown_net_is_rejected():
    with pytest.raises(ValueError, match="unknown LPIPS net"):
        build_lpips("resnet", random_backbone=True)


def test_random_backbone_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="opensora_vae.perceptual"):
        model = build_lpips("alex", random_backbone=True)
    assert "RANDOM" in caplog.text
    assert isinstance(model, lpips.LPIPS)


def test_lpips_distance_shapes_and_values(vgg_model):
    model = vgg_model
    torch.manual_seed(1)
    a = torch.rand(3, 3, 32, 32) * 2 - 1
    b = (a + 0.3 * torch.randn_like(a)).clamp(-1, 1)
    with torch.no_grad():
        d = lpips_distance(model, a, b)
        same = lpips_distance(model, a, a)
        direct = model(a, b).flatten()
        single = lpips_distance(model, a[1:2], b[1:2])
    assert d.shape == (3,)
    torch.testing.assert_close(d, direct)
    torch.testing.assert_close(single, d[1:2])
    assert torch.all(d > 0)
    torch.testing.assert_close(same, torch.zeros(3), atol=1e-6, rtol=0)


def test_lpips_distance_rejects_bad_shapes():
    model = build_lpips("alex", random_backbone=True)
    with pytest.raises(ValueError, match=r"\(2, 3, 64, 64\).*\(2, 3, 32, 32\)"):
        lpips_distance(model, torch.zeros(2, 3, 64, 64), torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="3, H, W"):
        lpips_distance(model, torch.zeros(2, 4, 64, 64), torch.zeros(2, 4, 64, 64))
