from dataclasses import dataclass

from kvexp.methods.base import Method, register


@register
@dataclass
class Full(Method):
    """No compression: every layer keeps every token. The reference every other method is measured against."""

    name = "full"
    description = "no compression (the full cache)"
    compresses = False
