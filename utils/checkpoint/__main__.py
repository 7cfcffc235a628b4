"""``python -m utils.checkpoint FILE_URL_OR_ZOO_NAME ...``: what each checkpoint is (layout, kind,
build options, tensors); exit status 2 when one cannot be read."""
import sys
from typing import Sequence

from utils.checkpoint import Checkpoint, CheckpointError


def describe(source: str) -> str:
    """A few lines on what a checkpoint is: layout, kind, build options, tensors, classifier."""
    checkpoint = Checkpoint(source)
    lines = [checkpoint.where,
             f"  layout: {checkpoint.layout.name} ({checkpoint.layout.description}), {checkpoint.layout.kind}",
             f"  tensors: {len(checkpoint.state)} ({sum(v.size for v in checkpoint.state.values()) / 1e6:.2f} M values)",
             f"  build options: {checkpoint.options}"]
    if checkpoint.classifier:
        lines.append(f"  ImageNet classifier: {', '.join(sorted(checkpoint.classifier))}")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    if not argv:
        sys.exit("usage: python -m utils.checkpoint FILE_URL_OR_ZOO_NAME ...")
    status = 0
    for item in argv:
        try:
            print(describe(item))
        except CheckpointError as err:
            print(f"{item}: {err}", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
