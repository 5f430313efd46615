"""Path converters for the API: what cannot be a seq or a username never reaches the database."""

from chat.models import MAX_SEQ


class SeqConverter:
    regex = "[0-9]{1,19}"

    def to_python(self, value: str) -> int:
        seq = int(value)
        if seq > MAX_SEQ:
            raise ValueError("not a seq")  # Django answers 404
        return seq

    def to_url(self, value: int) -> str:
        return str(value)


class UsernameConverter:
    # Django's UnicodeUsernameValidator: letters, digits and @.+-_, at most 150.
    regex = r"[\w.@+-]{1,150}"

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: str) -> str:
        return value
