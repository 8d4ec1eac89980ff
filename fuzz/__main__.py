"""Run one fuzz target under atheris (libFuzzer).

    python -m fuzz --list
    python -m fuzz TARGET [libFuzzer flags] [corpus dirs]
    python -m fuzz v2_json -max_total_time=300
    python -m fuzz npz_codec -atheris_runs=100000 /tmp/npz-corpus

Defaults, each replaced by a flag of the same name: ``-timeout=5`` (an input running longer is a
hang, reported as a crash), ``-rss_limit_mb=2048`` (more memory is a crash), ``-max_len=65536``,
``-artifact_prefix=fuzz/findings/TARGET/`` (where crashing inputs are written),
``-dict=fuzz/dicts/TARGET.dict`` (the format's tokens, when there is one). The first
corpus dir (default ``fuzz/work/TARGET/``) receives the inputs that find new coverage; the
target's seeds (``fuzz/seeds/TARGET/``) and its regression corpus (``tests/corpus/TARGET/``)
are always read too. Exit status 0 when the run ends (``-max_total_time``, ``-runs``) with no
crash, non-zero otherwise.
"""

from __future__ import annotations

import os
import sys

from fuzz import CORPUS, HERE, SEEDS, instrument, load, targets

DEFAULTS = {"-timeout": "5", "-rss_limit_mb": "2048", "-max_len": "65536"}


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    if argv[0] == "--list":
        print("\n".join(targets()))
        return
    name, rest = argv[0], argv[1:]
    flags = [arg for arg in rest if arg.startswith("-")]
    dirs = [arg for arg in rest if not arg.startswith("-")]
    given = {flag.split("=", 1)[0] for flag in flags}
    defaults = {**DEFAULTS, "-artifact_prefix": f"{HERE / 'findings' / name}/"}
    words = HERE / "dicts" / f"{name}.dict"
    if words.is_file():
        defaults["-dict"] = str(words)
    flags += [f"{flag}={value}" for flag, value in defaults.items() if flag not in given]
    if not dirs:
        dirs = [str(HERE / "work" / name)]
    for extra in (SEEDS / name, CORPUS / name):
        if extra.is_dir():
            dirs.append(str(extra))
    for flag in flags:
        if flag.startswith("-artifact_prefix="):
            prefix = flag.split("=", 1)[1]
            if prefix.endswith("/"):
                os.makedirs(prefix, exist_ok=True)
    os.makedirs(dirs[0], exist_ok=True)

    import atheris

    instrument.ENABLED = True
    one_input = load(name)
    print(f"fuzz: {name} over {', '.join(dirs)} with {' '.join(flags)}", file=sys.stderr, flush=True)
    atheris.Setup([sys.argv[0], *flags, *dirs], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv[1:])
