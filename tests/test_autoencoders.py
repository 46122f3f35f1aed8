"""The any-VAE adapters (opensora_vae.models.autoencoders) by value: `reconstruct` of a clip that needs padding in
time and space equals the model's reconstruction of the padded clip (last frame repeated, edges replicated, made by
hand here), cropped to the clip's first frames and top-left pixels."""
from __future__ import annotations

import diffusers
import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_pipeline
from opensora_vae.models.autoencoders import DiffusersAutoencoder, FrameRule, Geometry, OpenSoraAutoencoder


def _padded(x, frames, h, w):
    """The clip with its last frame repeated to `frames` and its bottom/right edges replicated to h x w."""
    t = x.shape[2]
    x = torch.cat([x] + [x[:, :, -1:]] * (frames - t), dim=2)
    return F.pad(x.flatten(1, 2), (0, w - x.shape[-1], 0, h - x.shape[-2]), mode="replicate").unflatten(1, x.shape[1:3])


def _wan():
    torch.manual_seed(0)
    return diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                      latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()


def _image_vae():
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4,
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2).eval()


def _reconstruction(vae, p):
    """The model's own reconstruction of an already padded clip p (B, C, T, H, W), by its own calls."""
    with torch.no_grad():
        if isinstance(vae, OpenSoraAutoencoder):
            return vae.model.decode(vae.model.encode(p, sample_posterior=False), num_frames=p.shape[2])
        if vae.geometry.per_frame:  # an image VAE: every frame on its own
            out = vae.model.decode(vae.model.encode(p.transpose(1, 2).flatten(0, 1)).latent_dist.mode()).sample
            return out.unflatten(0, (p.shape[0], p.shape[2])).transpose(1, 2)
        return vae.model.decode(vae.model.encode(p).latent_dist.mode()).sample


@pytest.mark.parametrize("which", ["opensora", "wan", "image"])
def test_reconstruct_keeps_the_start_of_the_padded_reconstruction(which):
    """Open-Sora (given the rule 4k+1; x2 in space at the tiny size) is fed 9 frames of 20x28 for 6 of 19x27, Wan (x8)
    9 of 24x32 for 6 of 20x28, the image VAE (x2) two clips of 3 frames of 19x27 as 20x28."""
    g = torch.Generator().manual_seed(0)
    if which == "opensora":
        model = tiny_pipeline(seed=3)
        vae = OpenSoraAutoencoder("opensora", model, frame_rule=FrameRule(4, 1))
        x, fed = torch.rand(1, 3, 6, 19, 27, generator=g) * 2 - 1, (9, 20, 28)
    elif which == "wan":
        vae = DiffusersAutoencoder("wan", _wan(), Geometry(FrameRule(4, 1), 4, 8))
        x, fed = torch.rand(1, 3, 6, 20, 28, generator=g) * 2 - 1, (9, 24, 32)
    else:
        vae = DiffusersAutoencoder("image", _image_vae(), Geometry(FrameRule(), 1, 2, per_frame=True))
        x, fed = torch.rand(2, 3, 3, 19, 27, generator=g) * 2 - 1, (3, 20, 28)
    assert vae.frames_needed(x.shape[2]) == fed[0]
    got = vae.reconstruct(x)
    full = _reconstruction(vae, _padded(x, *fed))
    assert full.shape[2:] == fed
    t, h, w = x.shape[2:]
    torch.testing.assert_close(got, full[:, :, :t, :h, :w], atol=1e-5, rtol=1e-5)
    # The test can tell: the padded reconstruction's end (last frames, bottom-right pixels) is another clip.
    assert (full[:, :, -t:, -h:, -w:] - got).abs().max() > 1e-2
