"""``python -m trainer.models [--source project|torchvision|timm|all] [PATTERN]``:
list the model names ``model.teacher`` / ``model.student`` accept."""
from __future__ import annotations

import argparse
import sys

from trainer.models import list_models
from trainer.models.registry import SOURCES


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.models", description=__doc__)
    p.add_argument("pattern", nargs="?", default="", help="fnmatch pattern, e.g. '*resnet*'")
    p.add_argument("--source", default="project", choices=SOURCES + ("all",))
    args = p.parse_args(argv)
    print("\n".join(list_models(args.pattern, args.source)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
