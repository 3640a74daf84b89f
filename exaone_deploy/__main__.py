"""``python -m exaone_deploy``: the same as the ``exaone-deploy`` command."""

from .commands import entry

entry()
