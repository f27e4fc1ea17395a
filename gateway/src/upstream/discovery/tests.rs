use super::*;

/// A slice from JSON, as the API server sends it.
fn slice(
    address_type: &str,
    ports: serde_json::Value,
    endpoints: serde_json::Value,
) -> EndpointSlice {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "s", "labels": {SERVICE_LABEL: "product"}},
        "addressType": address_type,
        "ports": ports,
        "endpoints": endpoints,
    }))
    .unwrap()
}

fn ep(ip: &str, ready: Option<bool>, terminating: Option<bool>) -> serde_json::Value {
    let mut conditions = serde_json::Map::new();
    if let Some(r) = ready {
        conditions.insert("ready".into(), r.into());
    }
    if let Some(t) = terminating {
        conditions.insert("terminating".into(), t.into());
        conditions.insert("serving".into(), true.into());
    }
    json!({"addresses": [ip], "conditions": conditions})
}

#[test]
fn only_ready_endpoints_are_used_and_unknown_readiness_counts_as_ready() {
    let s = slice(
        "IPv4",
        json!([{"name": "http", "port": 8081, "protocol": "TCP"}]),
        json!([
            ep("10.0.0.1", Some(true), Some(false)),
            ep("10.0.0.2", Some(false), Some(false)),
            ep("10.0.0.3", Some(false), Some(true)),
            ep("10.0.0.4", None, None),
        ]),
    );
    let r = resolve([&s], "http");
    assert_eq!(r.ready, ["http://10.0.0.1:8081", "http://10.0.0.4:8081"]);
    assert_eq!((r.not_ready, r.terminating), (1, 1));
}

#[test]
fn slices_merge_and_a_duplicate_counts_once_in_its_least_available_state() {
    let port = json!([{"name": "http", "port": 8081}]);
    let a = slice(
        "IPv4",
        port.clone(),
        json!([
            ep("10.0.0.1", Some(true), None),
            ep("10.0.0.2", Some(true), None)
        ]),
    );
    // The controller moved 10.0.0.2 here, already terminating; 10.0.0.1 is listed twice.
    let b = slice(
        "IPv4",
        port,
        json!([
            ep("10.0.0.1", Some(true), None),
            ep("10.0.0.2", Some(false), Some(true))
        ]),
    );
    let r = resolve([&a, &b], "http");
    assert_eq!(r.ready, ["http://10.0.0.1:8081"]);
    assert_eq!((r.not_ready, r.terminating), (0, 1));
}

#[test]
fn the_port_is_found_by_name_in_each_slice() {
    // Two ReplicaSets mid-rollout expose the named port on different numbers.
    let old = slice(
        "IPv4",
        json!([{"name": "metrics", "port": 9090}, {"name": "http", "port": 8081}]),
        json!([ep("10.0.0.1", Some(true), None)]),
    );
    let new = slice(
        "IPv4",
        json!([{"name": "http", "port": 9000}]),
        json!([ep("10.0.0.2", Some(true), None)]),
    );
    let unnamed = slice(
        "IPv4",
        json!([{"port": 7000}]),
        json!([ep("10.0.0.3", Some(true), None)]),
    );
    let udp = slice(
        "IPv4",
        json!([{"name": "http", "port": 53, "protocol": "UDP"}]),
        json!([ep("10.0.0.4", Some(true), None)]),
    );
    let r = resolve([&old, &new, &unnamed, &udp], "http");
    assert_eq!(r.ready, ["http://10.0.0.1:8081", "http://10.0.0.2:9000"]);
    assert_eq!(
        resolve([&unnamed], "").ready,
        ["http://10.0.0.3:7000"],
        "a Service's single unnamed port is the empty name"
    );
}

#[test]
fn ipv6_addresses_are_bracketed_and_fqdn_slices_ignored() {
    let port = json!([{"name": "http", "port": 8081}]);
    let v6 = slice(
        "IPv6",
        port.clone(),
        json!([ep("fd00::1", Some(true), None)]),
    );
    let fqdn = slice(
        "FQDN",
        port,
        json!([ep("product.example", Some(true), None)]),
    );
    let r = resolve([&v6, &fqdn], "http");
    assert_eq!(r.ready, ["http://[fd00::1]:8081"]);
    for url in &r.ready {
        Endpoint::parse(url).unwrap();
    }
}

#[test]
fn no_slices_no_endpoints() {
    assert_eq!(resolve([], "http"), Resolved::default());
}
