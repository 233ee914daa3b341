"""The command line of every study and benchmark: `--preset`, then the config's own fields.

    python experiments/studies/compare_solvers.py --preset smoke --out runs/x
    python experiments/bench/overhead.py --preset full --seq 4096 --help

`--preset smoke|quick|full` picks one of the script's frozen config dataclasses
(`smoke`: seconds, a tiny end-to-end check for the tests; `quick`, the default: minutes on
a 2-core CPU; `full`: the sizes of the recorded results, often for a GPU). Every field of
that config can then be overridden by a flag that tyro derives from the dataclass
(`--field-name value`, nested dataclasses as `--setup.train.total-steps 10`); fields tyro
cannot parse (solver objects) keep the preset's value. `--help` lists them with the
preset's values as defaults. The parsed config is handed to `main(config)`, and nothing
else is: every input of a run is in its config.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

PRESETS = ("smoke", "quick", "full")
C = TypeVar("C")


def parse(
    presets: Mapping[str, Callable[[], C]],
    argv: Sequence[str] | None = None,
    *,
    description: str,
    default: str = "quick",
) -> C:
    """The config a command line asks for.

    **Arguments:**

    - `presets`: `{"smoke": ..., "quick": ..., "full": ...}`, each a function returning the
      script's config.
    - `argv`: the arguments (`None`: `sys.argv[1:]`).
    - `description`: the `--help` text.
    - `default`: the preset when `--preset` is not given.

    **Returns:**

    The preset's config with the flags' overrides applied.
    """
    import tyro

    if set(presets) != set(PRESETS):
        raise ValueError(f"presets must be exactly {PRESETS}; got {tuple(presets)}.")
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--preset", choices=PRESETS, default=default)
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    base = presets[args.preset]()
    text = (
        f"{description}\n\n--preset smoke|quick|full (default: {default}; here: "
        f"{args.preset}) picks the sizes; the flags below override single fields."
    )
    with warnings.catch_warnings():
        # tyro looks into the generic types of the fields it cannot parse (diffrax solvers)
        # and warns that it cannot resolve their type parameters; those fields keep the
        # preset's value whatever it finds.
        warnings.filterwarnings("ignore", message="Could not resolve type parameter")
        return tyro.cli(type(base), default=base, args=rest, description=text)


def run(
    presets: Mapping[str, Callable[[], C]],
    main: Callable[[C], Any],
    argv: Sequence[str] | None = None,
    *,
    description: str,
    default: str = "quick",
) -> Any:
    """`main(parse(presets, argv, ...))`: a script's `if __name__ == "__main__":` line."""
    return main(parse(presets, argv, description=description, default=default))
