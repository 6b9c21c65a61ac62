"""`python -m dcae_train [key=value ...]`: compose the config, build the run, fit one phase.

Hydra's compose API is used directly (not `@hydra.main`): no working-directory change, one run folder
chosen by us (`<runs_dir>/<recipe>/phase<N>/<time>`), and processes that Lightning relaunches for DDP
rebuild exactly the same run from the same argv.
"""

from __future__ import annotations

import logging
import sys
import traceback
import warnings
from collections.abc import Sequence

from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import OmegaConf

from dcae_train.config import compose, help_text, recipe_names
from dcae_train.data.webdataset import NoUsableDataError, message_of
from dcae_train.training.checkpoint import latest_good_checkpoint, stored_step
from dcae_train.training.faults import EXIT_PREEMPTED, Preempted, PreemptionSignals, preemption_signals
from dcae_train.training.module import NonFiniteLossError
from dcae_train.training.ranks import is_lost_rank
from dcae_train.training.run import Run, build_run

USAGE = """usage: python -m dcae_train [recipe=NAME] [phase=1|2|3] [key=value ...]

  python -m dcae_train                              quickstart recipe, phase 1 (tiny model, demo data)
  python -m dcae_train phase=2                      phase 2, starting from the latest finished phase-1 run
  python -m dcae_train recipe=dc-ae-f32c32-sana-1.1 phase=1 trainer.devices=8 data.train='shards/{000000..000999}.tar'
  python -m dcae_train resume=auto                  continue the most recent run of this recipe and phase
  python -m dcae_train phase=3 init_from=mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers recipe=dc-ae-f32c32-sana-1.1
  python -m dcae_train model=tiny-in                shorthand for model.variant=tiny-in
  python -m dcae_train debug=smoke                  any recipe/phase in seconds on a CPU
  python -m dcae_train --cfg [overrides]            print the composed config and exit
  python -m dcae_train --help-config [--markdown]   every key with its type, default and meaning (docs/config.md)
  python -m dcae_train --recipes                    list the recipes
"""

EXIT_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_ABORTED = 130  # a second Ctrl-C: the shell's code for "ended by SIGINT"
EXIT_RANK_LOST = 4  # not 75: a rank that crashes on every start must not requeue a SLURM job forever

# Lightning warnings that describe what we do on purpose (frozen modules in eval, checkpoints after the
# optimizer step, our config files in the run folder before the CSV logger starts).
QUIET = (
    r".*module\(s\) in eval mode at the start of training.*",
    r".*Using ModelCheckpoint with manual optimization.*",
    r".*Experiment logs directory .* exists and is not empty.*",
    r".*`IterableDataset` has `__len__` defined.*",
    r".*your dataloader is not resumable.*",  # the datamodule saves the stream position (exact mid-epoch resume)
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*litlogger.*",
    r".*The parameter 'pretrained' is deprecated.*",  # lpips with torchvision >= 0.13
    r".*Arguments other than a weight enum.*",
)


def quiet_known_warnings() -> None:
    for pattern in QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    # Lightning's INFO lines (TPU/HPU availability, tips) drown the progress bar; warnings still show.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_known_warnings()
    info = _information(argv)
    if info is not None:
        print(info, end="")
        return 0
    with preemption_signals() as signals:  # from the first moment: a signal during start-up is a preemption too
        try:
            return _train(argv, signals)
        except (KeyboardInterrupt, SystemExit):  # Lightning ends a KeyboardInterrupt inside fit with sys.exit(1)
            if signals.interrupts < 2:
                raise
            print("aborted by a second Ctrl-C: no checkpoint written for the current step", file=sys.stderr)
            return EXIT_ABORTED


def _train(argv: Sequence[str], signals: PreemptionSignals) -> int:
    show = "--cfg" in argv
    try:
        cfg = compose([a for a in argv if a != "--cfg"])
        if show:
            print(OmegaConf.to_yaml(cfg))
            return 0
        run = build_run(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as err:  # e.g. refused or corrupt weights: say what, keep the traceback for bugs
        traceback.print_exc()
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if signals.requested:
        print(f"preempted by {signals.requested} before training started: continue with resume=auto", file=sys.stderr)
        return EXIT_PREEMPTED
    try:
        return fit(run)
    except NonFiniteLossError as err:
        print(f"error: {err} {_kept_checkpoint(run)}", file=sys.stderr)
        return EXIT_NONFINITE
    except NoUsableDataError as err:  # raised in a DataLoader worker: our line, without the worker's traceback
        print(f"error: {message_of(err)}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as err:
        if run.trainer.world_size == 1 or not is_lost_rank(err):
            raise
        print(lost_rank_message(run, err), file=sys.stderr)
        return EXIT_RANK_LOST


def _kept_checkpoint(run: Run) -> str:
    """What the non-finite stop leaves: the last good checkpoint, or none (never promise one not written)."""
    good = latest_good_checkpoint(run.run_dir)
    if good is None:
        return "No checkpoint was written before the stop: start the run again (not resume=auto)."
    return f"The last good checkpoint is intact ({good}, step {stored_step(good)}): resume=auto continues from it."


def _information(argv: Sequence[str]) -> str | None:
    """What --help, --recipes and --help-config print (None: a training run)."""
    if any(a in ("-h", "--help") for a in argv):
        return USAGE
    if "--recipes" in argv:
        return "\n".join(recipe_names()) + "\n"
    if "--help-config" in argv:
        return help_text(markdown="--markdown" in argv)
    return None


def lost_rank_message(run: Run, err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"error: rank {run.trainer.global_rank} lost contact with the other ranks at step {run.trainer.global_step} "
        f"(a node failed, was killed, or did not answer within trainer.collective_timeout_s="
        f"{run.cfg.trainer.collective_timeout_s} s): {first}\nThe newest checkpoint is kept in "
        f"{run.run_dir / 'checkpoints'}; start every node again with the same command plus resume=auto."
    )


def fit(run: Run) -> int:
    if run.cfg.validate_at_start and run.ckpt_path is None:
        try:
            run.trainer.validate(run.module, datamodule=run.datamodule, verbose=False)
        except (Preempted, SIGTERMException):  # SIGTERMException: Lightning's own handler saw it first
            print("preempted during the start-up validation: continue with resume=auto", file=sys.stderr)
            return EXIT_PREEMPTED
        if run.preemption.requested:
            print("preempted after the start-up validation: continue with resume=auto", file=sys.stderr)
            return EXIT_PREEMPTED
    run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=run.ckpt_path)
    if run.trainer.is_global_zero:
        print(f"run folder: {run.run_dir}")
    if run.preemption.requested:
        print(f"preempted at step {run.trainer.global_step}: continue with resume=auto", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0
