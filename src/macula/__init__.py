"""Macula connectivity: one end-to-end QUIC session per node pair, over whatever path works."""

__version__ = "0.7.0"
