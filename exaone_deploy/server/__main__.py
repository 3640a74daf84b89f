"""``python -m exaone_deploy.server BUNDLE_DIR [OPTIONS]``: the ``serve`` command without the CLI group."""

import logging

from .command import serve_command

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
serve_command()
