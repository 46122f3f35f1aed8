"""Train the Open-Sora 1.2 VAE: torchrun --nproc_per_node=N scripts/train_vae.py CONFIG --data-path CSV."""
import argparse
import gc
from pathlib import Path

gc.disable()  # the imports create ~0.5M long-lived objects: collecting while they load cost ~3 s per rank
from opensora_vae.config import load_config, parse_cfg_options  # noqa: E402
from opensora_vae.train import Trainer  # noqa: E402
import diffusers.models.autoencoders.autoencoder_kl  # noqa: E402,F401 - built with the model; imported here, 0.8 s less

gc.enable()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", help="Python config, e.g. configs/vae/train/stage1.py")
    parser.add_argument("--data-path", help="CSV with a 'path' column (sets dataset.data_path)")
    parser.add_argument("--load", help="training checkpoint folder to resume from exactly")
    parser.add_argument("--outputs", help="folder for run folders (sets outputs)")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config entries, dotted keys: model.from_pretrained=DIR lr=2e-5")
    args = parser.parse_args(argv)
    options = parse_cfg_options(args.cfg_options)
    if args.data_path:
        options["dataset.data_path"] = args.data_path
    if args.outputs:
        options["outputs"] = args.outputs
    cfg = load_config(args.config, options)
    if not cfg.get("dataset", {}).get("data_path"):
        parser.error("no data: pass --data-path CSV (or set dataset.data_path in the config)")
    trainer = Trainer(cfg, config_name=Path(args.config).stem, load=args.load)
    try:
        trainer.train()
    finally:
        trainer.close()
    gc.freeze()  # everything is saved and closed: exit without a last full collection over torch's objects (2 s)


if __name__ == "__main__":
    main()
