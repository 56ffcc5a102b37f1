"""The netlink seam's answers and errors as a real kernel gives them.

The unit tests drive :class:`~tunneld.wireguard.kernel.PyrouteNetlink`'s callers through a fake
seam that raises the errnos the kernel is *expected* to return; here the kernel returns them.
Runs inside the VM only (``tests/vm``).
"""

from __future__ import annotations

from typing import Any

from tests.vm.guest import launcher, probes
from tests.vm.guest.vmtopology import VmTopology
from tunneld.wireguard.model import DeviceStats

KEY = bytes(range(32))


def test_seam_answers_and_errors_from_a_real_kernel(topology: VmTopology) -> None:
    ns = topology.host_ns
    veth = f"vh{topology.suffix}"

    def seam(method: str, *args: Any, **kwargs: Any) -> launcher.Outcome:
        return launcher.call(ns, probes.netlink, method, *args, **kwargs)

    assert seam("link_kind", "lo") == launcher.Outcome(value="")
    assert seam("link_kind", veth) == launcher.Outcome(value="veth")
    assert seam("link_kind", "tdmissing0") == launcher.Outcome(value=None)

    assert launcher.call(ns, probes.kernel_supported).value == (True, "kernel WireGuard available")
    assert "tdprobe" not in topology.host_links()

    # A fresh device: no key yet, no port chosen until it is up, no peers.
    assert seam("link_add_wireguard", "tdfresh0") == launcher.Outcome(value=None)
    assert seam("wg_info", "tdfresh0").value == DeviceStats()
    again = seam("link_add_wireguard", "tdfresh0")
    assert again.raised == "BackendError"
    assert "creating WireGuard interface tdfresh0 failed (EEXIST" in again.message
    # Removing a peer the device does not have is not an error.
    assert seam("wg_remove_peer", "tdfresh0", KEY) == launcher.Outcome(value=None)

    # Not a WireGuard link / no such link: what the kernel says, translated.
    for method, kwargs in (
        ("wg_info", {}),
        ("wg_set_device", {"private_key": KEY, "listen_port": None, "fwmark": 0}),
    ):
        wrong = seam(method, veth, **kwargs)
        assert wrong.raised == "BackendError", wrong
        assert f"{veth} is not a WireGuard interface" in wrong.message
        missing = seam(method, "tdmissing0", **kwargs)
        assert missing.raised == "BackendError", missing
        assert "no such interface" in missing.message

    # Someone else's link is refused, never deleted.
    refused = launcher.call(ns, probes.open_kernel_device, veth)
    assert refused.raised == "BackendError"
    assert f"interface {veth} exists and is a veth link" in refused.message
    loopback = launcher.call(ns, probes.open_kernel_device, "lo")
    assert "physical or loopback device" in loopback.message
    kept = launcher.call(ns, probes.delete_kernel_device, veth)
    assert kept.raised == "BackendError"
    assert veth in topology.host_links()

    # Without CAP_NET_ADMIN the kernel says EPERM; tunneld says which capability.
    for method, args in (("wg_info", ("tdfresh0",)), ("link_add_wireguard", ("tdfresh1",))):
        denied = launcher.call(ns, probes.netlink, method, *args, without_net_admin=True)
        assert denied.raised == "PermissionError_", denied
        assert "CAP_NET_ADMIN" in denied.message
    status = launcher.run(
        ns, ["status", "-i", "tdfresh0"], workdir=topology.workdir, without_net_admin=True
    )
    assert status.returncode == 2, status
    assert "CAP_NET_ADMIN" in status.stderr

    assert seam("link_delete", "tdfresh0") == launcher.Outcome(value=True)
    assert seam("link_delete", "tdfresh0") == launcher.Outcome(value=False)
    assert "tdfresh" not in topology.host_links()
