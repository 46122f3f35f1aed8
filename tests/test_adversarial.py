"""The adversarial path: AdversarialLoss (adaptive weight, schedule, GAN losses, LeCAM, gradient penalty) and the
discriminators registered under the reference's type names. Expected values are worked out by hand."""
import math

import pytest
import torch
from einops import rearrange
from torch import nn

import opensora_vae.models  # noqa: F401  (registers the discriminators)
from opensora_vae.adversarial import AdversarialLoss
from opensora_vae.models.discriminator import load_discriminator_weights
from opensora_vae.registry import MODELS, build_from_cfg

from helpers import tiny_pipeline


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


# ----- adaptive weight --------------------------------------------------------------------------------------------
# A linear "last layer" W (2 x 3) on inputs X (2 x 3): out = X W^T = [[1, 2], [-1, 1]].
# nll = sum(out^2) = 7, dnll/dW = 2 out^T X = [[2, 2, 2], [4, 10, -2]], |.| = sqrt(132).
# fake logits = out @ v with v = [1, -1]: [-1, -2]; hinge g = -mean = 1.5,
# dg/dW = -(1/2) v (X_1 + X_2)^T = [[-.5, -1.5, .5], [.5, 1.5, -.5]], |.| = sqrt(5.5).
X = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]])
W0 = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
V = torch.tensor([1.0, -1.0])
DG_DW = torch.tensor([[-0.5, -1.5, 0.5], [0.5, 1.5, -0.5]])


def graph(nll_scale: float = 1.0, dtype=torch.float32):
    w = W0.clone().to(dtype).requires_grad_(True)
    out = X.to(dtype) @ w.t()
    return w, nll_scale * (out.float() ** 2).sum(), out @ V.to(dtype)


def test_adaptive_weight_matches_hand_formula():
    loss = AdversarialLoss(generator_factor=0.5)
    w, nll, fake = graph()
    assert nll.item() == 7.0 and fake.tolist() == [-1.0, -2.0]
    g = -fake.mean()
    expected = 0.5 * math.sqrt(132.0) / (math.sqrt(5.5) + 1e-4)
    weight = loss.adaptive_weight(nll, g, w)
    assert weight.dtype == torch.float32 and not weight.requires_grad
    assert weight.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(2.44938, rel=1e-5)


def test_generator_loss_term_and_its_gradient():
    loss = AdversarialLoss(discriminator_factor=0.8, generator_factor=0.5, discriminator_start=3)
    w, nll, fake = graph()
    out = loss.generator_loss(fake, nll, w, global_step=3)
    d_weight = 0.5 * math.sqrt(132.0) / (math.sqrt(5.5) + 1e-4)
    assert out["g_loss"].item() == pytest.approx(1.5)
    assert out["d_weight"].item() == pytest.approx(d_weight, rel=1e-6)
    assert out["adversarial"].item() == pytest.approx(d_weight * 0.8 * 1.5, rel=1e-6)
    assert not out["g_loss"].requires_grad and not out["d_weight"].requires_grad
    # The weight is a constant for the backward: d adversarial / dW = d_weight * factor * dg/dW.
    (grad,) = torch.autograd.grad(out["adversarial"], w)
    assert torch.allclose(grad, d_weight * 0.8 * DG_DW, rtol=1e-5)


def test_adaptive_weight_is_clamped():
    loss = AdversarialLoss(generator_factor=0.25)
    w, nll, fake = graph(nll_scale=1e9)
    assert loss.adaptive_weight(nll, -fake.mean(), w).item() == pytest.approx(0.25 * 1e4)


def test_non_saturating_generator_loss():
    loss = AdversarialLoss(generator_loss_type="non-saturating", generator_factor=1.0)
    w, nll, fake = graph()
    out = loss.generator_loss(fake, nll, w, global_step=0)
    g = 0.5 * (softplus(1.0) + softplus(2.0))  # mean softplus(-logits), logits [-1, -2]
    assert out["g_loss"].item() == pytest.approx(g, rel=1e-6)
    # dg/dW = mean(-sigmoid(-l_n) v x_n^T)
    s1, s2 = 1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(-2.0))
    dg = -0.5 * torch.outer(V, s1 * X[0] + s2 * X[1])
    expected = math.sqrt(132.0) / (dg.norm().item() + 1e-4)
    assert out["d_weight"].item() == pytest.approx(expected, rel=1e-5)
    assert out["adversarial"].item() == pytest.approx(expected * g, rel=1e-5)


