"""The library's error base: every problem it reports to a person is an ``Ideo4Error``.

Each class also keeps the builtin base it had before (``ValueError`` or ``RuntimeError``), so
``except ValueError`` and ``pytest.raises(ValueError)`` still catch what they caught. A command
turns an ``Ideo4Error`` into one ``Error: ...`` line (``ideogram4_mlx.cli.errors``); the server
turns a ``ValueError`` into a 422.

The hierarchy (classes that belong to one module live there, on these bases)::

    Ideo4Error
      InputError (ValueError)              a value, file or request the library cannot use
        CheckpointError (config)           a checkpoint missing, damaged or not this model
          MissingHeadError (magic.model)   the magic prompt's lm_head, neither local nor on the Hub
        LoRAError (lora)                   a LoRA file or option that cannot be applied
        CaptionError (request)             caption findings under strict checking
        MagicPromptError (magic.options)   an idea that cannot be expanded
          DescribeError (describe.options) an image that cannot be described
        CaptionIncompleteError (magic.constrain)   generated JSON cut off by max_tokens
        NonFiniteError (generation)        the latents turned NaN or infinite
      ModelAccessError (hub, RuntimeError)     the Hub refused or could not be reached
      DistributedError (distributed, RuntimeError)   the ranks cannot run together

File-system problems stay ``OSError`` (``FileExistsError``, ``FileNotFoundError``, a full
disk): the commands report those in the same one line.
"""


class Ideo4Error(Exception):
    """A problem the library reports to a person: the message says what, where, and the fix."""


class InputError(Ideo4Error, ValueError):
    """A value, file or request the library cannot use (out of range, unreadable, malformed)."""
