"""Fast paths give the plain path's outputs: compiled == eager (tiny model), build_model's compile option."""
from __future__ import annotations

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


def test_compiled_pipeline_matches_eager():
    # Inductor compiles the tiny model's four networks on CPU in about a minute on 2 cores: one shape only.
    pytest.importorskip("torch._inductor")
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