def test_bf16_logits_give_float32_losses():
    loss = AdversarialLoss()
    w, nll, fake = graph(dtype=torch.bfloat16)
    out = loss.generator_loss(fake, nll, w, global_step=0)
    assert {v.dtype for v in out.values()} == {torch.float32}
    assert out["g_loss"].item() == 1.5
    real = torch.tensor([0.5, 2.0], dtype=torch.bfloat16, requires_grad=True)
    d = loss.discriminator_loss(real, torch.tensor([-2.0, 0.5], dtype=torch.bfloat16), global_step=0)
    assert {v.dtype for v in d.values()} == {torch.float32}
    assert d["total"].item() == pytest.approx(0.5 * (0.25 + 0.75))
    d["total"].backward()
    assert real.grad.dtype == torch.bfloat16 and real.grad.tolist() == [-0.25, 0.0]


# ----- schedule: nothing before discriminator_start ---------------------------------------------------------------
def count_grad_calls(monkeypatch):
    calls = []
    real_grad = torch.autograd.grad

    def grad(*args, **kwargs):
        calls.append(1)
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", grad)
    return calls


def test_nothing_adversarial_before_the_start(monkeypatch):
    calls = count_grad_calls(monkeypatch)
    loss = AdversarialLoss(discriminator_start=5, lecam_loss_weight=0.5, gradient_penalty_loss_weight=1.0)
    assert [loss.active(s) for s in (0, 4, 5, 6)] == [False, False, True, True]
    w, nll, fake = graph()
    out = loss.generator_loss(fake, nll, w, global_step=4)
    assert all(v.item() == 0.0 and not v.requires_grad for v in out.values())
    assert set(out) == {"adversarial", "g_loss", "d_weight"}
    assert loss.generator_loss(None, nll, w, global_step=0)["adversarial"].item() == 0.0
    real_input = torch.randn(2, 3, requires_grad=True)
    d = loss.discriminator_loss(real_input.sum(1), fake, global_step=4, real_input=real_input)
    assert set(d) == {"disc_loss", "lecam", "gradient_penalty", "total"}
    assert all(v.item() == 0.0 and not v.requires_grad for v in d.values())
    assert calls == []
    assert loss.lecam_ema_real.item() == 0.0 and loss.lecam_ema_fake.item() == 0.0  # EMAs did not move
    # From the start step on: two gradients for the adaptive weight, one for the penalty.
    loss.generator_loss(fake, nll, w, global_step=5)
    assert len(calls) == 2
    loss.discriminator_loss(real_input.sum(1), fake.detach(), global_step=5, real_input=real_input)
    assert len(calls) == 3 and loss.lecam_ema_real.item() != 0.0


def test_default_start_is_active_from_step_zero_and_factor_zero_turns_it_off():
    assert AdversarialLoss().active(0)
    off = AdversarialLoss(discriminator_factor=0.0)
    assert not off.active(0) and not off.active(10 ** 9)


def test_eval_without_graph_gives_zero_weight_training_raises():
    loss = AdversarialLoss()
    w, nll, fake = graph()
    with torch.no_grad():
        _, nll_ng, fake_ng = graph()
    with pytest.raises(ValueError, match="graph"):
        loss.generator_loss(fake_ng, nll_ng, w, global_step=0)
    loss.eval()
    out = loss.generator_loss(fake_ng, nll_ng, w, global_step=0)
    assert out["d_weight"].item() == 0.0 and out["adversarial"].item() == 0.0 and out["g_loss"].item() == 1.5


