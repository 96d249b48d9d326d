"""The names every shell and stage shares: selection methods and the ways a message uses its picks.

Defined once here; the CLI's choices, the app's radio buttons, the API's validation and the
evaluation's methods are read from these tuples.
"""

from __future__ import annotations

# How passages are picked from the K candidates (sift_chat.selection implements each).
METHODS = ("sift", "nn", "nnf", "us")
METHOD_LABELS = {"sift": "SIFT", "nn": "NN", "nnf": "NN-F", "us": "US"}

# What a message does with its picks: learn from them, read them in the prompt, both, or neither.
MODES = ("fine-tune", "context", "both", "off")
MODE_LABELS = {"fine-tune": "Fine-tune", "context": "Context", "both": "Both", "off": "Off"}

# What context-aware decoding contrasts the answer against: the conversation without the passages
# under the adapted model (the steps' adapter on), or under the base model (adapter off for that
# row), which keeps what the steps taught in the contrast (in "fine-tune" too: the same conversation).
CONTRAST_TARGETS = ("adapted", "base")
CONTRAST_TARGET_LABELS = {"adapted": "The adapted model", "base": "The base model"}

# How a server's messages share the model: their steps in shared rounds and their answers in one
# batch (`learning`, `batching`), or each holding it from its first step to its last word.
DECODINGS = ("together", "one-at-a-time")

# The evaluation's baseline: the base model, no selection. It is what mode "off" answers with in a
# chat; the evaluation lists it as a method so that every table has its reference row.
BASE_MODEL = "none"
EVAL_METHODS = (BASE_MODEL, "us", "nn", "nnf", "sift")
EVAL_MODES = ("fine-tune", "context", "both")  # "off" would only repeat the base model's row


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


class SettingError(ValueError):
    """A setting outside its bounds (or of the wrong kind): the message says what to fix, and
    `name` which setting it is, so an API error can name the field."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def quoted(value, width: int = 40) -> str:
    """A value as an error message quotes it: its repr, cut to `width` characters (a hostile
    value may be huge; an integer too long to print is named by its size)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 96:
        text = f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    else:
        text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def one_line(text: str, width: int) -> str:
    """A text on one line (its white space folded), cut to `width` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def first_line(error: BaseException) -> str:
    """What an error says on its first line (its type's name when it says nothing)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
