"""Data loading: video/image IO, clip transforms, the CSV dataset, a resumable sampler, stored latents."""
from .latents import LatentDataset
from .dataset import MIXED_STRATEGIES, VideoTextDataset, apply_mixed_strategy, collate_clips
from .sampler import ResumableDistributedSampler
from .transforms import center_crop, random_crop, resize, resize_crop, resize_short_side, to_model_range
from .video import (
    IMAGE_EXTENSIONS,
    VideoInfo,
    VideoReadError,
    ensure_uint8_video,
    is_image_path,
    probe_video,
    read_frames,
    read_image,
    read_video,
    write_image,
    write_video,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "LatentDataset",
    "MIXED_STRATEGIES",
    "ResumableDistributedSampler",
    "VideoInfo",
    "VideoReadError",
    "VideoTextDataset",
    "apply_mixed_strategy",
    "collate_clips",
    "center_crop",
    "ensure_uint8_video",
    "is_image_path",
    "probe_video",
    "random_crop",
    "read_frames",
    "read_image",
    "read_video",
    "resize",
    "resize_crop",
    "resize_short_side",
    "to_model_range",
    "write_image",
    "write_video",
]
