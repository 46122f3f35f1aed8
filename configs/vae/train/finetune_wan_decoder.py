# Fine-tune the Wan 2.1 VAE's decoder alone, with the adversarial loss (2D PatchGAN on every frame, adaptive weight at
# the decoder's last layer, LeCAM). The encoder is frozen (trainable="decoder"), so every clip keeps its latents bit
# for bit: a diffusion model trained on Wan latents stays valid, and decodes sharper.
# torchrun --nproc_per_node=8 scripts/train_vae.py configs/vae/train/finetune_wan_decoder.py --data-path train.csv
_base_ = ["finetune_wan.py"]

trainable = "decoder"
discriminator = dict(type="NLayerDiscriminator")
discriminator_start = 0
lecam_loss_weight = 1e-3
on_nonfinite = "skip"  # adversarial runs can go NaN: skip such steps, stop after 10 in a row
