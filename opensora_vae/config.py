"""Python configs (mmengine `Config`, with `_base_`), dotted `--cfg-options`, and the declared keys of each job.

Every key a job reads is declared once below (type and default): `TrainConfig`, `InferenceConfig`, `EncodeConfig`.
`load_config(path, options, job=...)` refuses an unknown key (naming the nearest known ones, or the job whose config
it is), a wrong type or an out-of-range value (key, value, what is expected) before anything is built, and fills in
the defaults. A numeric key's range is declared with its type (schema.py: `Annotated[int, Range(1)]`,
`PositiveInt`), in the dataclasses below and in the registered classes' signatures alike. The nested `dataset` and
`model` dicts are checked against their registered classes' arguments, `lr_schedule`, `optimizer` and `model.tiling`
against theirs; a diffusers `model` entry or spec string through models/build.py's validators (no weights load).
Names starting with `_` in a config file are that file's variables (e.g. `_num_frames = 17`), not settings.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Dict, Iterable, List, Literal, Mapping, Optional, Tuple, Union

from mmengine.config import Config

from . import data  # noqa: F401  (registers the dataset types)
from . import storage
from .adversarial import AdversarialLoss
from .errors import MissingFileError, UserError
from .losses import VAELoss
from .models.build import check_model_entry, model_entry
from .models.speed import RUNTIME_OPTIONS, TilingConfig
from .registry import DATASETS, MODELS
from .runtime import DTYPES
from .schema import (Decay, Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Range,  # noqa: F401
                     fits, is_union, ranges_of, type_name)

logger = logging.getLogger("opensora_vae.config")


class ConfigError(UserError):
    """A config the user wrote is wrong: unknown key, wrong type, bad value (one line, no traceback)."""


# ----- the declared keys ----------------------------------------------------------------------------------------
DtypeName = Literal[tuple(DTYPES)]
TRACKERS = ("tensorboard", "wandb")  # train/logging.py runs each


@dataclass
class LRSchedule:
    type: Literal["constant", "cosine"] = "constant"  # cosine: decay to min_ratio * lr at max_steps
    min_ratio: Fraction = 0.0


@dataclass
class OptimizerImpl:
    """AdamW's implementation (None: torch's default); the same update to float rounding."""

    fused: Optional[bool] = None
    foreach: Optional[bool] = None


@dataclass
class JobConfig:
    dataset: Dict[str, Any] = field(default_factory=dict)  # a DATASETS type and its arguments
    # a MODELS type, its arguments and runtime options; or a diffusers class or spec string (models/build.py)
    model: Union[str, Dict[str, Any]] = field(default_factory=dict)
    device: str = "auto"  # auto: CUDA when available, else CPU
    dtype: Union[Literal["auto"], DtypeName] = "auto"  # auto: bf16 on a GPU that has it, else fp32
    seed: int = 42
    num_workers: NonNegativeInt = 0  # data-loading processes
    dist_timeout: PositiveFloat = 600.0  # seconds a collective waits for a dead or hung peer before the job fails
    # finish the step/clip, save, exit 75 (docs/cluster.md)
    stop_signals: List[Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP"]] = field(
        default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGINT"])


@dataclass
class TrainConfig(JobConfig):
    """The published recipe's shared settings; stage configs state what differs. Loss keys are VAELoss's
    arguments (opensora_vae/losses.py) and AdversarialLoss's (opensora_vae/adversarial.py), declared there."""

    dtype: Union[Literal["auto"], DtypeName] = "bf16"
    batch_size: PositiveInt = 1  # per rank
    sampler_seed: int = 0  # the reference's sampler is seeded with 0 whatever `seed` is
    precision: Literal["autocast", "params"] = "autocast"  # params: parameters and AdamW state in `dtype` too
    grad_checkpoint: Union[bool, Literal["temporal", "spatial"]] = True
    optimizer: OptimizerImpl = field(default_factory=OptimizerImpl)
    shard_optimizer: bool = True  # ZeRO-style AdamW state across ranks
    lr: PositiveFloat = 1e-5
    weight_decay: NonNegativeFloat = 0.0
    adam_betas: Tuple[Decay, Decay] = (0.9, 0.999)
    adam_eps: PositiveFloat = 1e-8
    warmup_steps: NonNegativeInt = 0
    lr_schedule: LRSchedule = field(default_factory=LRSchedule)
    grad_clip: Optional[PositiveFloat] = 1.0  # None: no clipping
    mixed_strategy: Optional[Literal["mixed_video_image", "mixed_video_random"]] = None
    mixed_image_ratio: Fraction = 0.0
    sample_posterior: bool = True
    train_spatial_only: bool = False  # fit the spatial VAE alone (the demo's stage 0)
    trainable: Literal["all", "decoder"] = "all"  # decoder: both encoders frozen, so the latents never change
    ema_decay: Optional[Decay] = None  # an fp32 moving average of the trained weights, saved as ema/ (None: none)
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss stops the run, or skips the update everywhere
    max_nonfinite_in_a_row: PositiveInt = 10  # with "skip": this many non-finite steps in a row stop the run
    discriminator: Optional[Dict[str, Any]] = None  # a discriminator (MODELS type) turns the adversarial loss on
    find_unused_parameters: Optional[bool] = None  # None: when the spatial decoder gets no gradient
    epochs: PositiveInt = 100
    max_steps: Optional[PositiveInt] = None
    log_every: PositiveInt = 1
    ckpt_every: NonNegativeInt = 1000  # 0: only at the end
    # keep the K newest checkpoints (None: all); older ones go once a newer is complete
    keep_last: Optional[PositiveInt] = None
    keep_every: Optional[PositiveInt] = None  # also keep every checkpoint whose step is a multiple of this
    keep_global_batch: bool = True  # resumed on another number of ranks: rescale batch_size when it divides
    log_samples: bool = False  # each step's dataset rows (per rank) in metrics.jsonl
    outputs: str = "outputs"
    run_name: Optional[str] = None  # None: the config file's name
    # where the logged values go besides metrics.jsonl (rank 0): TensorBoard events in the run folder, W&B
    trackers: List[Literal[TRACKERS]] = field(default_factory=lambda: ["tensorboard"])
    wandb_project: Optional[str] = None  # None: $WANDB_PROJECT, else "opensora-vae"
    wandb_entity: Optional[str] = None  # None: $WANDB_ENTITY, else the W&B account's default
    log_reconstructions_every: NonNegativeInt = 0  # a clip and its reconstruction to the trackers (0: never)


