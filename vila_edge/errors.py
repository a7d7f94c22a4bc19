"""Errors a user can act on. Each carries one line that names the file or value and the fix.

The CLI prints `str(error)` and exits with code 2; nothing else reaches the terminal.
"""


class VilaEdgeError(Exception):
    """Base class: a problem with the user's input, not a bug in vila-edge."""


class CheckpointError(VilaEdgeError):
    """A checkpoint folder or file is missing, malformed or self-contradictory."""


class MediaError(VilaEdgeError):
    """An image, video or camera source cannot be read."""


class ImageTooLarge(MediaError):
    """An image has more pixels than the cap (checked from its header, before decoding)."""


class EngineError(VilaEdgeError):
    """An engine directory is missing, stale or was built for another checkpoint or device."""


class PromptError(VilaEdgeError):
    """A prompt and its media do not match (e.g. more <image> markers than images)."""
