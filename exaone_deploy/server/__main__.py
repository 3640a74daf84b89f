"""``python -m exaone_deploy.server BUNDLE_DIR [OPTIONS]``: the ``serve`` command without the CLI group."""

from ..commands.common import configure_logging
from .command import serve_command

configure_logging(0)  # serve's own -v raises it
serve_command()
