# Stage 3: pixel reconstruction (L1 + LPIPS, NLL, KL) on clips of random length up to 33 frames, each encoded as one
# chunk (micro_frame_size=None, as the reference config; 17 chunks like inference at less memory).
# Start from stage 2: --ckpt-path OUTPUTS/<run>/epochE-global_stepS
_base_ = ["stage2.py"]

dataset = dict(num_frames=33)
use_real_rec_loss = True
use_z_rec_loss = False
use_image_identity_loss = False
mixed_strategy = "mixed_video_random"
