# Stage 1: spatial VAE frozen (SDXL VAE weights), temporal VAE learns to rebuild the 2D latents;
# 20% of steps train on single frames with an identity loss pulling the temporal latent to the 2D latent.
num_frames = 17
image_size = (256, 256)
dataset = dict(
    type="VideoTextDataset",
    data_path=None,
    num_frames=num_frames,
    frame_interval=1,
    image_size=image_size,
)
num_workers = 4
batch_size = 1

model = dict(
    type="OpenSoraVAE_V1_2",
    from_pretrained=None,
    micro_frame_size=None,
    micro_batch_size=4,
    freeze_vae_2d=True,
    cal_loss=True,
    # compile=True: torch.compile both VAEs' encoders/decoders; dict(parts="temporal", **torch.compile options): one
)

# Loss
perceptual_loss_weight = 0.1
kl_loss_weight = 1e-6
lpips_net = "vgg"
lpips_backbone_path = None  # torchvision vgg16 weights; default: the torch hub cache
allow_missing_lpips = False
use_real_rec_loss = False
use_z_rec_loss = True
use_image_identity_loss = True
mixed_strategy = "mixed_video_image"
mixed_image_ratio = 0.2
sample_posterior = True
learn_logvar = False  # the reference optimises the model's parameters only: logvar stays at logvar_init
logvar_init = 0.0

# Optimisation
seed = 42
sampler_seed = 0  # the reference's data order: its sampler is seeded with 0 whatever `seed` is
dtype = "bf16"
precision = "autocast"  # fp32 parameters and AdamW state; "params" stores them in bf16 too (half the memory)
grad_checkpoint = True  # True (both VAEs), "temporal" / "spatial" (one), False; per res block
optimizer = dict(fused=None, foreach=None)  # AdamW implementation (None: torch's default)
shard_optimizer = True  # ZeRO-style: AdamW state sharded across ranks
lr = 1e-5
weight_decay = 0.0
warmup_steps = 0
lr_schedule = dict(type="constant")  # as published; dict(type="cosine", min_ratio=r) decays to r * lr at max_steps
grad_clip = 1.0

# Run
epochs = 100
max_steps = None
log_every = 1
ckpt_every = 1000
outputs = "outputs"
