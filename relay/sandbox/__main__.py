"""Both sandboxes on loopback, seeded, until interrupted (``python -m relay.sandbox``).

Prints one JSON document with their URLs and credentials, so a person can point the relay (or curl)
at them. Every credential here is fake and opens only these sandboxes.
"""

from __future__ import annotations

import json
import signal
import sys
import threading

from relay.sandbox import cegid, files, qonto

CEGID_KEY, CEGID_SECRET, DOSSIER = "sandbox-firm-key", "sandbox-firm-secret", "SANDBOX01"


def _seed(bank: qonto.QontoSandbox) -> None:
    receipt = bank.add_attachment(
        files.jpeg(seed=1), file_name="ticket-petit-zinc.jpg", content_type="image/jpeg"
    )
    bank.add_transaction(
        side="debit", amount="84.00", label="RESTAURANT LE PETIT ZINC", attachment_ids=[receipt]
    )
    invoice = bank.add_attachment(
        files.pdf(seed=2), file_name="OVH-FR51234567.pdf", content_type="application/pdf"
    )
    bank.add_supplier_invoice(attachment_id=invoice, supplier_name="OVH SAS", total="71.88")
    sale = bank.add_attachment(
        files.pdf(seed=3), file_name="F-2026-0117.pdf", content_type="application/pdf"
    )
    bank.add_client_invoice(attachment_id=sale, status="paid", total="1440.00")


def main() -> int:
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with qonto.QontoSandbox() as bank, cegid.CegidSandbox() as loop:
        _seed(bank)
        loop.add_firm(CEGID_KEY, CEGID_SECRET, [DOSSIER])
        described = {
            "qonto": {
                "api_url": bank.url,
                "oauth_url": bank.oauth_url,
                "organization_id": bank.organization_id,
                "api_key": bank.api_key_header,
            },
            "cegid": {
                "api_url": loop.url,
                "subscription_key": loop.subscription_key,
                "api_key": CEGID_KEY,
                "api_secret": CEGID_SECRET,
                "dossier": DOSSIER,
            },
        }
        print(json.dumps(described, indent=2), flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