# ----- discriminator losses ---------------------------------------------------------------------------------------
REAL = torch.tensor([[0.5, 2.0], [-1.0, 0.0]])   # mean 0.375
FAKE = torch.tensor([[-2.0, 0.5], [1.5, -0.5]])  # mean -0.125


def test_hinge_discriminator_loss():
    loss = AdversarialLoss(discriminator_factor=0.5)
    d = loss.discriminator_loss(REAL, FAKE, global_step=0)
    # relu(1 - real) = [.5, 0, 2, 1] -> .875; relu(1 + fake) = [0, 1.5, 2.5, .5] -> 1.125; 0.5 * 2 = 1; x 0.5
    assert d["disc_loss"].item() == pytest.approx(0.5)
    assert d["lecam"].item() == 0.0 and d["gradient_penalty"].item() == 0.0
    assert d["total"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("kind", ["vanilla", "non-saturating"])
def test_vanilla_and_non_saturating_discriminator_loss(kind):
    loss = AdversarialLoss(discriminator_loss_type=kind, discriminator_factor=2.0)
    d = loss.discriminator_loss(REAL, FAKE, global_step=0)
    real_term = sum(softplus(-v) for v in REAL.flatten().tolist()) / 4
    fake_term = sum(softplus(v) for v in FAKE.flatten().tolist()) / 4
    assert d["disc_loss"].item() == pytest.approx(2.0 * 0.5 * (real_term + fake_term), rel=1e-6)


# ----- LeCAM ------------------------------------------------------------------------------------------------------
def test_lecam_value_and_ema_update():
    loss = AdversarialLoss(lecam_loss_weight=0.1, lecam_ema_decay=0.9)
    loss.load_state_dict({"lecam_ema_real": torch.tensor(0.3), "lecam_ema_fake": torch.tensor(-0.2)})
    d = loss.discriminator_loss(REAL, FAKE, global_step=0)
    # relu(0.375 + 0.2)^2 + relu(0.3 + 0.125)^2 = 0.330625 + 0.180625, with the EMAs before this call
    assert d["lecam"].item() == pytest.approx(0.1 * 0.51125, rel=1e-6)
    assert d["total"].item() == pytest.approx(1.0 + 0.051125, rel=1e-6)
    assert loss.lecam_ema_real.item() == pytest.approx(0.9 * 0.3 + 0.1 * 0.375)     # 0.3075
    assert loss.lecam_ema_fake.item() == pytest.approx(0.9 * -0.2 + 0.1 * -0.125)   # -0.1925
    d = loss.discriminator_loss(REAL, FAKE, global_step=1)
    assert d["lecam"].item() == pytest.approx(0.1 * (0.5675 ** 2 + 0.4325 ** 2), rel=1e-6)
    # eval mode: same value, the EMAs stay
    loss.eval()
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    loss.discriminator_loss(REAL, FAKE, global_step=2)
    assert all(torch.equal(before[k], v) for k, v in loss.state_dict().items())


def test_lecam_relu_clips_and_gradient():
    loss = AdversarialLoss(lecam_loss_weight=1.0)
    loss.lecam_ema_fake.fill_(1.0)   # above the real mean: first term 0
    loss.lecam_ema_real.fill_(-1.0)  # below the fake mean: second term 0
    real = REAL.clone().requires_grad_(True)
    d = loss.discriminator_loss(real, FAKE, global_step=0)
    assert d["lecam"].item() == 0.0
    loss.lecam_ema_fake.fill_(0.0)
    loss.lecam_ema_real.fill_(0.0)
    d = loss.discriminator_loss(real, FAKE, global_step=0)
    assert d["lecam"].item() == pytest.approx(0.375 ** 2 + 0.125 ** 2)
    (grad,) = torch.autograd.grad(d["lecam"], real)
    assert torch.allclose(grad, torch.full_like(real, 2 * 0.375 / 4))


def test_lecam_emas_round_trip_and_stay_float32():
    loss = AdversarialLoss(lecam_loss_weight=0.1, lecam_ema_decay=0.99)
    for step in range(3):
        loss.discriminator_loss(REAL * (step + 1), FAKE, global_step=step)
    state = loss.state_dict()
    assert set(state) == {"lecam_ema_real", "lecam_ema_fake"}
    assert all(v.dtype == torch.float32 and v.shape == () for v in state.values())
    # 0.01 * (0.375 * 0.99^2 + 0.75 * 0.99 + 1.125)
    assert state["lecam_ema_real"].item() == pytest.approx(0.01 * (0.375 * 0.9801 + 0.75 * 0.99 + 1.125), rel=1e-6)
    fresh = AdversarialLoss(lecam_loss_weight=0.1, lecam_ema_decay=0.99)
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    a, b = loss.discriminator_loss(REAL, FAKE, 3), fresh.discriminator_loss(REAL, FAKE, 3)
    assert a["lecam"].item() == b["lecam"].item()
    exact = fresh.lecam_ema_real.clone()
    fresh.to(torch.bfloat16)
    fresh.half()
    assert fresh.lecam_ema_real.dtype == torch.float32 and torch.equal(fresh.lecam_ema_real, exact)


# ----- gradient penalty -------------------------------------------------------------------------------------------
def test_gradient_penalty_hand_case():
    # D(x) = 0.5 * a * sum(x^2) per sample: dD/dx = a x; norms (a = 1) 5 and 0.5 ->
    # mean((5 - 1)^2, (0.5 - 1)^2) = (16 + 0.25) / 2 = 8.125; d/da = mean(2 (a|x| - 1) |x|) = (40 - 0.5) / 2.
    a = torch.tensor(1.0, requires_grad=True)
    real_input = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.5]], requires_grad=True)
    real_logits = 0.5 * a * (real_input ** 2).sum(1)
    loss = AdversarialLoss(gradient_penalty_loss_weight=2.0)
    d = loss.discriminator_loss(real_logits, torch.zeros(2), global_step=0, real_input=real_input)
    assert d["gradient_penalty"].item() == pytest.approx(2.0 * 8.125)
    (grad,) = torch.autograd.grad(d["gradient_penalty"], a)
    assert grad.item() == pytest.approx(2.0 * 19.75)
    hinge = 0.5 * (sum(max(0.0, 1 - v) for v in (12.5, 0.125)) / 2 + 1.0)
    assert d["total"].item() == pytest.approx(2.0 * 8.125 + hinge)


