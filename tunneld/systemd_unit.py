"""The systemd unit that ``tunneld install-systemd`` writes: ``systemd/tunneld.service``.

Embedded as text so that an installed package carries it without package-data configuration;
tests/unit/test_install.py fails when the two differ, and says to copy the file here.
"""

UNIT_TEXT = """\
# tunneld: WireGuard secure-tunnel connector, as a hardened systemd service.
#
# Install: copy to /etc/systemd/system/, put the config in /etc/tunneld/tunneld.toml, then
#   systemctl daemon-reload && systemctl enable --now tunneld
# Check this file offline with scripts/check-unit (run by tests/unit/test_unit_file.py):
#   systemd-analyze verify, and
#   systemd-analyze security --offline=true systemd/tunneld.service   → exposure 1.6 (OK)
# Needs systemd ≥ 247 (ProtectProc=, ProcSubset=); written for and run under Debian 12's 252.

[Unit]
Description=tunneld WireGuard secure-tunnel connector
Documentation=file:///usr/share/doc/tunneld/README.md
# Ordering only: tunneld waits for the network by itself (unresolvable endpoints are retried
# with backoff), so a late network delays the tunnel, not the boot and not the service's start.
Wants=network-online.target
After=network-online.target

[Service]
# READY=1 once the interface is configured and the listeners are bound; STATUS= kept current;
# RELOADING=1 … READY=1 around a reload; STOPPING=1 when the drain begins.
# (Type=notify-reload would make `systemctl reload` wait for the reload to finish, but needs
# systemd ≥ 253; tunneld already sends the RELOADING=1 + MONOTONIC_USEC= it requires.)
Type=notify
NotifyAccess=main
ExecStart=/usr/local/bin/tunneld run -c /etc/tunneld/tunneld.toml
ExecReload=/bin/kill -HUP $MAINPID
# SIGTERM to tunneld alone: it drains connections, then stops wireguard-go itself. With the
# default KillMode=control-group, wireguard-go would get SIGTERM at the same moment and take the
# interface away under the in-flight requests. Whatever is left afterwards gets SIGKILL.
KillMode=mixed
# Drain (proxy.shutdown_grace, 30 s by default) plus the interface's teardown.
TimeoutStopSec=60s

# Pings go out only while the supervisor loop makes progress: a wedged daemon is killed
# (SIGABRT) and restarted; a network outage is not, since restarting cannot fix a network.
WatchdogSec=30s
Restart=on-failure
RestartSec=5s
# Exit code 2 means "a person must fix the config, key or privileges": restarting cannot help.
RestartPreventExitStatus=2
# Open files, soft and hard limit alike. Each proxied connection may hold two (client and
# origin), and tunneld keeps a reserve free for its control plane (netlink, UAPI, probes, the
# metrics endpoint, idle origin pools): the default max_connections = "auto" is what is left,
# halved. systemd's default soft limit of 1024 leaves about 300 connections; 65536 lets "auto"
# reach its cap of 16384 with room to spare, or an explicit max_connections up to ~32,000.
# (tunneld raises a lower soft limit to the hard one by itself; here there is nothing to raise.)
LimitNOFILE=65536

# An unprivileged, transient user; everything it owns lives in the directories below.
DynamicUser=yes
# The private key (created 0600 on first start): /var/lib/tunneld → /var/lib/private/tunneld.
StateDirectory=tunneld
StateDirectoryMode=0700
# /etc/tunneld, read-only to the service. With DynamicUser= the service cannot read root-only
# files: give secrets (the private key, require_header value files, origin TLS keys) to it as
# credentials, which systemd copies into /run/credentials/tunneld.service/ for this user alone:
#   [interface] private_key_credential = "tunneld.key"
#   LoadCredential=tunneld.key:/etc/tunneld/private.key
#   (encrypted at rest: LoadCredentialEncrypted=tunneld.key:/etc/tunneld/private.key.cred)
#   [[service]] require_header.value_file = "/run/credentials/tunneld.service/billing.secret"
#   LoadCredential=billing.secret:/etc/tunneld/billing.secret
ConfigurationDirectory=tunneld
ConfigurationDirectoryMode=0755
# /run/tunneld holds the one-daemon-per-interface lock; /run/wireguard the userspace backend's
# UAPI sockets (IFNAME.sock). /run/wireguard is shared with wg-quick's userspace interfaces, so
# it is kept when the service stops instead of being removed with everything in it.
RuntimeDirectory=tunneld wireguard
RuntimeDirectoryMode=0755
RuntimeDirectoryPreserve=yes
UMask=0077

# Capabilities, and nothing else:
#   CAP_NET_ADMIN         create and configure the WireGuard interface (rtnetlink, genetlink),
#                         its nftables filter (nfnetlink, through libnftables),
#                         and wireguard-go's TUNSETIFF on /dev/net/tun (ambient: inherited)
#   CAP_NET_BIND_SERVICE  the proxy's HTTP port 80 (or any port < 1024) on the tunnel address
#   CAP_NET_RAW           the ICMP health probe's raw-socket fallback: an unprivileged ICMP
#                         datagram socket works only where net.ipv4.ping_group_range admits the
#                         service's group, and the kernel default "1 0" (which Debian 12 keeps)
#                         admits no one; on kernels before 5.7 SO_BINDTODEVICE on the proxy's
#                         listeners needs it too
CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE CAP_NET_RAW
AmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE CAP_NET_RAW
NoNewPrivileges=yes

# Filesystem: read-only everywhere except the directories above; no /home, a private /tmp.
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
# A private /dev with the pseudo devices (null, zero, urandom, …) and the tun device only,
# which the userspace backend opens.
PrivateDevices=yes
BindPaths=/dev/net/tun
DevicePolicy=closed
DeviceAllow=/dev/net/tun rw
# /proc: our own processes only (tunneld reads /proc/self/status for its capabilities), and
# only the per-process part of it; nothing of wireguard-go or tunneld needs /proc/sys.
ProtectProc=invisible
ProcSubset=pid

# Kernel: no tunables, modules, kernel log, cgroups, clock or hostname changes. (An absent
# wireguard module is still loaded on `ip link add type wireguard`: the kernel does it.)
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes

# The host's network namespace is the point (no PrivateNetwork=, no IPAddressDeny=: gateways
# are wherever their endpoints resolve to); sockets are limited to what is used: unix (UAPI,
# sd_notify), IPv4/IPv6 (tunnel, proxy, probes), netlink (interface configuration and its
# nftables filter; the nf_tables module, like wireguard, is loaded by the kernel on first use).
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
# CPython (no JIT) and Go binaries never need writable+executable memory.
MemoryDenyWriteExecute=yes
RemoveIPC=yes
PrivateMounts=yes
KeyringMode=private

# System calls: what system services use, minus privileged and resource-control calls. A
# denied call fails with EPERM instead of killing the process (Go's runtime tries to raise
# RLIMIT_NOFILE at start and carries on if it cannot).
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
SystemCallArchitectures=native

[Install]
WantedBy=multi-user.target
"""
