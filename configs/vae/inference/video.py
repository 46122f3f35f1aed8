# Reconstruct videos with the published Open-Sora 1.2 VAE (scripts/inference_vae.py).
num_frames = 17
frame_interval = 1
fps = None  # written videos' rate; None: the source clip's fps / frame_interval
image_size = (256, 256)

dataset = dict(
    type="VideoTextDataset",
    data_path=None,
    num_frames=num_frames,
    frame_interval=frame_interval,
    image_size=image_size,
)
num_workers = 2
batch_size = 1
seed = 42
# "auto": bf16 on a GPU that supports it, fp32 on CPU.
dtype = "auto"

model = dict(
    type="OpenSoraVAE_V1_2",
    from_pretrained="hpcai-tech/OpenSora-VAE-v1.2",
    micro_frame_size=17,
    micro_batch_size=4,
)
# dict of VideoAutoencoderPipeline.enable_tiling kwargs (e.g. dict(tile_size=512, overlap=64)): any resolution in
# bounded memory; None: untiled.
tiling = None
# Runtime options (build_model's; None leaves each as the model dict sets it, else the model's default).
# compile: torch.compile the four networks (see VideoAutoencoderPipeline.enable_compile): minutes of compilation on
# the first run per machine and clip shape, cached on disk (TORCHINDUCTOR_CACHE_DIR) for later runs. True, or a dict
# of enable_compile kwargs: dict(options=dict(freezing=True)) on CPU (weights folded in; see README "Speed options").
# Off by default.
compile = None
# winograd: fp32 CPU, the spatial VAE's and temporal decoder's 3x3 convolutions through Winograd F(4x4, 3x3)
# (VideoAutoencoderPipeline.enable_winograd): about 1.25x on 2 cores, outputs within float rounding (closer to float64
# than eager's), 3-3.6 GiB of cached weights. Off by default.
winograd = None
# subpixel: the spatial decoder's upsamplers as folded 2x2 convolutions (VideoAutoencoderPipeline.enable_subpixel):
# 4/9 of their multiplies, outputs within float rounding. On by default; False: diffusers' own interpolate + conv.
subpixel = None
save_dir = "samples/vae_video"
# Deterministic defaults (repeatable scores): posterior means, H.264 CRF 18, every row. The published table used
# published_eval.py instead (sampled posteriors, CRF 23, 24 fps, 100 rows).
sample_posterior = False
crf = 18
num_samples = None  # None: every row of the CSV
cal_stats = False