def test_gradient_penalty_needs_a_real_input_with_grad():
    loss = AdversarialLoss(gradient_penalty_loss_weight=1.0)
    with pytest.raises(ValueError, match="real_input"):
        loss.discriminator_loss(REAL, FAKE, global_step=0)
    with pytest.raises(ValueError, match="requires_grad"):
        loss.discriminator_loss(REAL, FAKE, global_step=0, real_input=torch.zeros(2, 2))


# ----- arguments --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value", [
    ("discriminator_factor", -1.0), ("discriminator_start", 1.5), ("generator_factor", -0.1),
    ("generator_loss_type", "vanilla"), ("discriminator_loss_type", "wasserstein"), ("lecam_loss_weight", -1.0),
    ("lecam_ema_decay", 1.5), ("gradient_penalty_loss_weight", "1"),
])
def test_bad_arguments_name_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        AdversarialLoss(**{key: value})


def test_defaults_are_the_reference_trainers():
    import inspect

    defaults = {n: p.default for n, p in inspect.signature(AdversarialLoss).parameters.items()}
    assert defaults == dict(discriminator_factor=1.0, discriminator_start=-1, generator_factor=0.5,
                            generator_loss_type="hinge", discriminator_loss_type="hinge", lecam_loss_weight=None,
                            lecam_ema_decay=0.999, gradient_penalty_loss_weight=None)


