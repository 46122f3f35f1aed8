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


def test_compiled_graphs_match_eager_in_inference_and_training():
    """In every run: the four networks captured whole by torch.compile (fullgraph: a graph break fails) and run as
    captured (AOTAutograd's forward and joint graphs, `aot_eager`: seconds where inductor's C++ takes minutes, the
    test below) give eager's latents, decoded clip and gradients."""
    from torch._dynamo.utils import counters

    x = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def step(model):
        with torch.inference_mode():
            z = model.encode(x, sample_posterior=False)
            rec = model.decode(z, num_frames=5)
        model.train()
        out = model(x, sample_posterior=False)
        (out.x_rec.square().mean() + out.x_z_rec.abs().mean()).backward()
        return [z, rec] + [p.grad for p in model.parameters()]

    want = step(tiny_pipeline(micro_batch_size=None))
    model = tiny_pipeline(micro_batch_size=None)
    model.enable_compile(backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    counters.clear()
    got = step(model)
    # two shapes per network (inference, training): each network's graphs were compiled and ran
    assert counters["stats"]["unique_graphs"] == 8 and not counters["graph_break"], dict(counters)
    assert len(got) == len(want) and all(g is not None for g in got)
    for a, b in zip(got, want):  # the same ops in the same order: float rounding at most
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(os.environ.get("OPENSORA_VAE_TEST_COMPILE") != "1",
                    reason="inductor compiles four C++ graphs: minutes on 2 shared cores; "
                           "set OPENSORA_VAE_TEST_COMPILE=1")
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
        pairs = torch.cat([flolpips_pairs(a[i, t:t + 1], a[i, t + 1:t + 2], b[i, t:t + 1], b[i, t + 1:t + 2],
                                          model, flow)
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


def _count_calls(monkeypatch, owner, name):
    """Wrap owner.<name> (looked up at call time) to count its calls: the spy that shows a fast path ran."""
    calls = []
    inner = getattr(owner, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    monkeypatch.setattr(owner, name, staticmethod(spy) if isinstance(owner, type) else spy)
    return calls


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")
def test_every_temporal_conv3d_call_runs_through_onednn_forward_and_backward(monkeypatch):
    """The spy: each batched Conv3d call of the temporal VAE (on by default) goes through oneDNN's forward and, in
    training, its backward; with oneDNN disabled none does (so the equality test above compares two paths)."""
    from opensora_vae.models.speed import onednn

    torch.manual_seed(0)
    vae = build_model(tiny_model_cfg()["vae_temporal"])
    convs = [m for m in vae.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(m.backends == ("onednn",) for m in convs)
    seen = []
    for m in convs:
        m.register_forward_hook(lambda *_: seen.append(1))
    fwd = _count_calls(monkeypatch, onednn, "forward")
    bwd = _count_calls(monkeypatch, onednn._Conv3d, "backward")
    x = torch.randn(1, 4, 9, 8, 8)
    vae.decode(vae.encode(x).mode(), num_frames=9).square().mean().backward()
    assert len(seen) > 0 and len(fwd) == len(seen) and len(bwd) == len(seen), (len(seen), len(fwd), len(bwd))
    seen.clear(), fwd.clear(), bwd.clear()
    with torch.backends.mkldnn.flags(enabled=False):
        vae.decode(vae.encode(x).mode(), num_frames=9).square().mean().backward()
    assert len(seen) > 0 and not fwd and not bwd


def test_cached_derived_weights_are_computed_once_per_weight_version():
    from opensora_vae.models.speed import derived

    conv = torch.nn.Conv2d(3, 4, 3)
    calls = []

    def fn(w):
        calls.append(1)
        return w * 2

    with torch.no_grad():
        first = derived.cached(conv, "_c", fn)
        assert derived.cached(conv, "_c", fn) is first and len(calls) == 1  # reused, not recomputed
        conv.weight.add_(1)  # in place: a new version
        torch.testing.assert_close(derived.cached(conv, "_c", fn), conv.weight * 2)
        conv.weight = torch.nn.Parameter(torch.randn(4, 3, 3, 3))  # replaced
        torch.testing.assert_close(derived.cached(conv, "_c", fn), conv.weight * 2)
    assert len(calls) == 3
    derived.drop(conv, "_c")
    assert "_c" not in conv.__dict__


# ----- calibration: which backend runs a call is timed on this machine (speed.calibrate) ------------------------
@pytest.fixture
def calibrating(monkeypatch, tmp_path):
    """Calibration on (the tests' default forces the fast paths), its file in tmp_path; returns the file."""
    from opensora_vae.models.speed import calibrate

    monkeypatch.setenv(calibrate.ENV_MODE, "auto")
    monkeypatch.setenv(calibrate.ENV_DIR, str(tmp_path))
    calibrate.forget()
    yield tmp_path / calibrate.FILE
    calibrate.forget()


def _fake_timings(monkeypatch, seconds):
    """time_call returns the given seconds in turn (each backend first, then the path it replaces), after running
    the path once so that both really run."""
    from opensora_vae.models.speed import calibrate

    left = list(seconds)

    def fake(fn, repeats=calibrate.REPEATS):
        fn()
        return left.pop(0)

    monkeypatch.setattr(calibrate, "time_call", fake)
    return left


def test_calibration_picks_the_faster_path_caches_it_and_reuses_it_without_timing(monkeypatch, calibrating):
    import json

    import torch.nn.functional as F

    from opensora_vae.models import speed
    from opensora_vae.models.speed import calibrate

    torch.manual_seed(0)
    wins, loses = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Conv2d(8, 6, 3, padding=1)
    for conv in (wins, loses):
        speed.use_backend(conv, "winograd", force=True)
    runs = _count_calls(monkeypatch, speed.winograd, "conv2d")
    x = torch.randn(4, 8, 16, 16)  # 64 tiles: Winograd's rule admits the call
    left = _fake_timings(monkeypatch, [1.0, 2.0, 1.0, 1.02])  # the second gains 2%: within the margin
    with torch.no_grad():
        for conv in (wins, loses):
            torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-4, rtol=0)
        assert not left and len(runs) == 3  # timed once each, then the chosen path: Winograd for `wins` only
        assert "_winograd_cache" in wins.__dict__ and "_winograd_cache" not in loses.__dict__
        (machine, calls), = json.loads(calibrating.read_text()).items()
        assert f"threads={torch.get_num_threads()}" in machine and f"torch={torch.__version__}" in machine
        assert sorted(calls.values(), key=lambda e: not e["use"]) == [
            dict(use=True, seconds=dict(winograd=1.0, plain=2.0)),
            dict(use=False, seconds=dict(winograd=1.0, plain=1.02))]
        assert all("x=(4, 8, 16, 16)" in key for key in calls)
        # A fresh process (the in-memory choices dropped) reads them from the file: no timing.
        calibrate.forget()
        monkeypatch.setattr(calibrate, "time_call", lambda *a, **k: pytest.fail("timed again"))
        runs.clear()
        loses(x), wins(x)
        assert len(runs) == 1
        monkeypatch.setenv(calibrate.ENV_MODE, "plain")  # forced: no backend, no timing
        loses(x), wins(x)
        assert len(runs) == 1
    with pytest.raises(ValueError, match="OPENSORA_VAE_CALIBRATION"):
        monkeypatch.setenv(calibrate.ENV_MODE, "sometimes")
        calibrate.mode()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")
def test_calibration_times_training_calls_on_a_copy_and_keeps_the_gradients(calibrating):
    """Real timing of a training call (forward and backward, oneDNN against PyTorch's conv3d): the module's own
    gradients are only the step's, whichever path was chosen, and the choice is in the file."""
    import json

    from opensora_vae.models import speed
    from opensora_vae.models.speed import calibrate

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(4, 6, 3, padding=1)
    plain = torch.nn.Conv3d(4, 6, 3, padding=1)
    plain.load_state_dict(conv.state_dict())
    assert speed.use_backend(conv, "onednn") == 1
    params = list(conv.parameters())
    x = torch.randn(1, 4, 5, 6, 6, requires_grad=True)
    conv(x).square().sum().backward()
    assert all(a is b for a, b in zip(conv.parameters(), params))  # timed on a copy: the module is untouched
    x2 = x.detach().requires_grad_()
    plain(x2).square().sum().backward()
    torch.testing.assert_close(conv.weight.grad, plain.weight.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    (entry,), = [list(v.values()) for v in json.loads(calibrating.read_text()).values()]
    assert set(entry["seconds"]) == {"onednn", "plain"} and all(t > 0 for t in entry["seconds"].values())
    assert entry["use"] == (entry["seconds"]["onednn"] <= (1 - calibrate.MARGIN) * entry["seconds"]["plain"])
