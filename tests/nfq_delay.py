"""Delays every packet of a netfilter queue by a fixed time, in order (tests/cluster_netns.rs).

Usage: nfq_delay.py QUEUE_NUM DELAY_MS

Run inside a network namespace whose OUTPUT chain sends packets to the queue
(`iptables -A OUTPUT -p udp -j NFQUEUE --queue-num N --queue-bypass`). Each packet is held
DELAY_MS and then accepted unchanged, so an authenticated datagram stays valid: the delay
`tc qdisc ... netem delay` would add, on a kernel without sch_netem. Prints "ready" once
bound. Needs the NetfilterQueue package (scripts/setup installs it) and root.
"""
import collections
import select
import sys
import time

from netfilterqueue import COPY_META, NetfilterQueue

num, delay = int(sys.argv[1]), float(sys.argv[2]) / 1000.0
held = collections.deque()


def hold(pkt):
    held.append((time.monotonic() + delay, pkt))


nfq = NetfilterQueue()
nfq.bind(num, hold, max_len=65536, mode=COPY_META)
fd = nfq.get_fd()
print("ready", flush=True)
while True:
    now = time.monotonic()
    while held and held[0][0] <= now:
        held.popleft()[1].accept()
    wait = max(0.0, held[0][0] - now) if held else 1.0
    ready, _, _ = select.select([fd], [], [], wait)
    if ready:
        nfq.run(block=False)
