"""Tests of tunneld.proxy.routes: Host/path matching, pattern syntax, shadowed-rule detection."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunneld.config_proxy import ServiceConfig, Upstream
from tunneld.proxy.paths import PathError
from tunneld.proxy.routes import (
    Router,
    host_matches,
    host_pattern,
    normalize_host,
    path_matches,
    pattern_covers,
    unreachable_rules,
)

UPSTREAM = Upstream("http", "127.0.0.1", 8080)


def http(name: str, *hosts: str, path_prefix: str = "/") -> ServiceConfig:
    return ServiceConfig(name, UPSTREAM, hosts=hosts, path_prefix=path_prefix)


def tcp(name: str, port: int) -> ServiceConfig:
    return ServiceConfig(name, Upstream("tcp", "127.0.0.1", port), "tcp", listen_port=port)


def routed(router: Router, host: str | None, path: str = "/") -> str | None:
    service = router.match(host, path)
    return None if service is None else service.name


# --- Router ---------------------------------------------------------------------------------


def test_exact_names() -> None:
    router = Router([http("billing", "billing", "billing.internal"), http("accounts", "accounts")])
    assert routed(router, "billing") == "billing"
    assert routed(router, "billing.internal") == "billing"
    assert routed(router, "accounts") == "accounts"
    assert routed(router, "billing.internal.example") is None
    assert routed(router, "x.billing") is None


def test_wildcard_matches_subdomains_but_not_the_bare_suffix() -> None:
    router = Router([http("billing", "*.billing.internal")])
    assert routed(router, "eu.billing.internal") == "billing"
    assert routed(router, "a.b.billing.internal") == "billing"
    assert routed(router, "billing.internal") is None
    assert routed(router, "xbilling.internal") is None


def test_catch_all_takes_any_host_even_a_missing_one() -> None:
    router = Router([http("billing", "billing"), http("default", "*")])
    assert routed(router, "billing") == "billing"
    assert routed(router, "anything.example") == "default"
    assert routed(router, "10.44.0.2") == "default"
    assert routed(router, None) == "default"
    assert routed(router, "") == "default"


def test_host_comparison_ignores_case_port_and_trailing_dot() -> None:
    router = Router([http("billing", "billing.internal", "*.eu.internal")])
    for host in ["BILLING.Internal", "billing.internal:80", "billing.internal.",
                 "Billing.Internal.:8080", " billing.internal ", "billing.internal:",
                 "X.EU.Internal:443"]:  # fmt: skip
        assert routed(router, host) == "billing", host


def test_patterns_are_compared_case_insensitively_even_if_not_canonical() -> None:
    router = Router([http("billing", "Billing.Internal", "*.EU.internal")])
    assert routed(router, "billing.internal") == "billing"
    assert routed(router, "x.eu.internal") == "billing"


def test_ipv6_hosts_compare_by_address() -> None:
    router = Router([http("v6", "[fd44::2]"), http("v4", "10.44.0.2")])
    assert routed(router, "[fd44::2]") == "v6"
    assert routed(router, "[FD44:0:0::2]:80") == "v6"
    assert routed(router, "[fd44:0000::0002]") == "v6"
    assert routed(router, "10.44.0.2:80") == "v4"
    assert routed(router, "[fd44::3]") is None


@pytest.mark.parametrize(
    "host",
    ["fd44::2", "[fd44::2", "[fd44::2]x", "[fd44::2]:x", "[zz]", "billing:x", "billing:80:80",
     "bil ling", "billing/x", "bïlling", "billing@evil"],
)  # fmt: skip
def test_malformed_hosts_match_only_the_catch_all(host: str) -> None:
    assert normalize_host(host) == ""
    assert routed(Router([http("billing", "billing", "*.x")]), host) is None
    assert routed(Router([http("billing", "billing"), http("any", "*")]), host) == "any"


def test_normalize_host() -> None:
    assert normalize_host("Billing.Internal.:80") == "billing.internal"
    assert normalize_host("[FD44:0::2]:80") == "[fd44::2]"
    assert normalize_host("[::ffff:10.0.0.1]") == "[::ffff:a00:1]"
    assert normalize_host("10.44.0.2:8080") == "10.44.0.2"


def test_path_prefixes_match_on_segment_boundaries() -> None:
    router = Router([http("v1", "api", path_prefix="/v1"), http("slash", "api", path_prefix="/s/")])
    assert routed(router, "api", "/v1") == "v1"
    assert routed(router, "api", "/v1/") == "v1"
    assert routed(router, "api", "/v1/x/y") == "v1"
    assert routed(router, "api", "/v1?x=1") == "v1"
    assert routed(router, "api", "/v10") is None
    assert routed(router, "api", "/v1x/") is None
    assert routed(router, "api", "/V1") is None  # paths are case-sensitive
    assert routed(router, "api", "/") is None
    assert routed(router, "api", "/s/") == "slash"
    assert routed(router, "api", "/s/x") == "slash"
    assert routed(router, "api", "/s") is None  # "/s/" asks for what is below /s/


def test_query_is_not_part_of_the_path_and_an_empty_path_is_root() -> None:
    router = Router([http("root", "api", path_prefix="/v1"), http("any", "api")])
    assert routed(router, "api", "/v1?/v2") == "root"
    assert routed(router, "api", "?x") == "any"
    assert routed(router, "api", "") == "any"
    assert routed(router, "api", "/x?/v1") == "any"


def test_a_path_with_parameters_must_match_the_same_rule_without_them() -> None:
    """Tomcat and Spring read ``/admin;x/secret`` as ``/admin/secret``: no way round a guard."""
    router = Router(
        [http("admin", "files", path_prefix="/admin"), http("files", "files"),
         http("v1", "api", path_prefix="/v1")]
    )  # fmt: skip
    assert routed(router, "files", "/login;jsessionid=1?a=;") == "files"
    assert routed(router, "files", "/admin/x;y") == "admin"
    assert routed(router, "api", "/v1/a;b=c/d") == "v1"
    assert routed(router, "files", "/x?q=/admin;x") == "files"  # the query is not the path
    refused = [("files", "/admin;x/secret"), ("files", "/x/..;/admin"), ("files", "/;/admin"),
               ("api", "/v1;x/y"), ("api", "/v1/..;/x"), ("files", "/admin%3Bx/y")]  # fmt: skip
    for host, path in refused:
        with pytest.raises(PathError):
            router.match(host, path)


def test_options_asterisk_matches_only_rules_for_the_whole_host() -> None:
    router = Router([http("v1", "api", path_prefix="/v1"), http("all", "api")])
    assert routed(router, "api", "*") == "all"
    assert routed(Router([http("v1", "api", path_prefix="/v1")]), "api", "*") is None


def test_first_match_wins_in_config_order() -> None:
    narrow_first = Router([http("v1", "api", path_prefix="/v1"), http("api", "api")])
    assert routed(narrow_first, "api", "/v1/x") == "v1"
    assert routed(narrow_first, "api", "/v2/x") == "api"
    broad_first = Router([http("api", "api"), http("v1", "api", path_prefix="/v1")])
    assert routed(broad_first, "api", "/v1/x") == "api"
    wildcard_first = Router([http("wild", "*.internal"), http("exact", "billing.internal")])
    assert routed(wildcard_first, "billing.internal") == "wild"


def test_no_match() -> None:
    router = Router([http("billing", "billing", path_prefix="/v1")])
    assert router.match("nope", "/") is None
    assert router.match("billing", "/v2") is None
    assert Router([]).match("billing", "/") is None


def test_tcp_services_are_not_rules() -> None:
    router = Router([tcp("pg", 5432), http("billing", "billing"), tcp("redis", 6379)])
    assert [service.name for service in router.rules] == ["billing"]
    assert routed(router, "billing") == "billing"
    assert routed(router, "pg") is None


# --- pattern syntax -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("*", "*"),
        ("billing", "billing"),
        ("Billing.Internal.", "billing.internal"),
        ("*.Billing.Internal", "*.billing.internal"),
        ("my_service.internal", "my_service.internal"),
        ("10.44.0.2", "10.44.0.2"),
        ("[FD44:0::2]", "[fd44::2]"),
    ],
)
def test_host_pattern_canonical_forms(text: str, canonical: str) -> None:
    assert host_pattern(text) == canonical
    assert host_pattern(canonical) == canonical


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("bill ing", "contains a space or control character"),
        (" billing", "contains a space or control character"),
        ("billing\n", "contains a space or control character"),
        ("a.*.b", '"*" stands alone or as the whole first label, e.g. "*.example.com"'),
        ("**.x", '"*" stands alone or as the whole first label, e.g. "*.example.com"'),
        ("*.*.x", '"*" stands alone or as the whole first label, e.g. "*.example.com"'),
        ("*billing", '"*" stands alone or as the whole first label, e.g. "*.example.com"'),
        ("billing*", '"*" stands alone or as the whole first label, e.g. "*.example.com"'),
        ("*.", 'a name must follow "*."'),
        ("billing:80", "no :port; the port is ignored when matching"),
        ("[fd44::2]:80", "no :port; the port is ignored when matching"),
        ("fd44::2", "an IPv6 address needs brackets, e.g. [fd44::2]"),
        ("[fd44::zz]", "not a valid IPv6 address inside the brackets"),
        ("[fd44::2", "missing ']' after the IPv6 address"),
        ("10.44.0.300", "not a valid IPv4 address"),
        ("bil!ing", "not a DNS name: letters, digits, '-', '_', dot-separated labels"),
        ("-billing", "not a DNS name: letters, digits, '-', '_', dot-separated labels"),
        ("a..b", "not a DNS name: letters, digits, '-', '_', dot-separated labels"),
        ("bïlling", "not a DNS name: letters, digits, '-', '_', dot-separated labels"),
        ("*.-x", "not a DNS name: letters, digits, '-', '_', dot-separated labels"),
        ("a" * 64, "not a DNS name: letters, digits, '-', '_', dot-separated labels"),
    ],
)
def test_host_pattern_refuses(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        host_pattern(text)
    assert str(info.value) == reason


# --- covering and unreachable rules ---------------------------------------------------------


@pytest.mark.parametrize(
    ("outer", "inner", "covers"),
    [
        ("*", "*", True),
        ("*", "*.x", True),
        ("*", "a.x", True),
        ("*.x", "*", False),
        ("*.x", "*.x", True),
        ("*.x", "*.a.x", True),
        ("*.x", "a.x", True),
        ("*.x", "x", False),
        ("*.x", "*.ax", False),
        ("*.a.x", "*.x", False),
        ("a.x", "a.x", True),
        ("a.x", "*.a.x", False),
        ("a.x", "b.x", False),
    ],
)
def test_pattern_covers(outer: str, inner: str, covers: bool) -> None:
    assert pattern_covers(outer, inner) is covers


@pytest.mark.parametrize(
    ("outer", "inner", "covers"),
    [("/", "/", True), ("/", "/v1", True), ("/v1", "/v1/x", True), ("/v1", "/v1/", True),
     ("/v1/", "/v1", False), ("/v1", "/v10", False), ("/v1", "/", False)],
)  # fmt: skip
def test_path_matches_also_tells_whether_a_prefix_covers_another(
    outer: str, inner: str, covers: bool
) -> None:
    assert path_matches(outer, inner) is covers


def test_unreachable_after_a_catch_all() -> None:
    services = [http("all", "*"), tcp("pg", 5432), http("billing", "billing", path_prefix="/v1")]
    assert unreachable_rules(services) == {2: [0]}


def test_catch_all_with_a_prefix_shadows_only_below_it() -> None:
    services = [
        http("all", "*", path_prefix="/v1"),
        http("a", "a"),
        http("b", "b", path_prefix="/v1/x"),
    ]
    assert unreachable_rules(services) == {2: [0]}


def test_unreachable_by_the_union_of_earlier_rules() -> None:
    services = [http("a", "a"), http("wild", "*.x"), http("both", "a", "b.x", path_prefix="/v")]
    assert unreachable_rules(services) == {2: [0, 1]}


def test_reachable_when_one_pattern_is_not_covered() -> None:
    services = [http("a", "a"), http("ab", "a", "b")]
    assert unreachable_rules(services) == {}


def test_narrower_rule_after_a_broader_prefix_is_unreachable_but_not_before() -> None:
    assert unreachable_rules([http("api", "api"), http("v1", "api", path_prefix="/v1")]) == {1: [0]}
    assert unreachable_rules([http("v1", "api", path_prefix="/v1"), http("api", "api")]) == {}


def test_identical_rules() -> None:
    assert unreachable_rules([http("a", "a", "b"), http("b", "b", "a")]) == {1: [0]}


# --- properties -----------------------------------------------------------------------------

labels = st.sampled_from(["a", "b", "x", "eu", "internal"])
names = st.lists(labels, min_size=1, max_size=3).map(".".join)
patterns = st.one_of(st.just("*"), names, names.map(lambda name: f"*.{name}"))
prefixes = st.lists(st.sampled_from(["v1", "v10", "x", ""]), max_size=3).map(
    lambda segments: "/" + "/".join(segments)
)
paths = st.lists(st.sampled_from(["v1", "v10", "x", ""]), max_size=4).map(
    lambda segments: "/" + "/".join(segments)
)


@given(patterns, patterns, names)
def test_covering_is_sound(outer: str, inner: str, host: str) -> None:
    if pattern_covers(outer, inner) and host_matches(inner, host):
        assert host_matches(outer, host)


@given(
    st.lists(st.tuples(st.lists(patterns, min_size=1, max_size=2), prefixes), max_size=4),
    names,
    paths,
)
def test_an_unreachable_rule_is_never_chosen(
    rules: list[tuple[list[str], str]], host: str, path: str
) -> None:
    services = [
        http(f"r{i}", *hosts, path_prefix=prefix) for i, (hosts, prefix) in enumerate(rules)
    ]
    service = Router(services).match(host, path)
    if service is not None:
        assert services.index(service) not in unreachable_rules(services)


def _unreachable_by_pairs(services: list[ServiceConfig]) -> dict[int, list[int]]:
    """The definition of ``unreachable_rules``, checked pair by pair (quadratic; the reference)."""
    rules = [(i, service) for i, service in enumerate(services) if service.protocol == "http"]
    unreachable: dict[int, list[int]] = {}
    for position, (index, rule) in enumerate(rules):
        earlier = [
            (i, other)
            for i, other in rules[:position]
            if path_matches(other.path_prefix, rule.path_prefix)
        ]
        taken_by: set[int] = set()
        for pattern in rule.hosts:
            covering = [
                i for i, other in earlier if any(pattern_covers(o, pattern) for o in other.hosts)
            ]
            if not covering:
                break
            taken_by.add(covering[0])
        else:
            if rule.hosts:
                unreachable[index] = sorted(taken_by)
    return unreachable


@given(
    st.lists(
        st.tuples(st.lists(patterns, min_size=0, max_size=3), prefixes, st.booleans()),
        max_size=8,
    )
)
def test_unreachable_rules_agrees_with_the_pairwise_definition(
    rules: list[tuple[list[str], str, bool]],
) -> None:
    services = [
        tcp(f"t{i}", 1000 + i) if is_tcp else http(f"r{i}", *hosts, path_prefix=prefix)
        for i, (hosts, prefix, is_tcp) in enumerate(rules)
    ]
    assert unreachable_rules(services) == _unreachable_by_pairs(services)


def test_unreachable_rules_does_work_linear_in_the_number_of_rules(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Config validation runs this over every service: 12,000 of them took over a minute when
    each rule was compared with every earlier one. Counted in comparisons, not timed."""
    from tunneld.proxy import routes

    calls = 0

    def counting(function):  # type: ignore[no-untyped-def]
        def wrapper(*args):  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            return function(*args)

        return wrapper

    monkeypatch.setattr(routes, "path_matches", counting(routes.path_matches))
    monkeypatch.setattr(routes, "pattern_covers", counting(routes.pattern_covers))

    def comparisons(count: int) -> int:
        nonlocal calls
        calls = 0
        services = [
            http(f"r{i}", f"s{i}.example", f"*.s{i}.internal", path_prefix=f"/v{i % 7}/api")
            for i in range(count)
        ]
        assert unreachable_rules(services) == {}
        return calls

    small, large = comparisons(200), comparisons(1600)
    assert large <= 10 * small, f"{small} comparisons for 200 rules, {large} for 1,600"
