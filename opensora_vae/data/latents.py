"""Latents written by the encode job (opensora_vae.encode): the folder's format and a Dataset over it.

Formats (meta.json's "format"): 2 (this version) stores each clip's posterior mean and std BEFORE any latent
normalisation, with the model's own normalisation in meta.json ("normalization": shift, scale; normalised =
(z - shift) / scale per channel); 1 (earlier versions, no "format" key; the Open-Sora pipeline only) stored them
normalised by meta.json's shift / scale. `LatentDataset` reads both, in the space asked for. The folder may be a URL
(storage.py): shards are read by byte ranges, header first, then each clip's tensors."""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence

import pandas as pd
import torch
from torch.utils.data import Dataset

from .. import storage
from ..errors import UserError
from .dataset import _generator

__all__ = ["LATENT_FORMAT", "LatentDataset", "index_path", "latent_format", "read_index", "read_meta",
           "read_shard_records"]

LATENT_FORMAT = 2  # what the encode job writes (module docstring)
META_NAME = "meta.json"
SHARD_DIR = "shards"
INDEX_COLUMNS = ("row", "bucket", "key", "shard", "num_frames", "height", "width", "latent_shape", "path", "text",
                 "fps", "frame_indices", "source_height", "source_width")
_JSON_COLUMNS = ("frame_indices", "latent_shape")


def read_meta(root) -> Dict[str, Any]:
    path = storage.join(root, META_NAME)
    if not storage.isfile(path):
        raise FileNotFoundError(f"{storage.redact(path)} not found: {storage.redact(root)} is not a latent folder "
                                f"written by encode_latents.py")
    return json.loads(storage.read_text(path))


def latent_format(meta: Dict[str, Any]) -> int:
    """The format (module docstring) of a folder's meta.json; refused (one line) when newer than this version's."""
    version = int(meta.get("format", 1))
    if version not in (1, LATENT_FORMAT):
        raise UserError(f"latent folder of format {version}: this version reads formats 1 and {LATENT_FORMAT}; "
                        f"update opensora_vae")
    return version


# safetensors' dtype names (its format: 8-byte little-endian header length, JSON header, then the tensors' bytes)
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}
HEADER_BLOCK = 1 << 16  # range size for reading headers: a shard's header is small, its tensors are not


class ShardFile:
    """A safetensors shard read by byte ranges (a local file or a URL): the header once, a tensor's bytes when asked."""

    def __init__(self, path, block_size: int | None = None):
        self.path = str(path)
        self.file = storage.open_read(self.path, block_size=block_size)
        try:
            size = int.from_bytes(self.file.read(8), "little")
            header = json.loads(self.file.read(size))
        except (ValueError, UnicodeDecodeError) as err:
            self.file.close()
            raise UserError(f"{storage.redact(self.path)} is not a safetensors shard ({err})") from None
        self.metadata: Dict[str, str] = header.pop("__metadata__", None) or {}
        self.tensors: Dict[str, Dict[str, Any]] = header
        self.start = 8 + size

    def get_tensor(self, name: str) -> torch.Tensor:
        spec = self.tensors[name]
        begin, end = spec["data_offsets"]
        dtype = _SAFETENSORS_DTYPES[spec["dtype"]]
        if end == begin:
            return torch.empty(spec["shape"], dtype=dtype)
        self.file.seek(self.start + begin)
        data = bytearray(self.file.read(end - begin))
        return torch.frombuffer(data, dtype=dtype).reshape(spec["shape"])

    def close(self) -> None:
        self.file.close()


def read_shard_records(path) -> List[Dict[str, Any]]:
    """The clip records a shard's header lists (its tensors are not read)."""
    shard = ShardFile(path, block_size=HEADER_BLOCK)
    try:
        return json.loads(shard.metadata.get("clips", "[]"))
    finally:
        shard.close()


def index_path(root) -> str:
    """index.parquet when the job wrote one (pyarrow installed), else index.csv."""
    parquet = storage.join(root, "index.parquet")
    return parquet if storage.isfile(parquet) else storage.join(root, "index.csv")


def read_index(root) -> pd.DataFrame:
    path = index_path(root)
    if not storage.isfile(path):
        raise FileNotFoundError(f"no index in {storage.redact(root)}: the encode job has not finished (rerun it to "
                                f"complete)")
    with storage.open_read(path) as f:
        df = pd.read_parquet(f) if path.endswith(".parquet") else pd.read_csv(f, keep_default_na=False)
    for col in _JSON_COLUMNS:
        df[col] = df[col].map(json.loads)
    return df


