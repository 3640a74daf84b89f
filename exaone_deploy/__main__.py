"""``python -m exaone_deploy``: the same as the ``exaone-deploy`` command."""

from .cli import entry

entry()
