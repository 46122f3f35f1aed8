# Fine-tuning a tiny randomly initialised AutoencoderKLLTXVideo (LTX-Video's 8x32x32 compression, 8 channels wide)
# with the settings of finetune_cogvideox.py (8k+1 frames too): runs on CPU in seconds (tests).
_base_ = ["../train/finetune_cogvideox.py"]

model = dict(_delete_=True, type="diffusers:AutoencoderKLLTXVideo",
             config=dict(block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8), latent_channels=8,
                         layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5))
dataset = dict(image_size=(32, 32), num_frames=9)
num_workers = 0
dtype = "fp32"
grad_checkpoint = False
lr = 1e-3
max_steps = 4
ckpt_every = 2
allow_missing_lpips = True
