"""--read-timeout, --min-rate and --body-budget: carried to a cloud instance's command line, set on
Hypercorn where they belong, checked before anything starts."""

from __future__ import annotations

from click.testing import CliRunner

from core.process.launch import Launch
from core.process.serving import HEADER_LIMIT, HEADER_TIMEOUT, hypercorn_config
from core.types import ServeOptions
from studio_plugins.cli import build_cli
from studio_plugins.testing import make_host


def argv(**options: object) -> list[str]:
    return Launch(make_host(), ServeOptions(keys=("exp",), **options)).serve_argv()  # type: ignore[arg-type]


def test_the_options_travel_in_the_serve_command_line() -> None:
    plain = argv()
    assert "--read-timeout" not in plain and "--body-budget" not in plain  # defaults: left out
    line = argv(read_timeout=5.0, min_rate=100, body_budget=2 << 30)
    assert line[line.index("--read-timeout") + 1] == "5"
    assert line[line.index("--min-rate") + 1] == "100"
    assert line[line.index("--body-budget") + 1] == str(2 << 30)
    line = argv(read_timeout=0.0)
    assert line[line.index("--read-timeout") + 1] == "0"


def test_hypercorn_guards_headers_and_leaves_its_per_read_timeout_off() -> None:
    config = hypercorn_config(read_timeout=20)
    assert config.keep_alive_timeout == HEADER_TIMEOUT  # also the header timeout
    assert config.h11_max_incomplete_size == HEADER_LIMIT
    assert config.read_timeout is None  # it would cancel requests waiting on a long model call
    assert hypercorn_config(read_timeout=1).keep_alive_timeout == 1
    assert hypercorn_config(read_timeout=0).keep_alive_timeout == HEADER_TIMEOUT


def test_a_budget_below_max_body_is_refused_before_starting() -> None:
    result = CliRunner().invoke(build_cli(make_host()),
                                ["serve", "exp", "--max-body", "2MB", "--body-budget", "1MB"])
    assert result.exit_code == 1
    assert "--body-budget 1000000 is smaller than --max-body 2000000" in result.output
    help_text = CliRunner().invoke(build_cli(make_host()), ["serve", "--help"]).output
    for option in ("--read-timeout", "--min-rate", "--body-budget"):
        assert option in help_text
