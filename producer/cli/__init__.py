"""The `belle-queue` command (entry point ``producer.cli:main``): the parser and the client commands
(commands.py), the batch commands (batch.py), what they share (common.py), and their output: records as
text or JSON (render.py, also the demo's). The progress bar is producer/progress.py: ``submit_batch`` draws it too,
and the library must not import the CLI."""

from producer.cli.commands import main

__all__ = ["main"]