@dataclass
class InferenceConfig(JobConfig):
    save_dir: Optional[str] = None  # writes SAVE_DIR_ori, SAVE_DIR_rec, SAVE_DIR_spatial
    sample_posterior: bool = False  # the published protocol samples (configs/vae/inference/published_eval.py)
    crf: Annotated[int, Range(0, 51)] = 18  # H.264 quality of the written videos
    fps: Optional[PositiveFloat] = None  # None: the source clip's rate
    num_samples: Optional[PositiveInt] = None  # None: every row
    cal_stats: bool = False  # also write the latents' per-channel mean/std


@dataclass
class EncodeConfig(JobConfig):
    save_dir: Optional[str] = None
    # (num_frames, height, width); None: the dataset's
    buckets: Optional[List[Tuple[PositiveInt, PositiveInt, PositiveInt]]] = None
    shard_size_mb: PositiveFloat = 256.0  # a shard is written once its latents reach this size
    save_dtype: DtypeName = "fp32"


JOBS = {"train": TrainConfig, "inference": InferenceConfig, "encode": EncodeConfig}
# A config of each job: the scripts' --help shows it, and the error for another job's config names it.
JOB_NAMES = {"train": "training", "inference": "inference", "encode": "encoding"}
JOB_EXAMPLES = {"train": "configs/vae/train/stage1.py", "inference": "configs/vae/inference/video.py",
                "encode": "configs/vae/inference/latents.py"}

# Keys that exist only in configs written for the reference, per place: accepted with one warning naming what to
# use instead, and dropped (`drop_reference_keys`).
REFERENCE_KEYS = {
    "": {
        "num_frames": "dataset.num_frames",
        "image_size": "dataset.image_size",
        "frame_interval": "dataset.frame_interval",
        "batch_size": "nothing for inference and encoding: one clip at a time",
        "plugin": "nothing: DDP under torchrun, shard_optimizer=True for ZeRO-style sharding",
        "wandb": "nothing for inference and encoding (training reads wandb=True as trackers including 'wandb')",
        "record_time": "nothing: seconds per step are in metrics.jsonl",
    },
    "model.": {
        "cal_loss": "nothing: the model's forward always returns the training outputs",
        "force_huggingface": "nothing: every checkpoint loads through from_pretrained",
    },
}
_warned: set = set()
# Training keys replaced by `trackers` (each switches the tracker of its name on or off) -> whose key it was.
TRACKER_SWITCHES = {"tensorboard": "an earlier key of this project", "wandb": "the reference's key"}


