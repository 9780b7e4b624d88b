"""`macula bench`: our paths measured right beside raw aioquic, coturn and aioice.

Every case runs on loopback or inside the virtual-time simulator; figures are ratios of
ours to theirs taken in the same run on the same machine, so they travel between machines
better than absolute times do. The modules here import nothing heavy at import time:
`python -m macula_lab.bench.worker` must also start in an interpreter that only has qh3.
"""
