"""Qonto receipts and invoices relayed to the accountant's Cegid Loop client file, exactly once."""

__version__ = "0.1.0"
