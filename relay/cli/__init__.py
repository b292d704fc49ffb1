"""The command line: `relay ...`, its commands and what they share."""