# ----- discriminators ---------------------------------------------------------------------------------------------
# state_dict names and shapes of the reference modules for these configs (derived by instantiating them).
PATCH_KEYS = [
    ("main.0.weight", (8, 3, 4, 4)), ("main.0.bias", (8,)), ("main.2.weight", (16, 8, 4, 4)),
    ("main.3.weight", (16,)), ("main.3.bias", (16,)), ("main.3.running_mean", (16,)),
    ("main.3.running_var", (16,)), ("main.3.num_batches_tracked", ()), ("main.5.weight", (32, 16, 4, 4)),
    ("main.6.weight", (32,)), ("main.6.bias", (32,)), ("main.6.running_mean", (32,)), ("main.6.running_var", (32,)),
    ("main.6.num_batches_tracked", ()), ("main.8.weight", (1, 32, 4, 4)), ("main.8.bias", (1,)),
]
STYLEGAN_KEYS = [("conv1.weight", (32, 3, 3, 3, 3)), ("conv1.bias", (32,))] + [
    item for i, (cin, cout) in enumerate([(32, 32), (32, 64)]) for item in [
        (f"res_block_list.{i}.conv1.weight", (cin, cin, 3, 3, 3)), (f"res_block_list.{i}.conv1.bias", (cin,)),
        (f"res_block_list.{i}.norm1.weight", (cin,)), (f"res_block_list.{i}.norm1.bias", (cin,)),
        (f"res_block_list.{i}.blur.filt", (cin, 1, 3, 3, 3)),
        (f"res_block_list.{i}.conv2.weight", (cout, cin, 1, 1, 1)),
        (f"res_block_list.{i}.conv3.weight", (cout, cin, 3, 3, 3)), (f"res_block_list.{i}.conv3.bias", (cout,)),
        (f"res_block_list.{i}.norm2.weight", (cout,)), (f"res_block_list.{i}.norm2.bias", (cout,)),
    ]
] + [("conv2.weight", (64, 64, 3, 3, 3)), ("conv2.bias", (64,)), ("norm1.weight", (64,)), ("norm1.bias", (64,)),
     ("linear1.weight", (64, 64 * 2 * 4 * 4)), ("linear1.bias", (64,)), ("linear2.weight", (1, 64)),
     ("linear2.bias", (1,))]
PATCH3D_KEYS = [(k, s[:2] + (4,) + s[2:] if len(s) == 4 else s) for k, s in PATCH_KEYS]
STYLEGAN_SMALL = dict(image_size=(16, 16), num_frames=5, filters=32, channel_multipliers=(1, 2), dtype="fp32")
# type: (config, state_dict layout, input shape, logits shape, reference logits). The reference logits come from
# the reference modules built after torch.manual_seed(0) (its 3D PatchGAN init applied), in training mode, on
# x = torch.randn(input shape) drawn right after: the first four values and the sum. The same seed gives the
# same weights here, so this pins the init order, the layer wiring, the padding and the flattening order.
SMALL = {
    "NLayerDiscriminator": (dict(input_nc=3, ndf=8, n_layers=2), PATCH_KEYS, (6, 3, 32, 32), (6, 1, 6, 6),
                            ([0.08507800, 0.39494741, -0.06722872, 0.07011916], 43.35182953)),
    "N_Layer_DISCRIMINATOR_3D": (dict(ndf=8, n_layers=2), PATCH3D_KEYS, (2, 3, 12, 32, 32), (2, 1, 3, 6, 6),
                                 ([0.65591180, -0.60619402, -0.70146966, -1.08097482], -53.75778198)),
    "DISCRIMINATOR_3D": (STYLEGAN_SMALL, STYLEGAN_KEYS, (2, 3, 5, 16, 16), (2, 1),
                         ([-0.61997980, -3.78566599], -4.40564585)),
}


