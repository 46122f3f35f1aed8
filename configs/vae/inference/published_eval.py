# The protocol behind the published VAE table (README): Open-Sora 1.2's inference config and
# script. Posteriors sampled in both VAEs, one chunk per clip (micro_frame_size=None; the same as 17 for 17 frames),
# bf16, a random 17-frame window of each of the first 100 rows at 256x256, written as H.264 at x264's default
# quality (CRF 23) and 24 fps. Then: eval/vae/eval_common_metric.py --num_frames 17 --resolution 256 --crop_size 256.
_base_ = ["video.py"]

dataset = dict(num_frames=17, image_size=(256, 256), frame_interval=1)
model = dict(micro_frame_size=None)
dtype = "bf16"
sample_posterior = True
crf = 23
fps = 24
num_samples = 100
save_dir = "samples/vae_video"
