"""pairfarm: a download farm that builds LAION-style image-text datasets.

This package holds what every role shares: the command line and the formats that cross
the wire (API models, outcome classes, shard layout). It imports no heavy library.
"""

__version__ = "0.1.0"