@pytest.mark.parametrize("name", list(SMALL))
def test_discriminator_builds_shapes_names_and_gradients(name):
    cfg, keys, in_shape, out_shape, (first, total) = SMALL[name]
    torch.manual_seed(0)
    disc = build_from_cfg(dict(type=name, **cfg), MODELS)
    assert [(k, tuple(v.shape)) for k, v in disc.state_dict().items()] == keys
    x = torch.randn(in_shape, requires_grad=True)
    logits = disc(x)
    assert tuple(logits.shape) == out_shape and logits.dtype == torch.float32
    assert logits.flatten()[:4].tolist() == pytest.approx(first, rel=1e-4, abs=1e-5)
    assert logits.sum().item() == pytest.approx(total, rel=1e-4)
    logits.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    missing = [n for n, p in disc.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_discriminators_reject_the_wrong_layout():
    patch = build_from_cfg(dict(type="NLayerDiscriminator", ndf=4, n_layers=1), MODELS)
    with pytest.raises(ValueError, match=r"\(b t\) c h w"):
        patch(torch.randn(1, 3, 2, 16, 16))
    patch3d = build_from_cfg(dict(type="N_Layer_DISCRIMINATOR_3D", ndf=4, n_layers=1), MODELS)
    with pytest.raises(ValueError, match="at least 6 frames"):
        patch3d(torch.randn(1, 3, 5, 16, 16))
    cfg = STYLEGAN_SMALL
    stylegan = build_from_cfg(dict(type="DISCRIMINATOR_3D", **cfg), MODELS)
    with pytest.raises(ValueError, match="fixes the clip size"):
        stylegan(torch.randn(2, 3, 6, 16, 16))
    with pytest.raises(ValueError, match="divisible"):
        build_from_cfg(dict(type="DISCRIMINATOR_3D", **dict(cfg, image_size=(10, 16))), MODELS)


def test_default_dtype_of_the_stylegan_discriminator_is_bf16_as_the_reference():
    disc = build_from_cfg(dict(type="DISCRIMINATOR_3D", image_size=8, num_frames=3, filters=32,
                               channel_multipliers=(1,)), MODELS)
    assert {p.dtype for p in disc.state_dict().values()} == {torch.bfloat16}


def test_weight_init_as_the_reference():
    torch.manual_seed(0)
    patch = build_from_cfg(dict(type="NLayerDiscriminator", ndf=16), MODELS)  # PyTorch defaults, no re-init
    assert torch.equal(patch.main[3].weight, torch.ones(32))
    fan_in = 3 * 16
    assert patch.main[0].weight.abs().max() <= 1 / math.sqrt(fan_in)
    patch3d = build_from_cfg(dict(type="N_Layer_DISCRIMINATOR_3D", ndf=16), MODELS)  # N(0, .02), BN N(1, .02)
    convs = torch.cat([m.weight.flatten() for m in patch3d.modules() if isinstance(m, nn.Conv3d)])
    assert convs.mean().abs() < 1e-3 and convs.std().item() == pytest.approx(0.02, rel=0.02)
    bns = [m for m in patch3d.modules() if isinstance(m, nn.BatchNorm3d)]
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in bns)
    scales = torch.cat([m.weight for m in bns])
    assert scales.std().item() == pytest.approx(0.02, rel=0.3) and (scales - 1).abs().max() < 0.2
    stylegan = build_from_cfg(dict(type="DISCRIMINATOR_3D", image_size=8, num_frames=3, filters=32,
                                   channel_multipliers=(1,), dtype="fp32"), MODELS)
    for m in stylegan.modules():  # xavier-uniform with gain sqrt(2), zero biases
        if isinstance(m, (nn.Conv3d, nn.Linear)):
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(m.weight)
            bound = math.sqrt(2.0) * math.sqrt(6.0 / (fan_in + fan_out))
            assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.9 * bound
            assert m.bias is None or not m.bias.any()
    filt = stylegan.res_block_list[0].blur.filt
    assert filt.shape == (32, 1, 3, 3, 3) and filt.sum().item() == pytest.approx(32.0)
    assert filt[0, 0, 1, 1, 1].item() == 8 / 64 and filt[0, 0, 0, 0, 0].item() == 1 / 64


