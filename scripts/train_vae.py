"""Train the Open-Sora 1.2 VAE: torchrun --nproc_per_node=N scripts/train_vae.py CONFIG --data-path CSV."""
import gc
import sys
from pathlib import Path

gc.disable()  # the imports create ~0.5M long-lived objects: collecting while they load costs seconds per rank
from opensora_vae.cli import ArgumentParser, add_job_arguments, job_config  # noqa: E402
from opensora_vae.errors import UserError, run_main  # noqa: E402
from opensora_vae.train import Trainer  # noqa: E402
from opensora_vae.signals import EXIT_PREEMPTED  # noqa: E402
import diffusers.models.autoencoders.autoencoder_kl  # noqa: E402,F401 - built with the model; imported here, while gc is off

gc.enable()


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__)
    add_job_arguments(parser, "train")
    parser.add_argument("--load", help="resume exactly: a checkpoint (RUN/epochE-global_stepS), a run folder "
                        "(its newest checkpoint) or 'auto' (the newest run of this config if it has a checkpoint, "
                        "else a new run: the command to requeue)")
    parser.add_argument("--outputs", help="folder for run folders (sets outputs)")
    args = parser.parse_args(argv)
    cfg = job_config(args, "train", {"outputs": args.outputs} if args.outputs else None)
    if not cfg.dataset.get("data_path"):
        raise UserError("no data: pass --data-path CSV (or set dataset.data_path in the config)")
    trainer = Trainer(cfg, config_name=Path(args.config).stem, load=args.load)
    try:
        trainer.train()
    finally:
        trainer.close()
    gc.freeze()  # everything is saved and closed: exit without a last full collection over torch's objects
    return EXIT_PREEMPTED if trainer.preempted else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
