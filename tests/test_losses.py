import logging
import math
from typing import NamedTuple, Optional

import pytest
import torch
from mmengine.config import Config
from torchvision import models as tv_models

from opensora_vae.losses import VAELoss, build_loss
from opensora_vae.models.distributions import DiagonalGaussianDistribution
from opensora_vae.perceptual import MissingWeightsError, build_lpips, lpips_distance


class Out(NamedTuple):
    x_rec: Optional[torch.Tensor]
    x_z_rec: Optional[torch.Tensor]
    z: Optional[torch.Tensor]
    posterior: DiagonalGaussianDistribution
    x_z: Optional[torch.Tensor]


pytestmark = pytest.mark.usefixtures("empty_hub")


@pytest.fixture(scope="module")
def alex_file(tmp_path_factory):
    """A randomly initialised torchvision AlexNet standing in for the ImageNet weights file."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "alexnet-random.pth"
    torch.save(tv_models.alexnet(weights=None).state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def alex_lpips(alex_file):
    return build_lpips("alex", backbone_path=alex_file)


def perceptual_loss(alex_file, **kw):
    kw.setdefault("perceptual_loss_weight", 0.1)
    return VAELoss(lpips_net="alex", lpips_backbone_path=alex_file, **kw)


def make_batch(b=2, t=2, h=32, w=32, tz=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    tz = t if tz is None else tz
    x = torch.rand(b, 3, t, h, w, generator=g) * 2 - 1
    x_rec = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    x_z = torch.randn(b, 4, t, h // 8, w // 8, generator=g)
    x_z_rec = x_z + 0.3 * torch.randn(x_z.shape, generator=g)
    z = torch.randn(b, 4, tz, h // 8, w // 8, generator=g)
    posterior = DiagonalGaussianDistribution(torch.randn(b, 8, tz, h // 8, w // 8, generator=g).to(dtype))
    cast = lambda v: v.to(dtype)  # noqa: E731
    return cast(x), Out(cast(x_rec), cast(x_z_rec), cast(z), posterior, cast(x_z))


def direct_nll(x, y, logvar, per_frame_extra=None):
    """The recipe written element by element: (|x-y| [+ extra per frame]) / exp(lv) + lv, summed, / frames."""
    rec = (x - y).abs()
    if per_frame_extra is not None:
        rec = rec + per_frame_extra[:, None, :, None, None]  # (B, T) broadcast over C, H, W
    return ((rec / math.exp(logvar)) + logvar).sum() / (x.shape[0] * x.shape[2])


def test_nll_logvar_zero_is_l1_sum_over_frames():
    loss = VAELoss(perceptual_loss_weight=0)
    x, y = torch.randn(2, 3, 3, 4, 4), torch.randn(2, 3, 3, 4, 4)
    got = loss.nll(x, y)
    torch.testing.assert_close(got, (x - y).abs().sum() / 6)
    assert got.shape == ()


def test_nll_logvar_log2():
    loss = VAELoss(perceptual_loss_weight=0, logvar_init=math.log(2.0))
    x, y = torch.randn(1, 4, 2, 3, 5), torch.randn(1, 4, 2, 3, 5)
    expected = ((x - y).abs() / 2 + math.log(2.0)).sum() / 2
    torch.testing.assert_close(loss.nll(x, y), expected)
    torch.testing.assert_close(loss.nll(x, y), direct_nll(x, y, math.log(2.0)))


def test_perceptual_term_adds_weighted_lpips_per_frame(alex_file, alex_lpips):
    w, lv = 0.25, 0.5
    loss = perceptual_loss(alex_file, perceptual_loss_weight=w, logvar_init=lv)
    x, out = make_batch(b=2, t=3)
    y = out.x_rec
    with torch.no_grad():
        lp = torch.stack(
            [
                torch.stack([lpips_distance(alex_lpips, x[bi, :, ti][None], y[bi, :, ti][None])[0] for ti in range(3)])
                for bi in range(2)
            ]
        )  # (B, T), computed frame by frame, independently of the loss's batching
        with_p = loss.nll(x, y, perceptual=True)
        without_p = loss.nll(x, y, perceptual=False)
    assert torch.all(lp > 0)
    torch.testing.assert_close(with_p, direct_nll(x, y, lv, per_frame_extra=w * lp))
    c, h, wd = x.shape[1], x.shape[3], x.shape[4]
    torch.testing.assert_close(with_p - without_p, w * lp.sum() * c * h * wd / math.exp(lv) / 6, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(without_p, direct_nll(x, y, lv))


def test_forward_all_terms_single_frame(alex_file, alex_lpips):
    loss = perceptual_loss(
        alex_file, use_real_rec_loss=True, use_z_rec_loss=True, use_image_identity_loss=True
    )
    x, out = make_batch(b=2, t=1)
    with torch.no_grad():
        terms = loss(x, out)
    assert set(terms) == {"rec_nll", "lpips", "z_rec_nll", "identity_nll", "kl", "l1", "logvar", "loss"}
    torch.testing.assert_close(terms["rec_nll"], loss.nll(x, out.x_rec, perceptual=True))
    # Latent terms never carry the perceptual term (they are not pixels).
    torch.testing.assert_close(terms["z_rec_nll"], direct_nll(out.x_z, out.x_z_rec, 0.0))
    torch.testing.assert_close(terms["identity_nll"], direct_nll(out.x_z, out.z, 0.0))
    torch.testing.assert_close(terms["kl"], out.posterior.kl().sum() / 2 * 1e-6)
    torch.testing.assert_close(
        terms["loss"], terms["rec_nll"] + terms["z_rec_nll"] + terms["identity_nll"] + terms["kl"]
    )
    torch.testing.assert_close(terms["l1"], (x - out.x_rec).abs().mean())
    with torch.no_grad():
        lp = lpips_distance(alex_lpips, x[:, :, 0], out.x_rec[:, :, 0]).mean()
    torch.testing.assert_close(terms["lpips"], lp)
    torch.testing.assert_close(terms["logvar"], torch.tensor(0.0))


def test_identity_term_only_for_single_frame_clips():
    loss = VAELoss(perceptual_loss_weight=0, use_z_rec_loss=True, use_image_identity_loss=True)
    x, out = make_batch(t=3)
    terms = loss(x, out)
    assert "identity_nll" not in terms and "rec_nll" not in terms
    torch.testing.assert_close(terms["loss"], terms["z_rec_nll"])
    x1, out1 = make_batch(t=1)
    terms1 = loss(x1, out1)
    torch.testing.assert_close(terms1["loss"], terms1["z_rec_nll"] + terms1["identity_nll"])


def test_kl_formula_and_weight():
    loss = VAELoss(perceptual_loss_weight=0, kl_loss_weight=1e-3)
    params = torch.randn(3, 8, 2, 4, 4)
    post = DiagonalGaussianDistribution(params)
    mu, lv = params[:, :4], params[:, 4:]
    expected = 0.5 * (mu**2 + lv.exp() - 1 - lv).sum() / 3 * 1e-3
    torch.testing.assert_close(loss.kl(post), expected)
    assert VAELoss(perceptual_loss_weight=0, kl_loss_weight=0).kl(post).item() == 0.0


def test_kl_enters_total_only_with_pixel_reconstruction():
    x, out = make_batch(t=2)
    z_only = VAELoss(perceptual_loss_weight=0, kl_loss_weight=1.0, use_z_rec_loss=True)(x, out)
    assert z_only["kl"].item() > 0  # still reported
    torch.testing.assert_close(z_only["loss"], z_only["z_rec_nll"])
    real = VAELoss(perceptual_loss_weight=0, kl_loss_weight=1.0, use_real_rec_loss=True)(x, out)
    torch.testing.assert_close(real["loss"], real["rec_nll"] + real["kl"])
    torch.testing.assert_close(real["rec_nll"], direct_nll(x, out.x_rec, 0.0))


def test_logvar_is_fixed_by_default():
    loss = VAELoss(perceptual_loss_weight=0, use_real_rec_loss=True)
    assert not loss.logvar.requires_grad
    x, out = make_batch(t=2)
    loss(x, out._replace(x_rec=out.x_rec.clone().requires_grad_(True)))["loss"].backward()
    assert loss.logvar.grad is None and list(loss.state_dict()) == ["logvar"]


def test_learned_logvar_gets_its_gradient_and_only_it_is_saved(alex_file):
    loss = perceptual_loss(alex_file, use_real_rec_loss=True, learn_logvar=True)
    x, out = make_batch(t=2)
    x_rec = out.x_rec.clone().requires_grad_(True)
    terms = loss(x, out._replace(x_rec=x_rec))
    terms["loss"].backward()
    # d/dlv [(R e^-lv + lv N) / F] at lv = 0 equals N/F - rec_nll.
    frames = x.shape[0] * x.shape[2]
    expected_grad = x.numel() / frames - terms["rec_nll"].detach()
    torch.testing.assert_close(loss.logvar.grad, expected_grad)
    assert x_rec.grad is not None and x_rec.grad.abs().sum() > 0
    assert list(loss.state_dict()) == ["logvar"]
    assert [n for n, _ in loss.named_parameters()] == ["logvar"]
    assert loss._lpips is not None and all(p.grad is None for p in loss._lpips.parameters())

    restored = VAELoss(perceptual_loss_weight=0)
    restored.load_state_dict({"logvar": torch.tensor(1.5)})
    assert restored.logvar.item() == 1.5


def test_missing_backbone_raises_with_path(empty_hub, tmp_path):
    with pytest.raises(MissingWeightsError) as info:
        VAELoss(use_real_rec_loss=True)
    assert str(empty_hub / "checkpoints" / "vgg16-397923af.pth") in str(info.value)
    explicit = tmp_path / "mine" / "vgg16.pth"
    with pytest.raises(MissingWeightsError, match="vgg16.pth") as info:
        VAELoss(use_real_rec_loss=True, lpips_backbone_path=str(explicit))
    assert str(explicit) in str(info.value)


def test_allow_missing_lpips_warns_and_drops_perceptual(caplog):
    with caplog.at_level(logging.WARNING, logger="opensora_vae.losses"):
        loss = VAELoss(use_real_rec_loss=True, allow_missing_lpips=True)
    assert "perceptual loss DISABLED" in caplog.text and "vgg16-397923af.pth" in caplog.text
    assert loss.perceptual_loss_weight == 0.0
    x, out = make_batch(t=2)
    terms = loss(x, out)
    assert "lpips" not in terms
    torch.testing.assert_close(terms["rec_nll"], direct_nll(x, out.x_rec, 0.0))


def test_lpips_not_needed_when_unused():
    # The hub cache is empty: only stages that use the perceptual term may ask for the backbone.
    for loss in (VAELoss(use_z_rec_loss=True), VAELoss(perceptual_loss_weight=0, use_real_rec_loss=True)):
        x, out = make_batch(t=2)
        assert torch.isfinite(loss(x, out)["loss"])
        assert loss._lpips is None


def test_bf16_autocast_gives_fp32_terms_computed_in_fp32(alex_file):
    loss = perceptual_loss(alex_file, use_real_rec_loss=True, use_z_rec_loss=True, use_image_identity_loss=True)
    x, out = make_batch(b=2, t=1, dtype=torch.bfloat16)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            terms = loss(x, out)
        out32 = Out(
            out.x_rec.float(),
            out.x_z_rec.float(),
            out.z.float(),
            DiagonalGaussianDistribution(out.posterior.parameters.float()),
            out.x_z.float(),
        )
        ref = loss(x.float(), out32)
    for name, value in terms.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value, ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_shape_mismatch_names_both_shapes():
    loss = VAELoss(perceptual_loss_weight=0, use_real_rec_loss=True)
    with pytest.raises(ValueError, match=r"\(1, 3, 2, 4, 4\).*\(1, 3, 2, 4, 5\)"):
        loss.nll(torch.zeros(1, 3, 2, 4, 4), torch.zeros(1, 3, 2, 4, 5))
    x, out = make_batch(t=2)
    with pytest.raises(ValueError, match=r"\(2, 3, 2, 32, 32\).*\(2, 3, 2, 16, 16\)"):
        loss(x, out._replace(x_rec=torch.zeros(2, 3, 2, 16, 16)))


def test_perceptual_needs_rgb(alex_file):
    loss = perceptual_loss(alex_file)
    with pytest.raises(ValueError, match="3-channel"):
        loss.nll(torch.zeros(1, 4, 1, 32, 32), torch.zeros(1, 4, 1, 32, 32), perceptual=True)


def test_no_enabled_term_is_an_error():
    x, out = make_batch(t=1)
    with pytest.raises(ValueError, match="no loss term enabled"):
        VAELoss(perceptual_loss_weight=0)(x, out)


def test_build_loss_from_config():
    cfg = dict(
        perceptual_loss_weight=0.1,
        kl_loss_weight=1e-5,
        logvar_init=0.25,
        use_real_rec_loss=True,
        use_z_rec_loss=False,
        use_image_identity_loss=True,
        lpips_random_backbone=True,
        lr=1e-4,  # other components' keys are ignored
    )
    loss = build_loss(cfg)
    assert loss.kl_loss_weight == 1e-5 and loss.perceptual_loss_weight == 0.1
    assert loss.use_real_rec_loss and not loss.use_z_rec_loss and loss.use_image_identity_loss
    assert loss.logvar.item() == 0.25
    assert loss._lpips.pnet_type == "vgg"  # the reference's backbone is the default
    from_config = build_loss(Config(dict(perceptual_loss_weight=None, use_z_rec_loss=True)))
    assert from_config.perceptual_loss_weight == 0.0 and from_config.use_z_rec_loss
    assert from_config.kl_loss_weight == 1e-6