def _reference_key(where: str, name: str) -> bool:
    known = REFERENCE_KEYS.get(where, {})
    if name not in known:
        return False
    if (where, name) not in _warned:
        _warned.add((where, name))
        logger.warning("config key %s%s is kept for reference configs and ignored; use %s", where, name, known[name])
    return True


def _tracker_switches(values: Dict[str, Any]) -> Dict[str, Any]:
    """`tensorboard=` (this project's earlier key) and the reference's `wandb=`, as `trackers` (training): True adds
    that tracker to the list, False removes it; one warning each."""
    switches = [k for k in TRACKER_SWITCHES if k in values]
    if not switches:
        return values
    values = dict(values)
    trackers = list(values.get("trackers", ["tensorboard"]))
    for key in switches:
        on = values.pop(key)
        if not isinstance(on, bool):
            raise ConfigError(f"config key {key}={on!r} has the wrong type: expected bool (better: trackers=[...])")
        trackers = [t for t in trackers if t != key] + ([key] if on else [])
        switches[switches.index(key)] = f"{key}={on}"
    for said in switches:
        if ("", said) not in _warned:
            _warned.add(("", said))
            logger.warning("config key %s (%s) is read as trackers=%r: write that instead", said,
                           TRACKER_SWITCHES[said.split("=")[0]], trackers)
    values["trackers"] = trackers
    return values


def drop_reference_keys(where: str, values: Mapping[str, Any]) -> Dict[str, Any]:
    """`values` without the reference-only keys of that place (each warned about once)."""
    return {k: v for k, v in values.items() if not _reference_key(where, k)}


def _nearest(name: str, known: Iterable[str], where: str = "") -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(where + c for c in close)}?)" if close else ""


def _unknown(where: str, name: str, known: Iterable[str]) -> ConfigError:
    hint = f" (it is now model.{name})" if not where and name in RUNTIME_OPTIONS else _nearest(name, known, where)
    return ConfigError(f"unknown config key '{where}{name}'{hint}")


def _check_value(where: str, name: str, value: Any, tp: Any) -> None:
    if fits(value, tp):
        return
    if fits(value, tp, ranges=False):
        what = "is out of range: expected"
    elif all(typing.get_origin(a) is Literal for a in (typing.get_args(tp) if is_union(tp) else (tp,))):
        what = "is not one of"
    else:
        what = "has the wrong type: expected"
    raise ConfigError(f"config key {where}{name}={value!r} {what} {type_name(tp)}")


def _check_fields(where: str, values: Mapping[str, Any], hints: Mapping[str, Any]) -> None:
    for name, value in values.items():
        if name.startswith("_"):
            continue
        if name not in hints:
            if _reference_key(where, name):
                continue
            raise _unknown(where, name, hints)
        _check_value(where, name, value, hints[name])
        nested = [t for t in (hints[name], *typing.get_args(hints[name])) if dataclasses.is_dataclass(t)]
        if nested and isinstance(value, Mapping):
            _check_fields(f"{where}{name}.", value, typing.get_type_hints(nested[0], include_extras=True))


def signature_hints(fn: Any) -> Dict[str, Any]:
    """Keyword arguments of a class or function -> their annotations (Any where there is none); a required one
    also takes None, a config's placeholder that the command line fills (e.g. dataset.data_path)."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: check names only
        hints = {}
    params = inspect.signature(target).parameters
    return {n: Optional[hints.get(n, Any)] if p.default is p.empty else hints.get(n, Any) for n, p in params.items()
            if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _check_component(where: str, cfg: Any, registry, default_type: Optional[str] = None,
                     extra: Optional[Mapping[str, Any]] = None) -> None:
    """A registered component's dict: `type` known, every other key one of its arguments (or `extra`)."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"config key {where[:-1]} must be a dict with a 'type' key, got {cfg!r}")
    name = cfg.get("type", default_type)
    if name is None:
        raise ConfigError(f"config key {where}type is missing; registered: {', '.join(sorted(registry.module_dict))}")
    obj = registry.get(name)
    if obj is None:
        raise ConfigError(f"unknown {where}type {name!r}{_nearest(name, registry.module_dict)}; "
                          f"registered: {', '.join(sorted(registry.module_dict))}")
    hints = dict(signature_hints(obj), **(extra or {}))
    _check_fields(where, {k: v for k, v in cfg.items() if k != "type"}, hints)
    for sub, default in (("vae_2d", "VideoAutoencoderKL"), ("vae_temporal", "VAE_Temporal_SD")):
        if isinstance(cfg.get(sub), Mapping):
            _check_component(f"{where}{sub}.", cfg[sub], registry, default_type=default)


