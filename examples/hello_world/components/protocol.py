"""The one request type the hello-world services exchange."""

import msgspec


class Req(msgspec.Struct):
    text: str
