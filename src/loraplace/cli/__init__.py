"""The ``loraplace`` command line: thin recipes over the library (parse → run → print).

Every user-facing failure is a :class:`~loraplace.errors.LoraplaceError`, printed as one cause + hint with exit
code 2; ``--debug`` adds the traceback. One Typer app (:mod:`~loraplace.cli.common`); each command module
registers its commands on it: :mod:`~loraplace.cli.plan` (plan, probe, export-placement), :mod:`~loraplace.cli.train`,
:mod:`~loraplace.cli.run` (run, status, replay), :mod:`~loraplace.cli.results` (export, report, recommend);
:mod:`~loraplace.cli.main` runs it and maps failures to exit codes.
"""

from loraplace.cli.common import app
from loraplace.cli.main import main
from loraplace.cli.progress import TrainProgress

__all__ = ["TrainProgress", "app", "main"]