def _check_model(model: Any) -> Dict[str, Any]:
    """The `model` entry checked, as a dict: a registered type against its arguments and the runtime options, a
    diffusers class or spec string through models/build.py's validators (no weights load), a `from_pretrained` spec
    parsed; reference-only keys dropped."""
    if isinstance(model, Mapping) and not str(model.get("type", "")).startswith("diffusers:"):
        _check_component("model.", model, MODELS, extra=_model_hints())
        model = _without_reference_keys(model)
    try:
        return check_model_entry(model)
    except UserError as err:
        text = str(err)
        if text.startswith(("unknown config key", "config key")):
            raise ConfigError(text) from None
        key = "model" if isinstance(model, str) else "model.from_pretrained" if isinstance(
            model.get("from_pretrained"), str) and "spec" in text else "model"
        raise ConfigError(f"config key {key}: {text}") from None


def _model_hints() -> Dict[str, Any]:
    """What a job's model dict takes besides its type's arguments: weights (build_model loads them through the one
    loader) and the runtime options build_model applies."""
    hints: Dict[str, Any] = {name: Any for name in RUNTIME_OPTIONS}
    hints.update(tiling=Union[bool, TilingConfig, None], winograd=Optional[bool], subpixel=Optional[bool],
                 micro_batch_size=Union[PositiveInt, Literal[False], None], compile=Union[bool, Dict[str, Any], None],
                 from_pretrained=Optional[str])
    return hints


def _job_hints(job: str) -> Dict[str, Any]:
    """The job's top-level keys -> their types (training: VAELoss's and AdversarialLoss's arguments too)."""
    hints = typing.get_type_hints(JOBS[job], include_extras=True)
    for loss in _job_losses(job):
        hints.update(signature_hints(loss))
    return hints


def _job_losses(job: str) -> tuple:
    return (VAELoss, AdversarialLoss) if job == "train" else ()


def _check_job(cfg: Config, job: str, values: Mapping[str, Any], hints: Mapping[str, Any]) -> None:
    """Refuse another job's config by name: every unknown top-level key is a key of that job."""
    unknown = [k for k in values if not k.startswith("_") and k not in hints and k not in REFERENCE_KEYS[""]]
    others = [o for o in JOBS if o != job and unknown and set(unknown) <= set(_job_hints(o))]
    if not others:
        return
    kinds = " or ".join(JOB_NAMES[o] for o in others)
    article = "an" if kinds[0] in "aeiou" else "a"
    keys = ", ".join(unknown[:3]) + (", ..." if len(unknown) > 3 else "")
    raise ConfigError(f"unknown config key '{unknown[0]}': {cfg.filename or 'the config'} is {article} {kinds} "
                      f"config (it sets {keys}); {JOB_NAMES[job]} takes a config like {JOB_EXAMPLES[job]}")


def _check_trackers(trackers: Any) -> None:
    if not isinstance(trackers, (list, tuple)):
        return  # the type check says what is expected
    unknown = [t for t in trackers if t not in TRACKERS]
    if unknown:
        raise ConfigError(f"config key trackers={list(trackers)!r}: unknown tracker {unknown[0]!r}; known: "
                          f"{', '.join(TRACKERS)}")
    if len(set(trackers)) != len(trackers):
        raise ConfigError(f"config key trackers={list(trackers)!r} names a tracker twice")


def check_config(cfg: Config, job: str) -> Config:
    """Validate `cfg` against the job's declared keys (raises ConfigError naming the key) and fill in defaults;
    the file's `_` variables are dropped. Idempotent."""
    schema = JOBS[job]
    hints = _job_hints(job)
    losses = _job_losses(job)
    values = cfg.to_dict()
    if "trackers" in hints:
        values = _tracker_switches(values)
    _check_job(cfg, job, values, hints)
    _check_trackers(values.get("trackers", []))
    _check_fields("", values, hints)
    for required in ("dataset", "model"):
        if not values.get(required):
            raise ConfigError(f"config key {required!r} is missing: a dict with a 'type' key")
    _check_component("dataset.", values["dataset"], DATASETS)
    values["model"] = _check_model(values["model"])
    if values.get("discriminator") is not None:
        _check_component("discriminator.", values["discriminator"], MODELS)
    defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                for f in dataclasses.fields(schema)}
    for loss in losses:
        defaults.update({n: p.default for n, p in inspect.signature(loss).parameters.items() if n != "self"})
    filled = {k: v for k, v in values.items() if k in hints}
    for name, default in defaults.items():
        if name not in filled:
            filled[name] = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default
        elif dataclasses.is_dataclass(hints.get(name)) and isinstance(filled[name], Mapping):
            filled[name] = {**dataclasses.asdict(hints[name]()), **filled[name]}
    if job == "train" and storage.is_url(filled["outputs"]):  # checkpoint guarantees are a local filesystem's
        raise ConfigError(f"config key outputs={storage.redact(filled['outputs'])!r}: run folders (checkpoints) must "
                          f"be on a local or mounted folder, not a URL; data may be read from URLs")
    return Config(filled, filename=cfg.filename)