def test_blur_downsampling_reflects_and_halves():
    stylegan = build_from_cfg(dict(STYLEGAN_SMALL, type="DISCRIMINATOR_3D"), MODELS)
    blur = stylegan.res_block_list[0].blur
    # frames 0, 1, 2, 3 (constant in space): reflect-padded [1, 0, 1, 2, 3, 2], (1, 2, 1) / 4 at stride 2
    x = torch.arange(4.0).view(1, 1, 4, 1, 1).expand(1, 32, 4, 2, 2)
    y = blur(x)
    assert y.shape == (1, 32, 2, 1, 1)
    assert y[0, 0].flatten().tolist() == [0.5, 2.0] and torch.equal(y, y[:, :1].expand_as(y))
    assert blur(torch.ones(1, 32, 5, 6, 6)).shape == (1, 32, 3, 3, 3)  # n -> ceil(n / 2)


def test_from_pretrained_file_folder_and_inflation(tmp_path):
    torch.manual_seed(1)
    source = build_from_cfg(dict(type="N_Layer_DISCRIMINATOR_3D", ndf=4, n_layers=1), MODELS)
    torch.save(source.state_dict(), tmp_path / "disc.pt")
    (tmp_path / "run" / "discriminator").mkdir(parents=True)
    torch.save(source.state_dict(), tmp_path / "run" / "discriminator" / "pytorch_model.bin")
    for path in (tmp_path / "disc.pt", tmp_path / "run"):
        loaded = build_from_cfg(dict(type="N_Layer_DISCRIMINATOR_3D", ndf=4, n_layers=1,
                                     from_pretrained=str(path)), MODELS)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())
    skipped = build_from_cfg(dict(type="N_Layer_DISCRIMINATOR_3D", ndf=4, n_layers=1, use_pretrained=False,
                                  from_pretrained=str(tmp_path / "missing.pt")), MODELS)
    assert not torch.equal(skipped.main[0].weight, source.main[0].weight)
    # 2D PatchGAN -> 3D: each 4x4 kernel in the centre (index 2) of the 4x4x4 one, zeros elsewhere
    flat = build_from_cfg(dict(type="NLayerDiscriminator", ndf=4, n_layers=1), MODELS)
    torch.save(flat.state_dict(), tmp_path / "flat.pt")
    inflated = build_from_cfg(dict(type="N_Layer_DISCRIMINATOR_3D", ndf=4, n_layers=1, inflate_from_2d=True,
                                   from_pretrained=str(tmp_path / "flat.pt")), MODELS)
    kernel = inflated.main[0].weight
    assert torch.equal(kernel[:, :, 2], flat.main[0].weight)
    assert not kernel[:, :, [0, 1, 3]].any()
    assert torch.equal(inflated.main[3].weight, flat.main[3].weight)
    with pytest.raises(KeyError, match="shape mismatch"):  # a 2D checkpoint without inflation does not fit
        load_discriminator_weights(inflated, tmp_path / "flat.pt")


# ----- the trainer's wiring on the real model ---------------------------------------------------------------------
def test_generator_term_through_the_pipeline():
    """The reference's last layer is the temporal decoder's output conv weight; here the same path exists:
    model.temporal_vae.decoder.conv_out.conv.weight. The 2D discriminator sees x_rec folded to (b t) c h w."""
    torch.manual_seed(0)
    model = tiny_pipeline().train()
    last_layer = model.temporal_vae.decoder.conv_out.conv.weight
    x = torch.rand(1, 3, 2, 32, 32) * 2 - 1
    out = model(x)
    disc = build_from_cfg(dict(type="NLayerDiscriminator", ndf=4, n_layers=1), MODELS)
    fake_logits = disc(rearrange(out.x_rec, "b c t h w -> (b t) c h w"))
    nll = (x - out.x_rec).abs().sum() / 2  # stands in for the pixel NLL
    loss = AdversarialLoss()
    terms = loss.generator_loss(fake_logits, nll, last_layer, global_step=0)
    g_grad = torch.autograd.grad(-fake_logits.float().mean(), last_layer, retain_graph=True)[0]
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    expected = 0.5 * (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, 1e4).item()
    assert terms["d_weight"].item() == pytest.approx(expected, rel=1e-5) and expected > 0
    terms["adversarial"].backward()
    assert last_layer.grad is not None and last_layer.grad.abs().sum() > 0
