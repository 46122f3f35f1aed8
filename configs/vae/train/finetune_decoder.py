# Fine-tune the decoders of the published OpenSora-VAE-v1.2 with the pixel losses plus the reference's adversarial
# loss. Both encoders are frozen (trainable="decoder"), so every clip keeps its latents: a diffusion model trained
# on them stays valid. Decoding is in 17-frame chunks, as inference decodes.
# torchrun --nproc_per_node=8 scripts/train_vae.py configs/vae/train/finetune_decoder.py --data-path train.csv
_base_ = ["stage3.py"]

model = dict(from_pretrained="hpcai-tech/OpenSora-VAE-v1.2", micro_frame_size=17)
trainable = "decoder"

discriminator = dict(type="NLayerDiscriminator")  # the 2D PatchGAN, on every frame
discriminator_start = 0
lecam_loss_weight = 1e-3

ema_decay = 0.999  # RUN/epochE-global_stepS/ema: the averaged decoder, loadable with --ckpt-path
on_nonfinite = "skip"  # adversarial runs can go NaN: skip such steps, stop after 10 in a row
keep_last = 3
keep_every = 10000
