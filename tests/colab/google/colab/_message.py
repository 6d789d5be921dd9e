"""Stand-in for ``google.colab._message``: the error Colab raises when the browser side of
a request fails (a declined Drive authorization, a blocked upload)."""


class MessageError(RuntimeError):
    pass
