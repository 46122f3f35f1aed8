# Fine-tune the CogVideoX VAE's decoder alone, with the adversarial loss (2D PatchGAN, adaptive weight, LeCAM); the
# encoder is frozen, so every clip keeps its latents bit for bit.
# torchrun --nproc_per_node=8 scripts/train_vae.py configs/vae/train/finetune_cogvideox_decoder.py --data-path train.csv
_base_ = ["finetune_cogvideox.py"]

trainable = "decoder"
discriminator = dict(type="NLayerDiscriminator")
discriminator_start = 0
lecam_loss_weight = 1e-3
on_nonfinite = "skip"
