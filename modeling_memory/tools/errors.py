"""The one error class of the tools (graft, export, push, from_llama, the command line)."""


class ToolError(ValueError):
    """A tool cannot do what was asked; the message says what is wrong and how to fix it.

    The command line prints it as one line, `memory-llama COMMAND: error: MESSAGE`, and exits with status 1.
    """


__all__ = ["ToolError"]
