"""A hostile tenant's probe, run as root inside a container (uploaded over SFTP).

`python3 probe.py '<json list of actions>'` runs the actions at once and prints one JSON
list of results. Actions:
- ["connect", host, port]: a plain TCP connect -> "open" / "refused" / "silent".
- ["syn", ifname, src_mac, dst_mac, src_ip, dst_ip, port]: an Ethernet frame carrying a
  hand-built IPv4/TCP SYN, sent on a packet socket (any source address), then waits for
  a SYN-ACK or RST from dst_ip:port -> "answer" / "silent".
- ["arp", ifname, src_mac, ip, count]: gratuitous ARP replies claiming `ip` for
  `src_mac`, one every 50 ms.
- ["ipv6", ifname, src_mac]: an IPv6 frame to all nodes -> "sent".
Standard library only: the base image has python3 and nothing else for this.
"""

import json
import random
import socket
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor

WAIT = 1.0
ETH_P_ALL, ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0003, 0x0800, 0x0806, 0x86DD


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def ip(text: str) -> bytes:
    return socket.inet_aton(text)


def ipv4_syn(src: str, dst: str, sport: int, dport: int) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, random.getrandbits(32), 0, 5 << 4, 0x02,
                      64240, 0, 0)
    pseudo = ip(src) + ip(dst) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), random.getrandbits(16), 0, 64,
                      6, 0, ip(src), ip(dst))
    return hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:] + tcp


def packet_socket(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((ifname, 0))
    return s


def connect(host: str, port: int) -> str:
    try:
        with socket.create_connection((host, port), timeout=WAIT):
            return "open"
    except ConnectionRefusedError:
        return "refused"
    except OSError:
        return "silent"


def syn(ifname: str, src_mac: str, dst_mac: str, src: str, dst: str, port: int) -> str:
    sport = random.randrange(40000, 60000)
    s = packet_socket(ifname)
    s.settimeout(0.1)
    try:
        frame = mac(dst_mac) + mac(src_mac) + struct.pack("!H", ETH_P_IP)
        s.send(frame + ipv4_syn(src, dst, sport, port))
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                f = s.recv(2048)
            except TimeoutError:
                continue
            if struct.unpack("!H", f[12:14])[0] != ETH_P_IP or f[23] != 6:
                continue
            ihl = (f[14] & 0x0F) * 4
            sp, dp = struct.unpack("!HH", f[14 + ihl:18 + ihl])
            flags = f[14 + ihl + 13]
            if f[26:30] == ip(dst) and sp == port and dp == sport and flags & 0x16:
                return "answer"
        return "silent"
    finally:
        s.close()


def arp(ifname: str, src_mac: str, addr: str, count: int = 5) -> str:
    body = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, 2, mac(src_mac), ip(addr),
                       b"\xff" * 6, ip(addr))
    with packet_socket(ifname) as s:
        for _ in range(count):
            s.send(b"\xff" * 6 + mac(src_mac) + struct.pack("!H", ETH_P_ARP) + body)
            time.sleep(0.05)
    return "sent"


def ipv6(ifname: str, src_mac: str) -> str:
    hdr = struct.pack("!IHBB16s16s", 6 << 28, 8, 17, 1, b"\xfe\x80" + b"\0" * 13 + b"\x02",
                      b"\xff\x02" + b"\0" * 13 + b"\x01")
    with packet_socket(ifname) as s:
        s.send(mac("33:33:00:00:00:01") + mac(src_mac) + struct.pack("!H", ETH_P_IPV6)
               + hdr + struct.pack("!HHHH", 40000, 9, 8, 0))
    return "sent"


ACTIONS = {"connect": connect, "syn": syn, "arp": arp, "ipv6": ipv6}

if __name__ == "__main__":
    todo = json.loads(sys.argv[1])
    with ThreadPoolExecutor(len(todo) or 1) as pool:
        print(json.dumps(list(pool.map(lambda a: ACTIONS[a[0]](*a[1:]), todo))))
