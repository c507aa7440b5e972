"""``python -m trainer teacher|calibrate|cache|sweep|distill|evaluate --config FILE.yaml [key=value ...]``

(also ``cqkd JOB ...``). ``--help-config`` lists every config key with its
type, default and help. Every job also runs under ``torchrun
--nproc_per_node N -m trainer JOB ...`` (see :mod:`trainer.distributed`);
rank 0 alone prints the result."""
from __future__ import annotations

import argparse
import json
import sys

from dataset_tools.errors import CqkdError, exit_with_error
from trainer.yaml_config import ConfigError, load_config

JOBS = ("teacher", "calibrate", "cache", "sweep", "distill", "evaluate")


def main(argv=None, prog: str = "python -m trainer") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", choices=JOBS)
    p.add_argument("--config", help="YAML recipe (see configs/)")
    p.add_argument("--help-config", action="store_true",
                   help="list every config key (section.key) with its type, default and help, and exit")
    p.add_argument("--checkpoint", default="", help="evaluate: checkpoint to evaluate")
    p.add_argument("--corruptions", action="store_true",
                   help="evaluate: under the 15 CIFAR-C corruptions x 5 severities instead")
    p.add_argument("--corruption-types", default="", help="evaluate --corruptions: comma-separated "
                   "subset of types (default: all 15)")
    p.add_argument("--severities", default="", help="evaluate --corruptions: e.g. 1,3,5 (default: 1-5)")
    p.add_argument("--corruption-limit", type=int, default=0, help="evaluate --corruptions: a "
                   "class-balanced subset of N val images (default 0: all)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=0.1")
    args = p.parse_intermixed_args(argv)
    if args.help_config:
        from trainer.recipe import Config
        from trainer.yaml_config import format_keys

        print(format_keys(Config))
        return 0
    if not (args.job == "evaluate" and args.corruptions) and (
            args.corruption_types or args.severities or args.corruption_limit):
        p.error("--corruption-types/--severities/--corruption-limit need 'evaluate --corruptions'")

    from trainer import distributed, jobs
    from trainer.recipe import Config
    from trainer.models import is_imagenet_model
    try:
        cfg = load_config(Config, args.config, args.overrides)
        for name in (cfg.model.teacher, cfg.model.student):
            is_imagenet_model(name)  # an unknown name fails now, before any data is read
    except (ConfigError, CqkdError) as e:
        return exit_with_error(e)
    try:
        if args.job == "evaluate" and args.corruptions:
            from trainer.evaluation.corruption_ops import parse_selection
            from trainer.evaluation.corruptions import format_table
            types, sevs = parse_selection(args.corruption_types, args.severities)
            result = jobs.run_evaluate_corruptions(cfg, args.checkpoint, sevs, types,
                                                   limit=args.corruption_limit)
            if distributed.is_main():
                print(format_table(result))
            result = {k: result[k] for k in ("json", "num_images", "clean", "mean")}
        elif args.job == "evaluate":
            result = jobs.run_evaluate(cfg, args.checkpoint)
        elif args.job == "sweep":
            from trainer.sweep import run_sweep
            result = run_sweep(cfg)
            result = {k: result[k] for k in ("choice", "rule", "cost", "plot")}
        else:
            result = getattr(jobs, f"run_{args.job}")(cfg)
    except ConfigError as e:  # a recipe refused by the job (e.g. run.resume after a change)
        return exit_with_error(e)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        # a job that failed on its inputs (a store, a checkpoint, a cache: most
        # are CqkdErrors too) keeps its historical exit status 1
        return exit_with_error(e, 1)
    except CqkdError as e:  # any other user-facing failure (e.g. a checkpoint's unknown arch)
        return exit_with_error(e)
    if distributed.is_main():
        print(json.dumps(result, indent=2, default=str))
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