class LatentDataset(Dataset):
    """The clips stored in an encode job's folder, in index order (row, bucket).

    Each item: `latent` (C, T', H', W'), the posterior mean, or with `sample=True` mean + std * noise drawn
    from a generator seeded by (seed, epoch, index), so items are identical across workers and resumes; `mean`,
    `std`; `text`, `path`, `row`, `bucket`, `num_frames` (pixel frames: `decode(latent[None], num_frames)`),
    `height`, `width`, `fps`, `frame_indices`, `source_size` (height, width of the source) and `index`.

    `normalize=True` (default): latents as diffusion training sees them, the model's own normalisation applied
    (mean -> (mean - shift) / scale, std -> std / scale, meta.json's "normalization"; Wan: (z - latents_mean) /
    latents_std, CogVideoX: z * scaling_factor, ...), which is what folders of earlier versions (format 1, the
    Open-Sora pipeline's normalised latents) gave and still give as stored. `normalize=False`: the posterior before
    normalisation, what the model's `decode` takes (a format-1 folder is un-normalised, to float rounding).
    Normalising happens in float32 on the stored values, then back to the stored dtype.

    Buckets give different shapes: pass `buckets=["17x256x256"]` (or batch with a bucket-aware sampler) to
    batch with the default collate. Shard files are opened lazily per process (DataLoader workers included).
    """

    def __init__(self, root, sample: bool = False, seed: int = 0, buckets: Optional[Sequence[str]] = None,
                 max_open_shards: int = 16, normalize: bool = True):
        self.root = str(root)
        self.meta = read_meta(root)
        self.format = latent_format(self.meta)
        self.normalize = bool(normalize)
        norm = self.meta.get("normalization") or self.meta  # format 1 has shift / scale at the top
        self._shift, self._scale = (torch.tensor(norm[k], dtype=torch.float32) for k in ("shift", "scale"))
        index = read_index(root)
        if buckets is not None:
            index = index[index["bucket"].isin(list(buckets))].reset_index(drop=True)
        self.index = index
        self.sample, self.seed, self.epoch = bool(sample), int(seed), 0
        self.max_open_shards = max(1, int(max_open_shards))
        self._files: "OrderedDict[str, Any]" = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = OrderedDict()  # open files do not travel to worker processes
        return state

    def _shard(self, name: str) -> ShardFile:
        if self._pid != os.getpid():  # a forked worker: handles opened by the parent are not ours
            self._files, self._pid = OrderedDict(), os.getpid()
        if name in self._files:
            self._files.move_to_end(name)
            return self._files[name]
        while len(self._files) >= self.max_open_shards:
            self._files.popitem(last=False)[1].close()
        handle = ShardFile(storage.join(self.root, SHARD_DIR, name))
        self._files[name] = handle
        return handle

    @property
    def normalization(self) -> Dict[str, Any]:
        """The model's normalisation meta.json records: normalised = (z - shift) / scale per channel."""
        return {"shift": self._shift.tolist(), "scale": self._scale.tolist()}

    def _in_space(self, mean: torch.Tensor, std: torch.Tensor):
        """Stored mean and std in the space asked for (class docstring)."""
        stored_normalised = self.format == 1
        if self.normalize == stored_normalised:
            return mean, std
        shape = (-1,) + (1,) * (mean.ndim - 1)
        shift, scale = self._shift.reshape(shape), self._scale.reshape(shape)
        m, s = mean.float(), std.float()
        m, s = ((m - shift) / scale, s / scale) if self.normalize else (m * scale + shift, s * scale)
        return m.to(mean.dtype), s.to(std.dtype)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        r = self.index.iloc[int(index)]
        shard = self._shard(r["shard"])
        mean, std = self._in_space(shard.get_tensor(f"{r['key']}/mean"), shard.get_tensor(f"{r['key']}/std"))
        latent = mean
        if self.sample:
            noise = torch.randn(mean.shape, generator=_generator(self.seed, self.epoch, int(index)))
            latent = mean + std * noise.to(mean.dtype)
        return {
            "latent": latent, "mean": mean, "std": std, "text": str(r["text"]), "path": str(r["path"]),
            "row": int(r["row"]), "bucket": str(r["bucket"]), "num_frames": int(r["num_frames"]),
            "height": int(r["height"]), "width": int(r["width"]), "fps": float(r["fps"]),
            "frame_indices": torch.tensor(list(r["frame_indices"])),
            "source_size": torch.tensor([int(r["source_height"]), int(r["source_width"])]), "index": int(index),
        }
