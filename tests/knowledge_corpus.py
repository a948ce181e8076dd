"""Test documents for the knowledge base: a small homelab corpus and a hand-written PDF."""

from __future__ import annotations

from pathlib import Path

RUNBOOK = """\
---
title: Homelab runbook
---
# Homelab runbook

## Storage

### RAID
The file server keeps its data on a RAID 10 array of four disks managed by mdadm.
To replace a failed disk, mark it faulty with `mdadm --fail`, remove it with
`mdadm --remove`, swap the drive in its hot-swap bay and add the new one with `mdadm --add`.
The array then resyncs on its own, which takes about six hours.

## Backups
Backups run every night at 02:00 with restic. They go to the NAS at backup.lan over SFTP.
Retention keeps 7 daily, 4 weekly and 12 monthly snapshots.

## Networking
IoT devices live on VLAN 20, isolated from the servers on VLAN 10.
The Pi-hole DNS server answers at 10.0.0.53 and forwards to Unbound.
"""

POWER = """\
Power and UPS

An APC Smart-UPS 1500VA protects the rack. When the mains power fails, the UPS keeps the
servers running on battery, and NUT shuts them down cleanly once the battery falls to 20 percent.
"""

GARDEN = """\
<html><head><title>Garden notes</title><style>body { color: red }</style></head>
<body><h1>Garden notes</h1>
<h2>Tomatoes</h2><p>Water the tomato plants deeply twice a week and feed them with
compost in July.</p><script>alert("not text")</script>
</body></html>
"""

# question → (source file name, heading of the passage that answers it)
QUESTIONS = {
    "How do I swap a dead drive in the storage array?": ("runbook.md", "RAID"),
    "When do the nightly backups run and where are they stored?": ("runbook.md", "Backups"),
    "What happens to the servers during a power outage?": ("power.txt", ""),
    "Which IP address does the DNS server answer on?": ("runbook.md", "Networking"),
    "How often should I water the tomatoes?": ("garden.html", "Tomatoes"),
}
UNRELATED = ("What is the capital of Mongolia?", "Who won the football world cup in 1998?")


def write_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "runbook.md").write_text(RUNBOOK, encoding="utf-8")
    (folder / "power.txt").write_text(POWER, encoding="utf-8")
    (folder / "garden.html").write_text(GARDEN, encoding="utf-8")
    return folder


def make_pdf(pages: list[list[str]], title: str = "") -> bytes:
    """A minimal valid PDF: one text line per string, Helvetica, correct cross-reference table."""
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [{kids}] /Count {count} >>",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    kids = []
    for lines in pages:
        escaped = [s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") for s in lines]
        stream = "BT /F1 12 Tf 14 TL 72 720 Td " + " ".join(f"({s}) '" for s in escaped) + " ET"
        kids.append(f"{len(objects) + 1} 0 R")
        objects.append(
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {len(objects) + 2} 0 R >>"
        )
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    objects[1] = objects[1].format(kids=" ".join(kids), count=len(pages))
    info = ""
    if title:
        objects.append(f"<< /Title ({title}) >>")
        info = f" /Info {len(objects)} 0 R"
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{offset:010d} 00000 n \n" for offset in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R{info} >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)
