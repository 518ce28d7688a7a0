"""Which addresses a webhook may be sent to: no loopback, private, link-local, metadata or other non-public ones.

A webhook URL comes from a client, and the dispatcher posts to it from inside the deployment: without this, a
put could make the service call its own Redis, a cloud metadata endpoint or any host of the private network
(SSRF). Every address a name resolves to is checked, at put and again at each attempt (DNS can change in
between), and the attempt connects to an address it checked (no second lookup that could answer otherwise).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

# Cloud metadata endpoints that are not link-local: Alibaba Cloud's (in the shared 100.64/10 range), and the
# IPv6 ones of AWS (fd00:ec2::254) and GCP's internal name server. Link-local 169.254.169.254 (AWS, GCP, Azure,
# OpenStack) is refused as link-local already.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("100.100.100.200", "fd00:ec2::254", "169.254.169.254", "169.254.170.2")
)
RESOLVE_TIMEOUT_SECONDS = 3.0

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class RefusedAddress(Exception):
    """The URL's host resolves to an address webhooks may not go to (or does not resolve); says which and why."""


def why_refused(address: Address) -> str | None:
    """Why a webhook may not go to `address`, or None when it is a public address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    for test, what in (
        (address.is_unspecified, "unspecified"),
        (address.is_loopback, "loopback"),
        (address.is_link_local, "link-local"),
        (address.is_private, "private"),
        (address.is_multicast, "multicast"),
        (address.is_reserved, "reserved"),
    ):
        if test:
            return f"a {what} address"
    if not address.is_global:
        return "not a public address"  # shared (100.64/10), documentation ranges and the like
    return None


def literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Resolved:
    host: str
    addresses: tuple[Address, ...]


async def resolve(host: str, port: int, *, allow_private: bool, timeout: float = RESOLVE_TIMEOUT_SECONDS) -> Resolved:
    """Every address of `host`, checked (all of them: a name with one private address is refused);
    RefusedAddress when one may not be used or the name does not resolve."""
    found = literal(host)
    if found is not None:
        addresses: tuple[Address, ...] = (found,)
    else:
        try:
            async with asyncio.timeout(timeout):
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError) as exc:
            raise RefusedAddress(f"host {host!r} does not resolve: {exc or 'timed out'}") from None
        addresses = tuple(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos))
        if not addresses:
            raise RefusedAddress(f"host {host!r} does not resolve")
    if not allow_private:
        for address in addresses:
            reason = why_refused(address)
            if reason:
                shown = host if found is not None else f"{host!r} resolves to {address}, which"
                raise RefusedAddress(f"{shown} is {reason}; webhooks go to public addresses only")
    return Resolved(host, addresses)