def _range_words(tp: Any) -> List[str]:
    """The declared ranges anywhere in `tp`, as the errors write them (`>= 1`)."""
    return [str(r) for r in ranges_of(tp)] + [w for a in typing.get_args(tp) for w in _range_words(a)]


def declared_ranges() -> Dict[str, List[str]]:
    """Each key with a declared Range -> its ranges in words: the jobs' keys, their nested dicts and every registered
    dataset's and model's arguments (docs/config.md shows them; a test keeps the two in step)."""
    tables = [_job_hints(job) for job in JOBS] + [_model_hints()]
    tables += [typing.get_type_hints(t, include_extras=True) for t in (LRSchedule, OptimizerImpl, TilingConfig)]
    tables += [signature_hints(obj) for registry in (DATASETS, MODELS) for obj in registry.module_dict.values()]
    out: Dict[str, set] = {}
    for hints in tables:
        for name, tp in hints.items():
            if _range_words(tp):
                out.setdefault(name, set()).update(_range_words(tp))
    return {name: sorted(words) for name, words in out.items()}


# ----- reading --------------------------------------------------------------------------------------------------
def parse_cfg_options(items: Optional[Iterable[str]]) -> Dict[str, object]:
    """["a.b=1", "c=[1,2]", "d=none"] -> {"a.b": 1, "c": [1, 2], "d": None}; values are Python literals
    when they parse as such (true/false/none in any case too), otherwise strings."""
    out: Dict[str, object] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--cfg-options entry {item!r} is not key=value (e.g. lr=2e-5)")
        key, raw = item.split("=", 1)
        low = raw.strip().lower()
        if low in ("none", "null"):
            value: object = None
        elif low in ("true", "false"):
            value = low == "true"
        else:
            try:
                value = _literal(ast.parse(raw.strip(), mode="eval").body)
            except (ValueError, SyntaxError):
                value = raw
        out[key.strip()] = value
    return out


def _literal(node: ast.AST) -> Any:
    """ast.literal_eval, plus dict(key=value, ...) as config files write dicts."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        if any(k.arg is None for k in node.keywords):
            raise ValueError("dict(**...) is not a literal")
        return {k.arg: _literal(k.value) for k in node.keywords}
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_literal(e) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def load_config(path: Union[str, Path], options: Optional[Union[Dict[str, object], Iterable[str]]] = None,
                job: Optional[str] = None) -> Config:
    """Read a Python config, apply dotted options and, for a `job` ("train", "inference", "encode"), check it
    and fill in its defaults."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"config file {path} not found")
    try:
        cfg = Config.fromfile(str(path))
    except (SyntaxError, NameError, KeyError, FileNotFoundError) as err:
        raise ConfigError(f"config file {path} does not load: {type(err).__name__}: {err}") from err
    if isinstance(cfg.get("model"), str):  # a spec string: a dict, so that model.* options apply to it
        try:
            cfg.model = model_entry(cfg.model)
        except UserError as err:
            raise ConfigError(f"config key model: {err}") from None
    if options:
        if not isinstance(options, dict):
            options = parse_cfg_options(options)
        # A dict given whole replaces what the config had (mmengine would merge it, or refuse a non-dict base).
        options = {k: dict(v, _delete_=True) if isinstance(v, dict) and _has(cfg, k) else v for k, v in options.items()}
        try:
            cfg.merge_from_dict(options)
        except (TypeError, KeyError) as err:
            raise ConfigError(f"--cfg-options do not fit {path}: {err}") from err
    if job:
        return check_config(cfg, job)
    if isinstance(cfg.get("model"), Mapping):
        cfg.model = _without_reference_keys(cfg.model)
    return cfg


def _without_reference_keys(model: Any) -> Any:
    """A model entry without the reference-only keys (warned about once): the models never see them."""
    return drop_reference_keys("model.", model) if isinstance(model, Mapping) else model


def _has(cfg: Config, dotted: str) -> bool:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def save_config(cfg: Config, path: Union[str, Path]) -> None:
    """Write the fully resolved config (bases merged, options applied) as a Python file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(cfg.pretty_text)
