"""The root of every exception exaone-deploy raises on purpose.

``except ExaoneDeployError`` catches the errors a user can cause or fix (a bad config.json, a broken bundle, an
impossible option, a missing TensorRT) and nothing else: a ``ValueError``/``KeyError`` from a bug is not one of
them and surfaces as a traceback. The command line turns an ExaoneDeployError into one ``Error: ...`` line with
exit status 1 (``exaone_deploy.commands``); library callers catch it the same way.

Each subclass lives next to the code that raises it (``spec.ConfigError``, ``bundle.BundleError``, ...) and keeps
the builtin base it had before the root existed (``class BundleError(ExaoneDeployError, ValueError)``), so code
that catches ``ValueError`` or ``RuntimeError`` behaves as before. Rejected: one module holding every exception
class (each stage would import it for one name and the classes would drift from their raisers), and a root
derived from ``ValueError`` (a missing TensorRT is not a bad value, and ``except ValueError`` around user input
would then also hide programming errors).
"""

from __future__ import annotations

__all__ = ["ExaoneDeployError", "InputError"]


class ExaoneDeployError(Exception):
    """An error the user can act on: its message names the file or option and says what is wrong."""


class InputError(ExaoneDeployError, ValueError):
    """A prompt, token id, option value or text file the user gave that cannot be used (the message says why)."""
