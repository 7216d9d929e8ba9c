"""The `tierwriter` command group; the commands register on it from their modules."""

from __future__ import annotations

import click

# Every command inherits these from the group: -h as well as --help, and wider help text.
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(
    context_settings=CONTEXT,
    epilog="Credentials: `tierwriter login` once (the token is kept in TIERWRITER_TOKEN_FILE, "
    "default ~/.config/tierwriter/token.json), or -u/-p, or TIERWRITER_USER and "
    "TIERWRITER_PASSWORD; without a password on a terminal you are asked. The services read "
    "CONCURRENT_WORKERS, WORD_COUNT_COMPENSATION, OPENAI_BASE_URL, OPENAI_API_KEY, "
    "DATABASE_URL, TLS_CERT_FILE, TLS_KEY_FILE (see README). Shell completion: "
    'eval "$(_TIERWRITER_COMPLETE=bash_source tierwriter)" (zsh_source, fish_source). '
    "Exit codes: 0 every article written, 6 the jobs completed with articles failed, short, "
    "long, skipped or untitled, 1 a run stopped early or a step failed, 2 bad input, 3 not "
    "logged in or not allowed, 4 a service unreachable, 5 busy, 130 cancelled.",
)
def cli() -> None:
    """Generate batches of long-form articles with an LLM, concurrently.

    \b
    Start here:
      tierwriter demo                  the bundled job, end to end, no setup
      tierwriter up                    every service on loopback, in the foreground
      tierwriter login -u admin        then, from another shell:
      tierwriter generate-batch -j job.json
    """
