"""Project error types."""


class InputError(ValueError):
    """Raised for anything a user can get wrong; the message says what and what to do."""
