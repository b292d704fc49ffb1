"""The ``relay`` command line, its commands and what they share."""
